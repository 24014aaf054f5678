#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages stunet needs to build and test, and only
# those that are missing: safe to run again and again (no apt-get at all when
# everything is present). Needs root or sudo to install; without either it
# prints the apt-get line to run and exits 1.
#
# The CUDA toolkit is not installed here: when nvcc is present (on PATH or in
# /usr/local/cuda/bin) the CUDA targets are built too.
set -euo pipefail

packages=(
  cmake ninja-build g++ ccache   # toolchain (OpenMP: libgomp ships with gcc)
  libeigen3-dev libfmt-dev       # the library's dependencies
  doctest-dev libbenchmark-dev   # tests and benchmarks
  zlib1g-dev libpng-dev libzip-dev nlohmann-json3-dev libcli11-dev  # I/O and command-line programs
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#packages[@]} packages are installed"
  exit 0
fi

echo "install-deps: missing: ${missing[*]}"
apt_update=(apt-get update)
apt_install=(apt-get install -y --no-install-recommends "${missing[@]}")

if [[ $(id -u) -eq 0 ]]; then
  run=()
elif command -v sudo >/dev/null 2>&1; then
  run=(sudo)
else
  echo "install-deps: not root and no sudo; as root, run:" >&2
  echo "  ${apt_update[*]} && DEBIAN_FRONTEND=noninteractive ${apt_install[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${run[@]}" "${apt_update[@]}"
"${run[@]}" env DEBIAN_FRONTEND=noninteractive "${apt_install[@]}"
echo "install-deps: installed ${missing[*]}"
