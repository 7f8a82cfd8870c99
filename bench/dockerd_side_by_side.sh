#!/bin/bash
# dockerd 20.10 with layerd as its storage driver against dockerd's built-in fuse-overlayfs
# driver, the same workload in one run, alternating the two (A B A B):
#   load    `docker load` of a 20,000-file image (busybox layer + 20,000 files of 200 bytes)
#   start30 30 containers of that image started in parallel (`docker run -d` x 30 via xargs -P 30)
#   diff    `docker diff` of a stopped container that changed 3 files over that image
#   commit  `docker commit` of that container
# Prints every measurement, then medians (min-max) and the ratios built-in / layerd.
#
# usage: bench/dockerd_side_by_side.sh LAYERD [ROUNDS]
# env: BENCH_FS=tmpfs (default: data roots on /dev/shm) or ext4 (a fresh ext4 image on a loop
#      device: see BENCHMARKING.md's trap about deletions on the root ext4); BENCH_FILES=20000.
set -u

LAYERD=${1:?usage: dockerd_side_by_side.sh LAYERD [ROUNDS]}
ROUNDS=${2:-3}
FILES=${BENCH_FILES:-20000}
FS=${BENCH_FS:-tmpfs}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../tests/e2e/lib.sh
. "$HERE/../tests/e2e/lib.sh"
e2e_skip_unless_possible
LAYERD=$(realpath "$LAYERD")

LOOP_MOUNT=
case "$FS" in
  tmpfs) T=$(mktemp -d /dev/shm/layerd-bench-XXXXXX) ;;
  ext4)
    IMG=$(mktemp /tmp/layerd-bench-XXXXXX.ext4)
    truncate -s 8G "$IMG"
    mkfs.ext4 -q -F "$IMG"
    T=$(mktemp -d /tmp/layerd-bench-XXXXXX)
    mount -o loop "$IMG" "$T"
    LOOP_MOUNT=$T
    ;;
  *) echo "BENCH_FS must be tmpfs or ext4"; exit 2 ;;
esac
finish() {
  if [ -n "$LOOP_MOUNT" ]; then
    # e2e_teardown removes $T's contents but not the loop mount itself.
    E2E_KEEP=1 e2e_teardown >/dev/null
    umount "$LOOP_MOUNT" && rmdir "$LOOP_MOUNT" && rm -f "$IMG"
  else
    e2e_teardown
  fi
}
trap finish EXIT
e2e_pick_plugin_name

echo "generating a $FILES-file image"
python3 "$HERE/../tests/e2e/make_image.py" files "$T/many.tar" many:1 /bin/busybox "$FILES" || exit 1
LAYERD_LOG_LEVEL=info start_layerd || exit 1
start_dockerd layerd "$PLUGIN" || exit 1
start_dockerd builtin fuse-overlayfs || exit 1

now() { date +%s.%N; }
declare -A RESULTS=()
# record DRIVER METRIC START: appends the seconds since START.
record() {
  local t
  t=$(awk -v a="$3" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
  RESULTS[$1.$2]+="$t "
  printf '  %-8s %-8s %7s s\n' "$1" "$2" "$t"
}

# round DRIVER: one pass of the workload against dockerd DRIVER, leaving it as it found it.
round() {
  local n=$1 t0 sock="unix://$T/$1/docker.sock"
  t0=$(now)
  dk "$n" load -i "$T/many.tar" >/dev/null || echo "load failed on $n"
  record "$n" load "$t0"

  t0=$(now)
  seq 30 | xargs -P 30 -I{} "$DOCKER_CLI" -H "$sock" run -d --name par{} --network none many:1 \
    sleep 600 >/dev/null || echo "parallel start failed on $n"
  record "$n" start30 "$t0"
  [ "$(dk "$n" ps -q | wc -l)" = 30 ] || echo "only $(dk "$n" ps -q | wc -l) of 30 running on $n"
  dk "$n" ps -aq | xargs -r -P 30 -n 1 "$DOCKER_CLI" -H "$sock" rm -f >/dev/null

  dk "$n" run --name changed --network none many:1 sh -c \
    'echo changed >>/many/d000/f00000 && echo new >/many/new && rm /many/d050/f10000' ||
    echo "the changing container failed on $n"
  t0=$(now)
  dk "$n" diff changed >"$T/$n.diff"
  record "$n" diff "$t0"
  [ "$(wc -l <"$T/$n.diff")" -ge 3 ] || echo "diff on $n: $(cat "$T/$n.diff")"
  t0=$(now)
  dk "$n" commit changed many:committed >/dev/null || echo "commit failed on $n"
  record "$n" commit "$t0"
  dk "$n" rm changed >/dev/null
  dk "$n" rmi many:committed many:1 >/dev/null
}

echo "data roots on $FS ($T); $ROUNDS rounds, alternating layerd and the built-in driver"
for r in $(seq "$ROUNDS"); do
  echo "round $r"
  round layerd
  round builtin
done

# stats "v1 v2 ...": median (min-max)
stats() {
  echo "$1" | tr ' ' '\n' | grep . | sort -g | awk '
    { v[NR] = $1 }
    END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
          printf "%.2f (%.2f-%.2f)", m, v[1], v[NR] }'
}
median() { stats "$1" | cut -d' ' -f1; }

echo
echo "| step ($FILES-file image, $FS, $ROUNDS rounds) | layerd, s | built-in fuse-overlayfs, s | built-in / layerd |"
echo "|---|---|---|---|"
for m in load start30 diff commit; do
  l=${RESULTS[layerd.$m]}
  b=${RESULTS[builtin.$m]}
  ratio=$(awk -v a="$(median "$b")" -v b="$(median "$l")" 'BEGIN { printf "%.1fx", a / b }')
  echo "| $m | $(stats "$l") | $(stats "$b") | $ratio |"
done
