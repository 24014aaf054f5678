// The conv3d CUDA kernels (include/stunet/cuda/conv3d.cuh) at every
// convolution of STU-Net-B (nn::presets::base: widths 32, 64, 128, 256, 512,
// 512, pooling (2,2,2) five times) on a 128^3 patch at batch 2: the forward
// pass, the data gradient and the weight gradient of each, in float32,
// float16 and bfloat16.
//
//   stunet_bench_conv3d_cuda --benchmark_filter='conv3d_fprop/B_enc0.*/f16'
//   stunet_bench_conv3d_cuda --benchmark_list_tests     # works without a GPU
//
// All 408 cases take several minutes (each allocates and fills its tensors,
// up to 3 GiB, then runs for Google Benchmark's minimum time); filter, or
// pass --benchmark_min_time=0.1 for a quicker pass.
//
// Names: conv3d_<stage>/B_<where>_<kernel>[s2]_<Cin>to<Cout>_<input extent>^3/<dtype>,
// where <where> is enc<level>_conv1|conv2|conv3 (conv3: the 1x1x1 shortcut of
// the first block) or dec<level>_up (1x1x1 after the upsample),
// dec<level>_conv1|conv2|conv3, dec<level>_seg (the 105-class head). The
// first level's input image needs no gradient in training, so its two stem
// convs (1 input channel) have no dgrad case.
//
// Time: CUDA events around the table call on the context stream (manual
// time), after one untimed warm-up call. Counters: TFLOP/s = 2 * MACs / time
// (a pass's MACs are the forward's; bwd counts both passes). The nine shapes
// of the anchors' STU-Net-B layer table (/work/shared/anchors/README.md:
// PyTorch + cuDNN on an H100, NCDHW rows) carry its times in the label, an
// extra conv3d_bwd case (dgrad + wgrad, as the anchor's "bwd"), and
// vs_anchor = anchor time / ours (above 1: faster than PyTorch). Our f32
// is strict FP32 on CUDA cores, compared with the anchor's TF32 tensor-core
// row: expect it to lose until the tensor-core kernels land.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/error.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cuda/backend.cuh"
#include "stunet/cuda/check.cuh"
#include "stunet/cuda/launch.cuh"

namespace {

using stunet::Conv3dProblem;
using stunet::Device;
using stunet::DType;
using stunet::Shape;
using stunet::Tensor;

/// PyTorch + cuDNN on an H100 for one layer shape (ms, NCDHW); 0 = not measured.
struct Anchor {
  double fwd_ms, bwd_ms;
};

/// The anchors' layer rows: Cin, Cout, input extent, stride, and (fwd, bwd)
/// ms for tf32, fp16, bf16.
struct AnchorRow {
  int cin, cout, extent, stride;
  Anchor tf32, fp16, bf16;
};
constexpr AnchorRow kAnchors[] = {
    {1, 32, 128, 1, {0.613, 4.711}, {0.600, 2.377}, {0.837, 2.935}},
    {32, 32, 128, 1, {2.893, 9.311}, {1.629, 3.735}, {1.660, 3.687}},
    {32, 64, 128, 2, {0.830, 2.675}, {0.544, 1.573}, {0.546, 1.600}},
    {64, 64, 64, 1, {0.785, 2.461}, {0.438, 0.965}, {0.433, 0.853}},
    {128, 128, 32, 1, {0.275, 0.771}, {0.176, 0.340}, {0.168, 0.321}},
    {256, 256, 16, 1, {0.128, 0.380}, {0.159, 0.187}, {0.076, 0.188}},
    {512, 512, 8, 1, {0.108, 0.315}, {0.088, 0.185}, {0.076, 0.168}},
    {512, 512, 4, 1, {0.082, 0.201}, {0.059, 0.217}, {0.084, 0.206}},
    {64, 32, 128, 1, {5.240, 14.946}, {2.596, 4.957}, {2.836, 4.948}},
};

/// One convolution of the network.
struct NetConv {
  std::string where;
  int cin, cout, extent, kernel, stride;
  bool needs_dgrad = true;
};

Conv3dProblem problem_of(const NetConv& c) {
  Conv3dProblem p;
  p.N = 2;
  p.C = c.cin;
  p.K = c.cout;
  p.D = p.H = p.W = c.extent;
  p.T = p.R = p.S = c.kernel;
  p.pad_d = p.pad_h = p.pad_w = c.kernel / 2;
  p.stride_d = p.stride_h = p.stride_w = c.stride;
  return p;
}

/// Every conv of STU-Net-B's forward pass at 128^3 (nn::STUNet with
/// presets::base; per sample, the MACs of this list sum to
/// nn::forward_macs(base, 128^3) = 0.506 T, the anchors' figure).
std::vector<NetConv> stunet_b_convs() {
  constexpr int dims[6] = {32, 64, 128, 256, 512, 512};
  constexpr int classes = 105, patch = 128;
  std::vector<NetConv> convs;
  for (int s = 0; s < 6; ++s) {
    const int cin = s == 0 ? 1 : dims[s - 1];
    const int stride = s == 0 ? 1 : 2;
    const int in = s == 0 ? patch : patch >> (s - 1);
    const int out = in / stride;
    const std::string lvl = "enc" + std::to_string(s);
    convs.push_back({lvl + "_conv1", cin, dims[s], in, 3, stride, s != 0});
    convs.push_back({lvl + "_conv2", dims[s], dims[s], out, 3, 1});
    convs.push_back({lvl + "_conv3", cin, dims[s], in, 1, stride, s != 0});
  }
  for (int l = 4; l >= 0; --l) {
    const int w = dims[l], v = patch >> l;
    const std::string lvl = "dec" + std::to_string(l);
    convs.push_back({lvl + "_up", dims[l + 1], w, v, 1, 1});
    convs.push_back({lvl + "_conv1", 2 * w, w, v, 3, 1});
    convs.push_back({lvl + "_conv2", w, w, v, 3, 1});
    convs.push_back({lvl + "_conv3", 2 * w, w, v, 1, 1});
    convs.push_back({lvl + "_seg", w, classes, v, 1, 1});
  }
  return convs;
}

const AnchorRow* anchor_of(const NetConv& c) {
  if (c.kernel != 3) return nullptr;
  for (const AnchorRow& a : kAnchors)
    if (a.cin == c.cin && a.cout == c.cout && a.extent == c.extent && a.stride == c.stride) return &a;
  return nullptr;
}

const Anchor* anchor_for(const AnchorRow* row, DType t) {
  if (row == nullptr) return nullptr;
  switch (t) {
    case DType::f32: return &row->tf32;
    case DType::f16: return &row->fp16;
    case DType::bf16: return &row->bf16;
    default: return nullptr;
  }
}

const char* short_name(DType t) { return t == DType::f32 ? "f32" : t == DType::f16 ? "f16" : "bf16"; }

const char* anchor_precision(DType t) { return t == DType::f32 ? "tf32" : t == DType::f16 ? "fp16" : "bf16"; }

/// Deterministic values in [-scale, scale): a hash of the index, so that the
/// kernels see realistic bit patterns (zeros would understate power draw).
template <class T> __global__ void fill_pseudo_random(T* p, std::int64_t n, std::uint32_t seed, float scale) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float u = static_cast<float>(h & 0xFFFFFFu) * (1.0f / 8388608.0f) - 1.0f;
    p[i] = static_cast<T>(u * scale);
  }
}

Tensor device_random(const Shape& shape, DType dtype, std::uint32_t seed) {
  Tensor t = Tensor::empty(shape, dtype, Device::cuda(0));
  const std::int64_t n = t.numel();
  const cudaStream_t s = stunet::cuda::stream(0);
  stunet::cuda::dispatch_cuda_float(dtype, "device_random", [&]<class T>() {
    fill_pseudo_random<T><<<stunet::cuda::grid_for(n), stunet::cuda::kBlock, 0, s>>>(static_cast<T*>(t.raw_data()), n,
                                                                                     seed, 0.1f);
    STUNET_CUDA_CHECK_LAUNCH("fill_pseudo_random");
  });
  return t;
}

enum class Stage { fprop, dgrad, wgrad, bwd };
const char* stage_name(Stage s) {
  switch (s) {
    case Stage::fprop: return "fprop";
    case Stage::dgrad: return "dgrad";
    case Stage::wgrad: return "wgrad";
    case Stage::bwd: return "bwd";
  }
  return "?";
}

void run_conv(benchmark::State& state, const NetConv& conv, Stage stage, DType dtype) {
  const Conv3dProblem p = problem_of(conv);
  const stunet::CudaKernels& k = stunet::cuda_kernels();
  try {
    Tensor x = device_random(Shape{p.N, p.C, p.D, p.H, p.W}, dtype, 1);
    Tensor w = device_random(Shape{p.K, p.C, p.T, p.R, p.S}, dtype, 2);
    Tensor b = device_random(Shape{p.K}, dtype, 3);
    const Shape out_shape{p.N, p.K, p.out_d(), p.out_h(), p.out_w()};
    Tensor y = stage == Stage::fprop ? Tensor::empty(out_shape, dtype, Device::cuda(0)) : Tensor();
    Tensor dy = stage != Stage::fprop ? device_random(out_shape, dtype, 4) : Tensor();
    Tensor dx = stage == Stage::dgrad || stage == Stage::bwd ? Tensor::empty(x.shape(), dtype, Device::cuda(0)) : Tensor();
    Tensor dw = stage == Stage::wgrad || stage == Stage::bwd ? Tensor::empty(w.shape(), dtype, Device::cuda(0)) : Tensor();
    auto run = [&] {
      if (stage == Stage::fprop) k.conv3d_fprop(p, dtype, x.raw_data(), w.raw_data(), b.raw_data(), y.raw_data(), 0);
      if (stage == Stage::dgrad || stage == Stage::bwd)
        k.conv3d_dgrad(p, dtype, dy.raw_data(), w.raw_data(), dx.raw_data(), 0);
      if (stage == Stage::wgrad || stage == Stage::bwd)
        k.conv3d_wgrad(p, dtype, x.raw_data(), dy.raw_data(), dw.raw_data(), 0);
    };
    const cudaStream_t s = stunet::cuda::stream(0);
    run();  // warm-up: the caching allocator's first wgrad scratch block
    STUNET_CUDA_CHECK(cudaStreamSynchronize(s));
    cudaEvent_t start, stop;
    STUNET_CUDA_CHECK(cudaEventCreate(&start));
    STUNET_CUDA_CHECK(cudaEventCreate(&stop));
    double seconds = 0;
    for (auto _ : state) {
      STUNET_CUDA_CHECK(cudaEventRecord(start, s));
      run();
      STUNET_CUDA_CHECK(cudaEventRecord(stop, s));
      STUNET_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0;
      STUNET_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      state.SetIterationTime(ms * 1e-3);
      seconds += ms * 1e-3;
    }
    STUNET_CUDA_CHECK(cudaEventDestroy(start));
    STUNET_CUDA_CHECK(cudaEventDestroy(stop));
    const double passes = stage == Stage::bwd ? 2.0 : 1.0;
    const double per_iter = seconds / static_cast<double>(state.iterations());
    state.counters["TFLOP/s"] = passes * static_cast<double>(p.flops()) / per_iter * 1e-12;
    if (const Anchor* a = anchor_for(anchor_of(conv), dtype); a != nullptr) {
      if (stage == Stage::fprop) state.counters["vs_anchor"] = a->fwd_ms * 1e-3 / per_iter;
      if (stage == Stage::bwd) state.counters["vs_anchor"] = a->bwd_ms * 1e-3 / per_iter;
      state.SetLabel(fmt::format("anchor {} NCDHW: fwd {} ms, bwd (dgrad+wgrad) {} ms", anchor_precision(dtype),
                                 a->fwd_ms, a->bwd_ms));
    }
  } catch (const stunet::Error& e) {
    state.SkipWithError(e.what());
  }
}

std::string case_name(const NetConv& c) {
  return fmt::format("B_{}_{}x{}x{}{}_{}to{}_{}^3", c.where, c.kernel, c.kernel, c.kernel,
                     c.stride == 2 ? "s2" : "", c.cin, c.cout, c.extent);
}

void register_all() {
  const std::vector<NetConv> convs = stunet_b_convs();
  std::vector<const AnchorRow*> timed_bwd;  // one bwd case per anchor row (the decoder repeats encoder shapes)
  for (Stage stage : {Stage::fprop, Stage::dgrad, Stage::wgrad, Stage::bwd})
    for (const NetConv& conv : convs) {
      if (stage == Stage::dgrad && !conv.needs_dgrad) continue;
      if (stage == Stage::bwd) {
        const AnchorRow* row = anchor_of(conv);
        if (row == nullptr || std::find(timed_bwd.begin(), timed_bwd.end(), row) != timed_bwd.end()) continue;
        timed_bwd.push_back(row);
      }
      for (DType dtype : {DType::f32, DType::f16, DType::bf16}) {
        const std::string name = fmt::format("conv3d_{}/{}/{}", stage_name(stage), case_name(conv), short_name(dtype));
        benchmark::RegisterBenchmark(name.c_str(),
                                     [conv, stage, dtype](benchmark::State& st) { run_conv(st, conv, stage, dtype); })
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
      }
    }
}

}  // namespace

int main(int argc, char** argv) {
  // Listing the cases needs no GPU.
  bool list_only = false;
  for (int i = 1; i < argc; ++i) list_only |= std::string(argv[i]).rfind("--benchmark_list_tests", 0) == 0;
  if (!list_only && stunet::cuda::device_count() == 0) {
    std::fprintf(stderr,
                 "stunet_bench_conv3d_cuda: no CUDA device visible (no GPU, no driver, or a driver older than the "
                 "CUDA runtime); these benchmarks time the conv3d CUDA kernels and need a GPU.\n");
    return 1;
  }
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
