#!/bin/bash
# Mount storm: layerd against the direct limit, in the same run, alternating A B A B.
#
#   A: layerd: N read-write layers on an image of D layers (each mount has D lowers), all Got at
#      once over N connections (layerbench storm --on-image D -c N), then all Put.
#   B: the same fuse-overlayfs commands layerd runs (cwd at the home, relative l/ lowers),
#      daemonizing, spawned with `xargs -P P`, then `fusermount3 -u` with `xargs -P P`; P is the
#      best of PARALLELISMS, chosen by one calibration pass per size.
#
# Usage: bench/mount_storm.sh [BUILD_DIR]   (as root; env: SIZES, DEPTHS, ROUNDS, PARALLELISMS,
#        SCALE_LAYERS, SCALE_ROUNDS; SIZES= runs only the scale part)
# Prints one line per round and a markdown table of medians.
set -euo pipefail
BUILD=${1:-build}
SIZES=${SIZES-"100 500"}   # empty: only the scale run
DEPTHS=${DEPTHS:-"1 16"}
ROUNDS=${ROUNDS:-5}
PARALLELISMS=${PARALLELISMS:-"2 4 8 16"}
LAYERD=$BUILD/src/daemon/layerd
BENCH=$BUILD/tools/layerbench/layerbench
[ -x "$LAYERD" ] && [ -x "$BENCH" ] || { echo "build layerd and layerbench in $BUILD first" >&2; exit 2; }
LAYERD=$(realpath "$LAYERD"); BENCH=$(realpath "$BENCH")

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
start_layerd mount-storm
ROOT=$W/root

now() { date +%s.%N; }
mounted_count() { grep -c " $ROOT/$1-rw[0-9]*/merged " /proc/self/mountinfo || true; }

# A: one layerd storm; prints "mounts/s get_p50_ms get_p99_ms puts/s".
run_layerd() {
  local n=$1 d=$2 out
  out=$("$BENCH" -s "$W/sock" -c "$n" --json --health-interval 0 storm -n "$n" --on-image "$d" \
        --prefix "a$RANDOM")
  jq -r --argjson n "$n" '. as $r | ([.phases[] | {(.phase): .}] | add) as $p
    | if $r.errors != 0 then error("layerbench errors") else . end
    | "\($n / $p.get.seconds) \($p.get.ops.Get.p50_ms) \($p.get.ops.Get.p99_ms) \($n / $p.put.seconds)"' <<<"$out"
}

# The direct case's layers: made once per size by layerd itself (same layout), kept unmounted.
prepare_direct() {
  local n=$1 d=$2 prefix=$3 i
  "$BENCH" -s "$W/sock" -c 64 --health-interval 0 --keep storm -n "$n" --on-image "$d" --prefix "$prefix" >/dev/null
  : >"$W/$prefix.mount"; : >"$W/$prefix.umount"
  for i in $(seq 0 $((n - 1))); do
    local id=$prefix-rw$i
    echo "-o lowerdir=$(cat "$ROOT/$id/lower"),upperdir=$id/diff,workdir=$id/work $id/merged" >>"$W/$prefix.mount"
    echo "$ROOT/$id/merged" >>"$W/$prefix.umount"
    mkdir -p "$ROOT/$id/merged"
  done
}

# B: one direct storm at parallelism P; prints "mounts/s unmounts/s".
run_direct() {
  local n=$1 prefix=$2 p=$3 t0 t1 t2 m
  t0=$(now)
  (cd "$ROOT" && xargs -P "$p" -L 1 fuse-overlayfs <"$W/$prefix.mount" 2>/dev/null)
  t1=$(now)
  m=$(mounted_count "$prefix")
  [ "$m" -eq "$n" ] || { echo "direct: $m of $n mounted" >&2; exit 1; }
  xargs -P "$p" -n 1 fusermount3 -u <"$W/$prefix.umount"
  t2=$(now)
  awk -v n="$n" -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN {print n/(b-a), n/(c-b)}'
}

echo "# mount storm: $(nproc) cpus, $(uname -r), $(fuse-overlayfs --version 2>/dev/null | head -1), tmpfs, rounds $ROUNDS"
TABLE=()
for d in $DEPTHS; do
  for n in $SIZES; do
    prefix=direct-$n-$d
    prepare_direct "$n" "$d" "$prefix"
    best_p=0; best=0
    for p in $PARALLELISMS; do
      r=$(run_direct "$n" "$prefix" "$p" | awk '{print $1}')
      echo "calibrate n=$n d=$d P=$p: $r mounts/s"
      if awk -v a="$r" -v b="$best" 'BEGIN {exit !(a > b)}'; then best=$r; best_p=$p; fi
    done
    : >"$W/a"; : >"$W/b"
    for round in $(seq "$ROUNDS"); do
      a=$(run_layerd "$n" "$d"); echo "$a" >>"$W/a"
      b=$(run_direct "$n" "$prefix" "$best_p"); echo "$b" >>"$W/b"
      echo "round $round n=$n d=$d: layerd $a | direct(P=$best_p) $b"
    done
    la=$(awk '{print $1}' "$W/a" | median); p50=$(awk '{print $2}' "$W/a" | median)
    p99=$(awk '{print $3}' "$W/a" | median); lput=$(awk '{print $4}' "$W/a" | median)
    db=$(awk '{print $1}' "$W/b" | median); dput=$(awk '{print $2}' "$W/b" | median)
    TABLE+=("$(awk -v n="$n" -v d="$d" -v la="$la" -v p50="$p50" -v p99="$p99" -v lput="$lput" \
      -v db="$db" -v dput="$dput" -v p="$best_p" 'BEGIN {printf "| %d | %d | %.0f | %.1f | %.1f | %.0f (P=%d) | %.2fx | %.0f | %.0f |", n, d, la, p50, p99, db, p, la/db, lput, dput}')")
  done
done
echo
echo "| layers | lowers | layerd mounts/s | Get p50 ms | Get p99 ms | direct mounts/s | ratio | layerd Puts/s | direct fusermount3 -u /s |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${TABLE[@]}"

# Scale: SCALE_LAYERS (default 1000; 0 skips) read-write layers on a 1-layer image mounted at
# once over as many connections, health probed every 5 ms on its own connection, layerd's RSS
# and fds sampled every 50 ms. Prints RSS and fds at start and at the peak, per mounted layer.
SCALE_LAYERS=${SCALE_LAYERS:-1000}
if [ "$SCALE_LAYERS" -gt 0 ]; then
  echo
  echo "| round | layers | RSS start MiB | RSS max MiB | KiB/mount | fds start | fds max | fds/mount | health p50 ms | health p99 ms | health max ms | mounts/s |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  for round in $(seq "${SCALE_ROUNDS:-3}"); do
    "$BENCH" -s "$W/sock" -c "$SCALE_LAYERS" --json --health-interval 5 --sample-interval 50 \
      storm -n "$SCALE_LAYERS" --on-image 1 --prefix "s$round" | jq -r --arg r "$round" '
      . as $x | ([.phases[] | {(.phase): .}] | add) as $p | .params.layers as $n | .daemon as $d
      | "| \($r) | \($n) | \($d.rss_start_bytes/1048576*10|round/10) | \($d.rss_max_bytes/1048576*10|round/10) | \(($d.rss_max_bytes-$d.rss_start_bytes)/1024/$n*10|round/10) | \($d.fds_start) | \($d.fds_max) | \((($d.fds_max-$d.fds_start)/$n*100|round)/100) | \(.health.p50_ms) | \(.health.p99_ms) | \(.health.max_ms) | \($n/$p.get.seconds|round) |"'
  done
fi
