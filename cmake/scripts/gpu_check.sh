#!/usr/bin/env bash
# The checks that need a GPU, in one command for the device machine (see
# /work/.library/device/README.md): build the CUDA targets with nvcc for
# sm_90, run the CUDA test suite, run it again under compute-sanitizer
# memcheck, and run the CUDA benchmarks with JSON output. Every log goes to
# $OUT (default ./out; 8 files at most, the device tool's limit). Stages: all (default), build, test, memcheck, bench.
#
# ../shared does not travel to that machine: before the call, copy what the
# tests read into the git-ignored shared-copy/ and name it in `carry`:
#   mkdir -p shared-copy && cp -r ../shared/golden ../shared/spec shared-copy/
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
OUT="${OUT:-$root/out}"
mkdir -p "$OUT"
stage="${1:-all}"
build="$root/build/gpu"
[[ -d "$root/shared-copy" ]] && export STUNET_SHARED="$root/shared-copy"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
run() { echo "+ $*" | tee -a "$OUT/summary.txt"; }

if [[ "$stage" == all || "$stage" == build ]]; then
  run "configure + build"
  { cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 &&
    cmake --build "$build" -j "$(nproc)" --target stunet_cuda_tests stunet_bench_conv3d_cuda stunet_bench_layers_cuda \
      stunet_bench_model_cuda stunet-pretrain stunet-predict; } > "$OUT/build.log" 2>&1
  echo "build rc=$?" | tee -a "$OUT/summary.txt"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$OUT/summary.txt" 2>&1
fi
if [[ "$stage" == all || "$stage" == test ]]; then
  run "cuda tests"
  "$build/tests/stunet_cuda_tests" > "$OUT/cuda_tests.log" 2>&1
  echo "cuda tests rc=$?" | tee -a "$OUT/summary.txt"
  tail -4 "$OUT/cuda_tests.log" >> "$OUT/summary.txt"
fi
if [[ "$stage" == all || "$stage" == memcheck ]]; then
  run "compute-sanitizer memcheck"
  san="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
  timeout 420 "$san" --tool memcheck --leak-check full --error-exitcode 3 "$build/tests/stunet_cuda_tests" \
    > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?" | tee -a "$OUT/summary.txt"
  tail -4 "$OUT/memcheck.log" >> "$OUT/summary.txt"
fi
if [[ "$stage" == all || "$stage" == bench ]]; then
  run "benchmarks"
  for b in layers conv3d model; do
    timeout 300 "$build/bench/stunet_bench_${b}_cuda" --benchmark_out="$OUT/bench_${b}_cuda.json" \
      --benchmark_out_format=json ${BENCH_FILTER:+--benchmark_filter="$BENCH_FILTER"} >> "$OUT/bench_cuda.txt" 2>&1
    echo "bench $b rc=$?" | tee -a "$OUT/summary.txt"
  done
fi
