#!/bin/bash
# Installs what is missing, builds, and runs every test suite (unit, integration, stress: all
# that meson knows), then the unit suite again in an AddressSanitizer/UBSan build. Exits non-zero
# if anything failed; failing tests' logs are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
# GCC 12 miscompiles coroutines (docs/compiler.md): build with clang-16.
export CXX=${CXX:-clang++-16}

bash scripts/install-deps.sh || exit 1

jobs=$(nproc)
[ "$jobs" -gt 2 ] && jobs=2
passed=0
failed=0
skipped=0
status=0

# Runs `meson test` with the given arguments and adds its summary to the totals.
run_tests() {
  local build=$1
  shift
  local out
  out=$(mktemp)
  meson test -C "$build" --print-errorlogs --num-processes "$jobs" "$@" 2>&1 | tee "$out"
  local rc=${PIPESTATUS[0]}
  local ok fail skip timeout xpass
  ok=$(awk '/^Ok:/ {print $2}' "$out")
  fail=$(awk '/^Fail:/ {print $2}' "$out")
  skip=$(awk '/^Skipped:/ {print $2}' "$out")
  timeout=$(awk '/^Timeout:/ {print $2}' "$out")
  xpass=$(awk '/^Unexpected Pass:/ {print $3}' "$out")
  passed=$((passed + ${ok:-0}))
  failed=$((failed + ${fail:-0} + ${timeout:-0} + ${xpass:-0}))
  skipped=$((skipped + ${skip:-0}))
  if [ "$rc" -ne 0 ]; then
    status=1
    echo "test.sh: meson test $* in $build failed (exit $rc); full log: $build/meson-logs/testlog.txt"
  fi
  rm -f "$out"
}

build() {
  local dir=$1
  shift
  if [ ! -f "$dir/build.ninja" ]; then
    meson setup "$dir" "$@" || return 1
  fi
  ninja -C "$dir" -j "$jobs"
}

echo "=== build (debugoptimized) and all suites"
if build build-test --buildtype=debugoptimized --werror; then
  run_tests build-test
else
  echo "test.sh: build failed"
  status=1
  failed=$((failed + 1))
fi

echo "=== sanitizer build (-Dsanitize=true) and the unit suite"
if build build-asan --buildtype=debugoptimized --werror -Dsanitize=true -Dtools=false; then
  ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1} \
  UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
    run_tests build-asan --suite unit
else
  echo "test.sh: sanitizer build failed"
  status=1
  failed=$((failed + 1))
fi

echo "test.sh: $passed passed, $failed failed, $skipped skipped"
exit $status
