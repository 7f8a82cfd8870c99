#!/bin/bash
# layerd as an unprivileged user inside a user namespace, as rootless Docker runs it:
#   setpriv (uid/gid 65534, no capabilities) -> unshare -Urm (a user namespace where that user
#   is "root", with its own mount namespace) -> layerd, layerctl and every mount inside it.
# Needs root to set it up (to drop to nobody), /dev/fuse and user namespaces; exits 77 (skipped)
# otherwise. /dev/fuse must be usable by nobody: most distributions ship it 0666; where it is
# not (this CI's machine has 0600), the test opens it up for its own duration and restores it.
set -euo pipefail
layerd=$(realpath "$1")
layerctl=$(realpath "$2")

skip() { echo "SKIP: $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root to drop to an unprivileged user"
[ -c /dev/fuse ] || skip "needs /dev/fuse"
command -v fuse-overlayfs >/dev/null || skip "needs fuse-overlayfs"
command -v setpriv >/dev/null && command -v unshare >/dev/null || skip "needs setpriv and unshare"
setpriv --reuid=65534 --regid=65534 --clear-groups unshare -Ur true 2>/dev/null ||
  skip "unprivileged user namespaces are disabled"

work=$(mktemp -d /tmp/layerd-rootless.XXXXXX)
fuse_mode=$(stat -c %a /dev/fuse)
cleanup() {
  chmod "$fuse_mode" /dev/fuse
  rm -rf "$work"
}
trap cleanup EXIT
chmod 0755 "$work"
mkdir "$work/state"
chown 65534:65534 "$work/state"
chmod 0666 /dev/fuse

# Everything below runs as nobody inside its own user and mount namespaces.
setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all \
  unshare -Urm env LAYERD="$layerd" LAYERCTL="$layerctl" S="$work/state" bash -euo pipefail -c '
  fail() { echo "FAIL: $*" >&2; exit 1; }
  ctl() { "$LAYERCTL" --socket "$S/layerd.sock" "$@"; }
  "$LAYERD" --root "$S/home" --socket "$S/layerd.sock" --run-dir "$S/run" --log-level debug \
    2> "$S/layerd.log" &
  pid=$!
  for _ in $(seq 100); do [ -S "$S/layerd.sock" ] && break; sleep 0.05; done
  ctl health >/dev/null || { cat "$S/layerd.log"; fail "layerd did not start"; }

  ctl create base
  mkdir -p "$S/home/base/diff/etc"
  echo "from base" > "$S/home/base/diff/etc/hello"
  echo "doomed" > "$S/home/base/diff/doomed"
  ctl create-rw ctr --parent base
  dir=$(ctl mount ctr)
  [ "$dir" = "$S/home/ctr/merged" ] || fail "mount answered $dir"
  grep -q fuse-overlayfs <(grep " $dir " /proc/self/mountinfo) || fail "$dir is not a FUSE mount"
  [ "$(cat "$dir/etc/hello")" = "from base" ] || fail "lower content not visible"
  echo "written" > "$dir/new"
  rm "$dir/doomed"
  [ -f "$S/home/ctr/diff/new" ] || fail "a write did not land in the upper dir"
  [ ! -e "$dir/doomed" ] || fail "a deleted lower file is still visible"
  # Unprivileged, fuse-overlayfs cannot mknod a 0/0 whiteout: it must record the deletion in a
  # form layerd exports as AUFS .wh.doomed.
  ctl changes ctr --parent base | tee "$S/changes"
  grep -qx "D /doomed" "$S/changes" || fail "Changes does not report the deletion"
  grep -qx "A /new" "$S/changes" || fail "Changes does not report the new file"
  ctl diff ctr --parent base -o "$S/ctr.tar"
  tar -tf "$S/ctr.tar" | grep -qx ".wh.doomed" || fail "Diff lacks the .wh.doomed whiteout"

  # A layer applied from that diff, mounted through its own chain.
  ctl create img2 --parent base
  ctl apply img2 --parent base -i "$S/ctr.tar" --no-progress >/dev/null
  ctl create-rw ctr2 --parent img2
  dir2=$(ctl mount ctr2)
  [ "$(cat "$dir2/new")" = "written" ] || fail "applied layer content not visible"
  [ ! -e "$dir2/doomed" ] || fail "applied whiteout does not hide the lower file"

  ctl umount ctr2
  ctl umount ctr
  grep -q " $dir " /proc/self/mountinfo && fail "$dir still mounted after the last Put"
  ctl rm ctr
  kill -TERM "$pid"
  wait "$pid" || fail "layerd exited with $?"
  echo "rootless: ok"
'
# Outside the namespace: the store belongs to nobody, so no privilege was used to write it.
owner=$(stat -c %u "$work/state/home/base/diff/etc/hello")
[ "$owner" = 65534 ] || { echo "FAIL: files owned by uid $owner, not 65534"; exit 1; }
echo "PASS"
