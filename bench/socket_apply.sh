#!/bin/bash
# ApplyDiff and Diff through layerd's socket, as dockerd uses them (ApplyDiff: POST with a chunked
# tar body), against the same work without a daemon in the same run: `cat layer.tar > file` for a
# 1 GiB layer of 8 files; GNU `tar -xf` for 20,000 files of 200 bytes in 100 directories and for
# 20,000 empty directories in 100 directories; GNU `tar -c` of the small-file layer's directory
# for its Diff. Rounds alternate (layerd, peer, layerd, peer, ...); medians with min and max.
# Everything on tmpfs (/dev/shm).
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
mkdir -p "$W/src/big" "$W/src/small" "$W/src/dirs"
head -c $((128 << 20)) /dev/urandom >"$W/src/big/f0"
for i in 1 2 3 4 5 6 7; do cp "$W/src/big/f0" "$W/src/big/f$i"; done
python3 -c '
import os, sys
small, dirs = sys.argv[1], sys.argv[2]
for i in range(20000):
    d = os.path.join(small, "d%d" % (i // 200))
    if i % 200 == 0:
        os.mkdir(d)
    with open(os.path.join(d, "f%d" % i), "wb") as f:
        f.write(b"s" * 200)
    os.makedirs(os.path.join(dirs, "d%d" % (i // 200), "s%d" % i))
' "$W/src/small" "$W/src/dirs"
tar -cf "$W/big.tar" -C "$W/src/big" .
tar -cf "$W/small.tar" -C "$W/src/small" .
tar -cf "$W/dirs.tar" -C "$W/src/dirs" .
rm -rf "$W/src"
BIG_MB=$(( $(stat -c %s "$W/big.tar") / 1000000 ))

call() {  # call METHOD JSON
  curl -sf --unix-socket "$W/sock" -X POST -d "$2" "http://layerd/GraphDriver.$1"
}
# apply_diff ID TAR [keep]: prints seconds; fails unless the answer has an empty Err. The layer is
# removed afterwards unless `keep`.
apply_diff() {
  call Create "{\"ID\":\"$1\",\"Parent\":\"\"}" >/dev/null
  local out
  out=$(curl -sf --unix-socket "$W/sock" -X POST -H 'Transfer-Encoding: chunked' -T "$2" \
    -w '\n%{time_total}' "http://layerd/GraphDriver.ApplyDiff?id=$1&parent=")
  grep -q '"Err":""' <<<"$out" || { echo "ApplyDiff $1 failed: $out" >&2; exit 1; }
  tail -n1 <<<"$out"
  [ "${3:-}" = keep ] || call Remove "{\"ID\":\"$1\"}" >/dev/null
}
# diff_layer ID: prints seconds of a Diff streamed to /dev/null.
diff_layer() {
  curl -sf --unix-socket "$W/sock" -X POST -d "{\"ID\":\"$1\",\"Parent\":\"\"}" -o /dev/null \
    -w '%{time_total}\n' "http://layerd/GraphDriver.Diff"
}
seconds() {  # seconds COMMAND...: wall time of the command
  local start end
  start=$(date +%s.%N); "$@"; end=$(date +%s.%N)
  echo "$end - $start" | bc
}
cat_big() { cat "$W/big.tar" >"$W/cat.out"; }
untar() { mkdir "$W/x" && tar -xf "$1" -C "$W/x"; }
tar_c() { tar -cf - -C "$W/root/small/diff" . | cat >/dev/null; }

echo "# ApplyDiff and Diff through the socket: $(nproc) cpus, $(uname -r), rounds $ROUNDS, load $(cut -d' ' -f1-3 /proc/loadavg)"
for f in layerd_big cat layerd_small tar layerd_dirs tar_dirs layerd_diff tar_c; do : >"$W/t.$f"; done
for round in $(seq "$ROUNDS"); do
  a=$(apply_diff "big$round" "$W/big.tar"); echo "$a" >>"$W/t.layerd_big"
  c=$(seconds cat_big); rm -f "$W/cat.out"; echo "$c" >>"$W/t.cat"
  s=$(apply_diff "small$round" "$W/small.tar"); echo "$s" >>"$W/t.layerd_small"
  t=$(seconds untar "$W/small.tar"); rm -rf "$W/x"; echo "$t" >>"$W/t.tar"
  d=$(apply_diff "dirs$round" "$W/dirs.tar"); echo "$d" >>"$W/t.layerd_dirs"
  e=$(seconds untar "$W/dirs.tar"); rm -rf "$W/x"; echo "$e" >>"$W/t.tar_dirs"
  echo "round $round: big ApplyDiff ${a}s, cat ${c}s; small ApplyDiff ${s}s, tar -xf ${t}s; dirs ApplyDiff ${d}s, tar -xf ${e}s"
done
# Diff of the small-file layer (applied once more and kept) against tar -c of its directory.
apply_diff small "$W/small.tar" keep >/dev/null
for round in $(seq "$ROUNDS"); do
  d=$(diff_layer small); echo "$d" >>"$W/t.layerd_diff"
  c=$(seconds tar_c); echo "$c" >>"$W/t.tar_c"
  echo "round $round: small Diff ${d}s, tar -c ${c}s"
done

# rate FILE UNITS: "median (min-max)" of UNITS / seconds.
rate() {
  local rates
  rates=$(awk -v u="$2" '{printf "%.0f\n", u / $1}' "$1")
  printf '%s (%s-%s)' "$(median <<<"$rates")" "$(sort -g <<<"$rates" | head -n1)" "$(sort -g <<<"$rates" | tail -n1)"
}
ratio() { echo "scale=2; $(awk '{print 1 / $1}' "$1" | median) / $(awk '{print 1 / $1}' "$2" | median)" | bc; }
echo
echo "| layer | layerd through the socket | peer, same machine, same run | ratio |"
echo "|---|---|---|---|"
echo "| ApplyDiff, 1 GiB in 8 files (MB/s) | $(rate "$W/t.layerd_big" "$BIG_MB") | \`cat layer.tar > file\`: $(rate "$W/t.cat" "$BIG_MB") | $(ratio "$W/t.layerd_big" "$W/t.cat")x |"
echo "| ApplyDiff, 20,000 files of 200 bytes (files/s) | $(rate "$W/t.layerd_small" 20000) | GNU \`tar -xf\`: $(rate "$W/t.tar" 20000) | $(ratio "$W/t.layerd_small" "$W/t.tar")x |"
echo "| ApplyDiff, 20,000 empty directories (entries/s) | $(rate "$W/t.layerd_dirs" 20100) | GNU \`tar -xf\`: $(rate "$W/t.tar_dirs" 20100) | $(ratio "$W/t.layerd_dirs" "$W/t.tar_dirs")x |"
echo "| Diff of the 20,000-file layer (files/s) | $(rate "$W/t.layerd_diff" 20000) | GNU \`tar -c\`: $(rate "$W/t.tar_c" 20000) | $(ratio "$W/t.layerd_diff" "$W/t.tar_c")x |"
