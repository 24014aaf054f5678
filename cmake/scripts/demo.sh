#!/usr/bin/env bash
# The main job on a fresh machine: installs the packages, builds stunet-demo
# with the release preset and runs it: synthetic CT phantoms, pretraining of a
# small STU-Net, fine-tuning on a few downstream cases against the same model
# trained from scratch, prediction of held-out cases and a Dice table
# (demo_output/report.txt; NIfTI predictions and PNG previews under
# demo_output/predictions). Arguments are passed to stunet-demo (--help lists
# them). Works from any directory; the output folder is relative to the
# directory it is called from.
#
# Environment: STUNET_SKIP_DEPS=1 skips install-deps.sh; STUNET_JOBS
# (default 2) sets the build parallelism; CCACHE_DIR (default ~/.cache/ccache).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
caller="$(pwd)"
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

section "build stunet-demo"
# Only the demo (one translation unit): the other programs build with
# `cmake --build --preset release`.
cmake --build --preset release -j "${STUNET_JOBS:-2}" --target stunet-demo

section "run stunet-demo${*:+ $*}"
cd "$caller"
exec "$root/build/release/examples/stunet-demo" "$@"
