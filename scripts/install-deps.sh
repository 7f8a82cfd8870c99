#!/bin/bash
# Installs every Debian package layerd needs to build, test and run (clang-16: GCC 12
# miscompiles coroutines, see docs/compiler.md; libclang-rt-16-dev: its sanitizer runtimes).
# Idempotent: when all are present it does nothing at all (no apt-get), so it is cheap to call
# before every build.
set -euo pipefail

packages=(
  liburing-dev libarchive-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libhttp-parser-dev
  libcli11-dev libuv1-dev libgtest-dev libgmock-dev libbenchmark-dev libsystemd-dev
  meson ninja-build pkg-config clang-16 libclang-rt-16-dev python3
  fuse-overlayfs fuse3 curl busybox-static libarchive-tools docker.io
)

missing=()
for package in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages are installed"
  exit 0
fi

sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)
echo "install-deps: installing ${missing[*]}"

# Installing a package must not start its service here (docker.io would start dockerd, and
# fails to where no init system runs): deny service starts for the duration, unless the
# machine already has its own policy.
policy=/usr/sbin/policy-rc.d
own_policy=false
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod 0755 "$policy"
  own_policy=true
fi
remove_policy() { if $own_policy; then "${sudo[@]}" rm -f "$policy"; fi; }
trap remove_policy EXIT

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update
"${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
