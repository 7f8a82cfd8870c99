#!/bin/bash
# ApplyDiff through layerd's socket, as dockerd sends it (POST with a chunked tar body), against
# the same work without a daemon in the same run: `cat layer.tar > file` for a 1 GiB layer of 8
# files, GNU `tar -xf` for 20,000 files of 200 bytes in 100 directories. Rounds alternate
# (layerd, peer, layerd, peer, ...); medians with min and max. Everything on tmpfs (/dev/shm).
#
# Usage: bench/socket_apply.sh [BUILD_DIR]   (env: ROUNDS, default 5)
# Needs: curl (it streams the tar from the page cache, 64 KiB chunks), GNU tar, python3.
set -euo pipefail
BUILD=${1:-build}
ROUNDS=${ROUNDS:-5}
LAYERD=$(realpath "$BUILD/src/daemon/layerd")

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
start_layerd socket-apply

# The layers, built once (not timed).
mkdir -p "$W/src/big" "$W/src/small"
head -c $((128 << 20)) /dev/urandom >"$W/src/big/f0"
for i in 1 2 3 4 5 6 7; do cp "$W/src/big/f0" "$W/src/big/f$i"; done
python3 - "$W/src/small" <<'EOF'
import os, sys
root = sys.argv[1]
for i in range(20000):
    d = os.path.join(root, "d%d" % (i // 200))
    if i % 200 == 0:
        os.mkdir(d)
    with open(os.path.join(d, "f%d" % i), "wb") as f:
        f.write(b"s" * 200)
EOF
tar -cf "$W/big.tar" -C "$W/src/big" .
tar -cf "$W/small.tar" -C "$W/src/small" .
rm -rf "$W/src"
BIG_MB=$(( $(stat -c %s "$W/big.tar") / 1000000 ))

call() {  # call METHOD JSON
  curl -sf --unix-socket "$W/sock" -X POST -d "$2" "http://layerd/GraphDriver.$1"
}
# apply_diff ID TAR: prints seconds; fails unless the answer has an empty Err.
apply_diff() {
  call Create "{\"ID\":\"$1\",\"Parent\":\"\"}" >/dev/null
  local out
  out=$(curl -sf --unix-socket "$W/sock" -X POST -H 'Transfer-Encoding: chunked' -T "$2" \
    -w '\n%{time_total}' "http://layerd/GraphDriver.ApplyDiff?id=$1&parent=")
  grep -q '"Err":""' <<<"$out" || { echo "ApplyDiff $1 failed: $out" >&2; exit 1; }
  tail -n1 <<<"$out"
  call Remove "{\"ID\":\"$1\"}" >/dev/null
}
seconds() {  # seconds COMMAND...: wall time of the command
  local start end
  start=$(date +%s.%N); "$@"; end=$(date +%s.%N)
  echo "$end - $start" | bc
}
cat_big() { cat "$W/big.tar" >"$W/cat.out"; }
untar_small() { mkdir "$W/x" && tar -xf "$W/small.tar" -C "$W/x"; }

echo "# ApplyDiff through the socket: $(nproc) cpus, $(uname -r), rounds $ROUNDS, load $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$W/t.layerd_big"; : >"$W/t.cat"; : >"$W/t.layerd_small"; : >"$W/t.tar"
for round in $(seq "$ROUNDS"); do
  a=$(apply_diff "big$round" "$W/big.tar"); echo "$a" >>"$W/t.layerd_big"
  c=$(seconds cat_big); rm -f "$W/cat.out"; echo "$c" >>"$W/t.cat"
  s=$(apply_diff "small$round" "$W/small.tar"); echo "$s" >>"$W/t.layerd_small"
  t=$(seconds untar_small); rm -rf "$W/x"; echo "$t" >>"$W/t.tar"
  echo "round $round: big ApplyDiff ${a}s, cat ${c}s; small ApplyDiff ${s}s, tar -xf ${t}s"
done

# rate FILE UNITS: "median (min-max)" of UNITS / seconds.
rate() {
  local rates
  rates=$(awk -v u="$2" '{printf "%.0f\n", u / $1}' "$1")
  printf '%s (%s-%s)' "$(median <<<"$rates")" "$(sort -g <<<"$rates" | head -n1)" "$(sort -g <<<"$rates" | tail -n1)"
}
ratio() { echo "scale=2; $(awk -v u=1 '{print u / $1}' "$1" | median) / $(awk -v u=1 '{print u / $1}' "$2" | median)" | bc; }
echo
echo "| layer | layerd ApplyDiff over the socket | peer, same machine, same run | ratio |"
echo "|---|---|---|---|"
echo "| 1 GiB in 8 files (MB/s) | $(rate "$W/t.layerd_big" "$BIG_MB") | \`cat layer.tar > file\`: $(rate "$W/t.cat" "$BIG_MB") | $(ratio "$W/t.layerd_big" "$W/t.cat")x |"
echo "| 20,000 files of 200 bytes (files/s) | $(rate "$W/t.layerd_small" 20000) | GNU \`tar -xf\`: $(rate "$W/t.tar" 20000) | $(ratio "$W/t.layerd_small" "$W/t.tar")x |"
