#!/usr/bin/env bash
# The main job on a fresh machine: installs the packages, builds the example
# programs with the release preset and runs the quickstart (a small residual
# network learning to segment a synthetic sphere on the CPU). Arguments are
# passed to stunet-quickstart. Works from any directory.
#
# Environment: STUNET_SKIP_DEPS=1 skips install-deps.sh; STUNET_JOBS
# (default 2) sets the build parallelism; CCACHE_DIR (default ~/.cache/ccache).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

section() { printf '\n==== %s ====\n' "$*"; }

section "dependencies"
if [[ "${STUNET_SKIP_DEPS:-0}" == 1 ]]; then
  echo "STUNET_SKIP_DEPS=1: not checking packages"
else
  bash cmake/scripts/install-deps.sh
fi

export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$root}"
mkdir -p "$CCACHE_DIR"

section "configure (cmake --preset release)"
cmake --preset release

section "build the examples"
# examples/all: every target under examples/ (the Ninja generator's per-directory target).
cmake --build --preset release -j "${STUNET_JOBS:-2}" --target examples/all

section "run build/release/examples/stunet-quickstart${*:+ $*}"
exec "$root/build/release/examples/stunet-quickstart" "$@"
