# Shared by tests/e2e/dockerd_e2e.sh and bench/dockerd_side_by_side.sh: starts and stops a
# layerd and private dockerds (own data root, exec root, pidfile and API socket; no bridge, no
# iptables) under one temporary directory $T, and tears down everything by pid.
#
# The caller sets T (an empty directory) and LAYERD (the binary), sources this file, and calls
# e2e_teardown from its EXIT trap.

# Docker's own 20.10 CLI when there is one: /usr/local/bin may hold a newer CLI first in PATH.
if [ -x /usr/bin/docker ]; then DOCKER_CLI=/usr/bin/docker; else DOCKER_CLI=$(command -v docker); fi

# e2e_skip_unless_possible: exit 77 (meson's skip) when this machine cannot run dockerd here.
e2e_skip_unless_possible() {
  if [ "$(id -u)" != 0 ]; then echo "SKIP: needs root (dockerd, FUSE mounts)"; exit 77; fi
  if [ ! -c /dev/fuse ]; then echo "SKIP: no /dev/fuse"; exit 77; fi
  if ! command -v dockerd >/dev/null; then
    echo "SKIP: no dockerd (apt-get install docker.io; scripts/install-deps.sh lists it)"; exit 77
  fi
  if [ -z "$DOCKER_CLI" ]; then echo "SKIP: no docker CLI"; exit 77; fi
  if ! command -v fuse-overlayfs >/dev/null; then echo "SKIP: no fuse-overlayfs"; exit 77; fi
  if ! command -v python3 >/dev/null; then echo "SKIP: no python3"; exit 77; fi
  if [ ! -x /bin/busybox ] || ! /bin/busybox --list | grep -qx sh; then
    echo "SKIP: no static busybox (apt-get install busybox-static)"; exit 77
  fi
  if ! file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' &&
     ldd /bin/busybox >/dev/null 2>&1; then
    echo "SKIP: /bin/busybox is not static (apt-get install busybox-static)"; exit 77
  fi
}

# The plugin name: dockerd finds a legacy plugin only at /run/docker/plugins/NAME.sock, a path
# shared by the whole machine. "layerd" unless another layerd already serves that socket, in
# which case a name of our own (so two runs never steal each other's socket).
e2e_pick_plugin_name() {
  PLUGIN=${E2E_PLUGIN_NAME:-layerd}
  if [ -S "/run/docker/plugins/$PLUGIN.sock" ] &&
     curl -s -m 2 --unix-socket "/run/docker/plugins/$PLUGIN.sock" -X POST \
       http://x/Plugin.Activate >/dev/null 2>&1; then
    PLUGIN="layerde2e$$"
  fi
  PLUGIN_SOCK=/run/docker/plugins/$PLUGIN.sock
}

LAYERD_PID=
LAYERD_ARGS=()
# start_layerd: starts layerd (or again, with the same flags) and waits until its plugin socket
# answers Plugin.Activate.
start_layerd() {
  mkdir -p /run/docker/plugins
  LAYERD_ARGS=(--root "$T/layerd-root" --run-dir "$T/layerd-run" --socket "$T/layerd.sock"
               --docker-plugin-socket "$PLUGIN_SOCK" --log-level "${LAYERD_LOG_LEVEL:-debug}")
  "$LAYERD" "${LAYERD_ARGS[@]}" >>"$T/layerd.log" 2>&1 &
  LAYERD_PID=$!
  local i
  for i in $(seq 100); do
    if curl -s -m 2 --unix-socket "$PLUGIN_SOCK" -X POST http://x/Plugin.Activate 2>/dev/null |
       grep -q GraphDriver; then
      return 0
    fi
    kill -0 "$LAYERD_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "layerd did not come up; its log:"; tail -20 "$T/layerd.log"
  return 1
}

# stop_pid PID [SECONDS]: SIGTERM, wait, then SIGKILL.
stop_pid() {
  local pid=$1 wait=${2:-20} i
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq $((wait * 10))); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "pid $pid ignored SIGTERM for ${wait}s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null
  sleep 0.2
}

stop_layerd() {
  stop_pid "$LAYERD_PID" 20
  wait "$LAYERD_PID" 2>/dev/null
  LAYERD_PID=
}

# Private dockerds by name: DOCKERD_PID[name], their directories under $T/NAME.
declare -A DOCKERD_PID=()
declare -A DOCKERD_ARGS=()

# start_dockerd NAME STORAGE_DRIVER [EXTRA DOCKERD FLAGS...]: starts a private dockerd (it starts
# its own managed containerd) and waits until its API answers.
start_dockerd() {
  local name=$1 driver=$2
  shift 2
  local dir=$T/$name
  mkdir -p "$dir"
  local args=(--experimental --storage-driver="$driver" --data-root "$dir/data"
              --exec-root "$dir/exec" --pidfile "$dir/docker.pid" -H "unix://$dir/docker.sock"
              --bridge=none --iptables=false --ip6tables=false "$@")
  DOCKERD_ARGS[$name]="${args[*]}"
  dockerd "${args[@]}" >>"$dir/dockerd.log" 2>&1 &
  DOCKERD_PID[$name]=$!
  wait_dockerd "$name" "did not come up"
}

# restart_dockerd NAME: SIGTERM and start again with the same flags.
restart_dockerd() {
  local name=$1 dir=$T/$1
  stop_dockerd "$name"
  # shellcheck disable=SC2086 # the saved flags hold no spaces (temporary paths)
  dockerd ${DOCKERD_ARGS[$name]} >>"$dir/dockerd.log" 2>&1 &
  DOCKERD_PID[$name]=$!
  wait_dockerd "$name" "did not come back"
}

# wait_dockerd NAME WHAT: until dockerd NAME answers (about 30 s), or report WHAT with its log.
wait_dockerd() {
  local name=$1 dir=$T/$1 i
  for i in $(seq 300); do
    if "$DOCKER_CLI" -H "unix://$dir/docker.sock" version >/dev/null 2>&1; then return 0; fi
    kill -0 "${DOCKERD_PID[$name]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "dockerd $name $2; its log:"; grep -v module=grpc "$dir/dockerd.log" | tail -20
  return 1
}

# containerd_pid NAME: the pid of the containerd that dockerd NAME manages (it writes a pidfile).
containerd_pid() {
  cat "$T/$1/exec/containerd/containerd.pid" 2>/dev/null
}

stop_dockerd() {
  local name=$1 pid=${DOCKERD_PID[$1]:-} cpid
  cpid=$(containerd_pid "$name")
  stop_pid "$pid" 30
  wait "$pid" 2>/dev/null
  # dockerd stops its managed containerd on the way out; a SIGKILLed one cannot.
  stop_pid "$cpid" 10
  DOCKERD_PID[$name]=
}

# dk NAME ARGS...: the docker CLI against dockerd NAME.
dk() {
  local name=$1
  shift
  "$DOCKER_CLI" -H "unix://$T/$name/docker.sock" "$@"
}

# pids_referencing DIR: processes whose command line names DIR (containerd shims, fuse-overlayfs
# servers left by a failed step): those this run started, found by pid.
pids_referencing() {
  local dir=$1 p
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = "$$" ] && continue
    if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -- "$dir/"; then echo "${p#/proc/}"; fi
  done
}

# e2e_teardown: containers, dockerds, their containerds and shims, layerd, FUSE servers and
# mounts under $T, the plugin socket; then $T itself. Leaves no mount behind.
e2e_teardown() {
  local name pid m
  for name in "${!DOCKERD_PID[@]}"; do
    [ -n "${DOCKERD_PID[$name]}" ] || continue
    # --live-restore would leave containers running past dockerd: remove them first.
    dk "$name" ps -aq 2>/dev/null | xargs -r "$DOCKER_CLI" -H "unix://$T/$name/docker.sock" rm -f >/dev/null 2>&1
    stop_dockerd "$name"
  done
  stop_layerd
  for pid in $(pids_referencing "$T"); do
    echo "teardown: killing leftover pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-160)"
    kill -KILL "$pid" 2>/dev/null
  done
  # Deepest first, so nested mounts go before their parents.
  for m in $(awk -v t="$T/" 'index($2, t) == 1 { print $2 }' /proc/self/mounts | sort -r); do
    echo "teardown: unmounting leftover $m"
    umount -l "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null
  done
  [ -n "${PLUGIN_SOCK:-}" ] && [ "$PLUGIN" != layerd ] && rm -f "$PLUGIN_SOCK"
  if awk -v t="$T/" 'index($2, t) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
    echo "teardown: mounts remain under $T:"; grep -F " $T/" /proc/self/mounts
    return 1
  fi
  if [ -z "${E2E_KEEP:-}" ]; then rm -rf "$T"; else echo "kept $T"; fi
}
