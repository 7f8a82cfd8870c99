# Shared by the bench scripts (sourced): a throwaway layerd on tmpfs and a median helper.
#
# start_layerd NAME: makes $W (a directory under /dev/shm: see BENCHMARKING.md's traps), starts
# $LAYERD with its root, socket and run dir there, waits for the socket, and installs an EXIT
# trap that stops layerd, lazily unmounts whatever is left under $W/root and removes $W.
# Needs LAYERD set; sets W and LPID.
start_layerd() {
  W=$(mktemp -d "/dev/shm/$1-XXXXXX")
  LPID=
  trap stop_layerd EXIT
  ulimit -n 65536 2>/dev/null || true
  "$LAYERD" --root "$W/root" --socket "$W/sock" --run-dir "$W/run" --log-level warn \
    2>"$W/layerd.log" &
  LPID=$!
  for _ in $(seq 100); do [ -S "$W/sock" ] && break; sleep 0.05; done
  [ -S "$W/sock" ] || { echo "layerd did not start:" >&2; cat "$W/layerd.log" >&2; exit 1; }
}

stop_layerd() {
  [ -n "${LPID:-}" ] && kill "$LPID" 2>/dev/null && wait "$LPID" 2>/dev/null || true
  grep -o " $W/root/[^ ]*/merged " /proc/self/mountinfo | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$W"
}

# Median of the numbers on stdin, one per line.
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
