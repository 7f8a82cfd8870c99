#!/bin/bash
# The real layerd binary: starts with a temporary root/socket/run dir, answers /v1/health over
# its socket, and on SIGTERM exits 0 within a second with its socket file removed.
set -u
layerd=$1
fail() { echo "FAIL: $*"; [ -f "$dir/log" ] && sed 's/^/  layerd: /' "$dir/log"; exit 1; }
command -v curl >/dev/null || { echo "SKIP: curl is not installed"; exit 77; }

dir=$(mktemp -d /tmp/layerd-api-daemon.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
sock=$dir/layerd.sock

"$layerd" --root "$dir/root" --socket "$sock" --run-dir "$dir/run" --log-format json \
  >"$dir/log" 2>&1 &
pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || fail "socket $sock did not appear"

body=$(curl -sS --max-time 5 --unix-socket "$sock" -o - -w '\n%{http_code}' http://layerd/v1/health) \
  || fail "curl failed"
code=${body##*$'\n'}
json=${body%$'\n'*}
[ "$code" = 200 ] || fail "health answered $code: $json"
case $json in *'"status":"ok"'*) ;; *) fail "health body: $json" ;; esac

act=$(curl -sS --max-time 5 --unix-socket "$sock" -X POST http://layerd/Plugin.Activate)
[ "$act" = '{"Implements":["GraphDriver"]}' ] || fail "Plugin.Activate answered: $act"

mode=$(stat -c %a "$sock")
[ "$mode" = 660 ] || fail "socket mode is $mode, want 660"

start=$(date +%s%N)
kill -TERM "$pid"
for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.01; done
wait "$pid"
rc=$?
pid=
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$rc" = 0 ] || fail "exit status $rc after SIGTERM"
[ "$elapsed_ms" -lt 1000 ] || fail "took ${elapsed_ms} ms to exit after SIGTERM"
[ -e "$sock" ] && fail "socket file left behind"
grep -q '"level":"info"' "$dir/log" || fail "no JSON log lines"
echo "ok: health 200, Activate, mode 660, SIGTERM -> exit 0 in ${elapsed_ms} ms, socket removed"
