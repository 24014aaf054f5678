#!/usr/bin/env bash
# Builds stunet (release preset) and runs every test: the CPU suites, the
# CUDA suite (built when nvcc is present; skipped, not failed, without a GPU)
# and the package_consumer test (install + find_package, add_subdirectory).
# Exits non-zero on the first failure. Works from any directory.
#
# Environment: STUNET_SKIP_DEPS=1 skips install-deps.sh (machines without
# network access that already have the packages); STUNET_JOBS (default 2)
# sets the build parallelism; CCACHE_DIR (default ~/.cache/ccache).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

start=$SECONDS
section() { printf '\n==== %s ==== (%ds)\n' "$*" "$((SECONDS - start))"; }

section "dependencies"
if [[ "${STUNET_SKIP_DEPS:-0}" == 1 ]]; then
  echo "STUNET_SKIP_DEPS=1: not checking packages"
else
  bash cmake/scripts/install-deps.sh
fi

export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$root}"  # cache hits across clones in other directories
mkdir -p "$CCACHE_DIR"
if command -v ccache >/dev/null 2>&1; then ccache --zero-stats >/dev/null; fi

section "configure (cmake --preset release)"
cmake --preset release

section "build (cmake --build --preset release -j ${STUNET_JOBS:-2})"
cmake --build --preset release -j "${STUNET_JOBS:-2}"

section "test (ctest --preset release)"
ctest --preset release

section "ccache"
if command -v ccache >/dev/null 2>&1; then ccache --show-stats || true; fi

section "all tests passed"
