#!/bin/bash
# Installs what is missing, builds a release layerd, and runs it in the foreground with its
# built-in defaults (root /var/lib/layerd, socket /run/layerd/layerd.sock). Extra arguments go
# to layerd: scripts/run.sh --docker-plugin-socket --log-level debug
set -euo pipefail
cd "$(dirname "$0")/.."
# GCC 12 miscompiles coroutines (docs/compiler.md): build with clang-16.
export CXX=${CXX:-clang++-16}

bash scripts/install-deps.sh >&2
if [ ! -f build-release/build.ninja ]; then
  meson setup build-release --buildtype=release -Dtests=false -Dtools=false >&2
fi
ninja -C build-release src/daemon/layerd >&2
exec build-release/src/daemon/layerd "$@"
