#!/bin/bash
# Health-check latency under every layerbench scenario (issue 7's "health p99 under 10 ms during
# any scenario"): a fresh layerd on tmpfs, then each scenario with GET /v1/health probed every
# 5 ms on a connection of its own. Each scenario runs twice per round, alternated: with the
# prober's thread at niceness -10 (layerbench's default: the probe times layerd, not its own wait
# for a CPU behind the load it generates) and at 0 (as any other process). Prints one table row
# per scenario and prober niceness: medians over the rounds of p50, p99 and max.
#
# Usage: bench/health_under_load.sh [BUILD_DIR]   (env: ROUNDS, default 3; root for the mounts)
set -euo pipefail
BUILD=${1:-build}
ROUNDS=${ROUNDS:-3}
LAYERD=$(realpath "$BUILD/src/daemon/layerd")
BENCH=$(realpath "$BUILD/tools/layerbench/layerbench")
command -v jq >/dev/null || { echo "needs jq" >&2; exit 2; }

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
start_layerd health-load

# name | layerbench arguments (after the global options)
SCENARIOS=(
  "storm 1,000 mounts, 1,000 connections|-c 1000 storm -n 1000 --on-image 1"
  "churn 400 ops/s, 64 connections, 5 s|-c 64 churn -r 400 -t 5"
  "control 1,000 connections, 3 s|-c 1000 control -t 3"
  "apply 16 small-file layers, 8 connections|-c 8 apply -n 16 -k small"
  "apply 1 GiB layer|-c 1 apply -n 1 -k big --size 1073741824"
)

echo "# health under load: $(nproc) cpus, $(uname -r), tmpfs, rounds $ROUNDS, probes every 5 ms"
for round in $(seq "$ROUNDS"); do
  i=0
  for s in "${SCENARIOS[@]}"; do
    args=${s#*|}
    for nice in -10 0; do
      # shellcheck disable=SC2086
      "$BENCH" -s "$W/sock" --json --health-interval 5 --monitor-nice "$nice" --prefix "h$round-$i-${nice#-}" $args |
        jq -r --arg n "$nice" '
          if .errors != 0 then error("layerbench errors") else . end
          | "\(.health.p50_ms) \(.health.p99_ms) \(.health.max_ms) \(.health.prober_nice)"' \
        >>"$W/result-$i-${nice#-}"
    done
    i=$((i + 1))
  done
  echo "round $round done" >&2
done

echo
echo "| scenario | prober niceness | probes p50 ms | p99 ms | max ms |"
echo "|---|---|---|---|---|"
i=0
for s in "${SCENARIOS[@]}"; do
  for nice in -10 0; do
    f=$W/result-$i-${nice#-}
    printf '| %s | %s | %.2f | %.2f | %.2f |\n' "${s%%|*}" "$(awk '{print $4}' "$f" | sort -u | paste -sd/)" \
      "$(awk '{print $1}' "$f" | median)" "$(awk '{print $2}' "$f" | median)" "$(awk '{print $3}' "$f" | median)"
  done
  i=$((i + 1))
done
