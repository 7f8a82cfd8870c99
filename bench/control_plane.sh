#!/bin/bash
# Control plane: Exists and GetMetadata at 1, 64 and 1,000 concurrent keep-alive connections,
# against GET /v1/health in the same run (the HTTP server and loop without the driver: the
# parser-and-loop limit). Calls alternate per round (Exists, GetMetadata, health, Exists, ...).
#
# Usage: bench/control_plane.sh [BUILD_DIR]   (env: CONNECTIONS, ROUNDS, SECONDS_PER_RUN)
set -euo pipefail
BUILD=${1:-build}
CONNECTIONS=${CONNECTIONS:-"1 64 1000"}
ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
LAYERD=$(realpath "$BUILD/src/daemon/layerd")
BENCH=$(realpath "$BUILD/tools/layerbench/layerbench")

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
start_layerd control-plane

# One run; prints "req/s p50_ms p99_ms".
run() {
  local c=$1 op=$2 out
  if [ "$op" = health ]; then
    out=$("$BENCH" -s "$W/sock" -c "$c" --json --health-interval 0 health -t "$SECONDS_PER_RUN")
    jq -r '.phases[] | select(.phase == "health") | .ops["GET /v1/health"] as $o
      | "\($o.ok / .seconds) \($o.p50_ms) \($o.p99_ms)"' <<<"$out"
  else
    out=$("$BENCH" -s "$W/sock" -c "$c" --json --health-interval 0 control --op "$op" -t "$SECONDS_PER_RUN")
    jq -r --arg op "$op" '. as $r | if $r.errors != 0 then error("errors") else . end
      | .phases[] | select(.phase == "control") | .ops[$op] as $o
      | "\($o.ok / .seconds) \($o.p50_ms) \($o.p99_ms)"' <<<"$out"
  fi
}

echo "# control plane: $(nproc) cpus, $(uname -r), ${SECONDS_PER_RUN}s per run, rounds $ROUNDS, load $(cut -d' ' -f1-3 /proc/loadavg)"
TABLE=()
for c in $CONNECTIONS; do
  for op in Exists GetMetadata health; do : >"$W/$op"; done
  for round in $(seq "$ROUNDS"); do
    for op in Exists GetMetadata health; do
      r=$(run "$c" "$op"); echo "$r" >>"$W/$op"
      echo "round $round c=$c $op: $r"
    done
  done
  for op in Exists GetMetadata health; do
    TABLE+=("| $c | $op | $(awk '{print $1}' "$W/$op" | median | xargs printf '%.0f') | $(awk '{print $2}' "$W/$op" | median) | $(awk '{print $3}' "$W/$op" | median) |")
  done
done
echo
echo "| connections | call | req/s | p50 ms | p99 ms |"
echo "|---|---|---|---|---|"
printf '%s\n' "${TABLE[@]}"
