// The memory-bound layers of STU-Net-B on the GPU, through the CUDA kernel
// table (include/stunet/cuda/{norm,elementwise}.cuh): instance norm forward
// (statistics + normalisation) and backward (per-plane sums, input gradient,
// weight and bias gradients), LeakyReLU forward and backward, and nearest 2x
// upsampling forward and backward, at batch 2 and a 128^3 patch, in float32
// and float16.
//
// Cases are named <layer>/<dtype>/cC_eE: C channels at E^3 (for the
// upsampling, E is the OUTPUT extent: the decoder doubles level l+1 into
// level l). STU-Net-B's levels: c32_e128, c64_e64, c128_e32, c256_e16,
// c512_e8, c512_e4. The cases the anchors measured (/work/shared/anchors/README.md:
// 32 channels at 128^3; the upsampling of 64 channels from 64^3) carry the
// PyTorch H100 figure in their label and a vs_anchor counter (anchor time /
// ours; above 1: faster than PyTorch).
//
// Timing: CUDA events around each iteration on the context's stream
// (UseManualTime), so the time is the GPU's, launches included. GB/s counts
// the compulsory traffic as the anchors do: one read of every input and one
// write of every output (instance norm's statistics pass over x is not
// counted), so rates compare with the anchors and with a copy's 2.9 TB/s.
//
//   stunet_bench_layers_cuda --benchmark_filter=e128
//
// Without a GPU the program says so and exits with status 1.

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cuda/backend.cuh"
#include "stunet/cuda/check.cuh"
#include "stunet/cuda/launch.cuh"

namespace {

using stunet::Device;
using stunet::DType;
using stunet::Shape;
using stunet::Tensor;

const Device kGpu = Device::cuda(0);
constexpr int kDev = 0;

stunet::CudaKernels& kernels() { return stunet::cuda_kernels(); }

/// One activation shape [2, c, e, e, e] and, where the anchors measured it,
/// the PyTorch H100 time in ms and its description.
struct LayerCase {
  int c, e;
  double anchor_ms = 0;
  const char* anchor = "";
};

/// Values in [-1, 1) from a xorshift stream on the host, converted to dtype
/// on the GPU (strided_copy): the float16 conversion of 134 M values would
/// take seconds on the host.
Tensor random_device(const Shape& shape, DType dtype, std::uint64_t seed) {
  Tensor h = Tensor::empty(shape, DType::f32);
  float* p = h.data<float>();
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (std::int64_t i = 0; i < h.numel(); ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p[i] = static_cast<float>(x >> 40) * (2.0f / 16777216.0f) - 1.0f;
  }
  Tensor d = h.to(kGpu);
  if (dtype == DType::f32) return d;
  Tensor out = Tensor::empty(shape, dtype, kGpu);
  const auto l = stunet::detail::pad_to_5(shape, shape.contiguous_strides());
  kernels().strided_copy(out.raw_data(), dtype, l, d.raw_data(), DType::f32, l, kDev);
  return out;
}

double bytes_of(const Tensor& t) {
  return static_cast<double>(t.numel()) * static_cast<double>(stunet::dtype_size(t.dtype()));
}

/// CUDA events around one iteration on the context's stream.
class GpuTimer {
 public:
  GpuTimer() {
    STUNET_CUDA_CHECK(cudaEventCreate(&start_));
    STUNET_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~GpuTimer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  GpuTimer(const GpuTimer&) = delete;
  GpuTimer& operator=(const GpuTimer&) = delete;
  void start() { STUNET_CUDA_CHECK(cudaEventRecord(start_, stunet::cuda::stream(kDev))); }
  /// Seconds since start(), once the queued work has finished.
  double stop() {
    STUNET_CUDA_CHECK(cudaEventRecord(stop_, stunet::cuda::stream(kDev)));
    STUNET_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    STUNET_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return static_cast<double>(ms) * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

/// Times `body` per iteration; sets GB/s from `bytes` per iteration and, for
/// an anchored case, the label and vs_anchor.
template <class F> void run_timed(benchmark::State& state, const LayerCase& lc, double bytes, F&& body) {
  GpuTimer timer;
  body();  // warm-up: first-touch of the allocator, module loading
  stunet::cuda::synchronize(kDev);
  double total = 0;
  for (auto _ : state) {
    timer.start();
    body();
    const double s = timer.stop();
    total += s;
    state.SetIterationTime(s);
  }
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  if (lc.anchor_ms > 0 && total > 0) {
    state.counters["vs_anchor"] = lc.anchor_ms * 1e-3 * static_cast<double>(state.iterations()) / total;
    state.SetLabel(lc.anchor);
  }
}

Shape shape_of(const LayerCase& lc) { return Shape{2, lc.c, lc.e, lc.e, lc.e}; }
DType stat_dtype(DType t) { return t == DType::f64 ? DType::f64 : DType::f32; }

void instance_norm_fwd(benchmark::State& state, DType t, LayerCase lc) {
  const Shape shape = shape_of(lc);
  const std::int64_t planes = 2LL * lc.c, S = shape.numel() / planes;
  const Tensor x = random_device(shape, t, 1), w = random_device(Shape{lc.c}, t, 2), b = random_device(Shape{lc.c}, t, 3);
  Tensor y = Tensor::empty(shape, t, kGpu);
  Tensor mean = Tensor::empty(Shape{planes}, stat_dtype(t), kGpu), rstd = Tensor::empty(Shape{planes}, stat_dtype(t), kGpu);
  run_timed(state, lc, 2.0 * bytes_of(x), [&] {
    kernels().instance_norm_stats(t, x.raw_data(), planes, S, 1e-5, mean.raw_data(), rstd.raw_data(), kDev);
    kernels().instance_norm_forward(t, x.raw_data(), mean.raw_data(), rstd.raw_data(), w.raw_data(), b.raw_data(),
                                    y.raw_data(), planes, lc.c, S, kDev);
  });
}

/// The backward of an affine instance norm: what InstanceNormBackward runs
/// on a GPU (statistics from the forward, computed once outside the timing).
void instance_norm_bwd(benchmark::State& state, DType t, LayerCase lc) {
  const Shape shape = shape_of(lc);
  const std::int64_t planes = 2LL * lc.c, S = shape.numel() / planes;
  const Tensor x = random_device(shape, t, 1), g = random_device(shape, t, 4), w = random_device(Shape{lc.c}, t, 2);
  const DType st = stat_dtype(t);
  Tensor mean = Tensor::empty(Shape{planes}, st, kGpu), rstd = Tensor::empty(Shape{planes}, st, kGpu);
  Tensor sum_g = Tensor::empty(Shape{planes}, st, kGpu), sum_gx = Tensor::empty(Shape{planes}, st, kGpu);
  Tensor dx = Tensor::empty(shape, t, kGpu), dw = Tensor::empty(Shape{lc.c}, t, kGpu), db = Tensor::empty(Shape{lc.c}, t, kGpu);
  kernels().instance_norm_stats(t, x.raw_data(), planes, S, 1e-5, mean.raw_data(), rstd.raw_data(), kDev);
  // Reads x and the output gradient, writes the input gradient.
  run_timed(state, lc, 3.0 * bytes_of(x), [&] {
    kernels().instance_norm_backward_sums(t, x.raw_data(), g.raw_data(), mean.raw_data(), rstd.raw_data(), planes, S,
                                          sum_g.raw_data(), sum_gx.raw_data(), kDev);
    kernels().instance_norm_backward_input(t, x.raw_data(), g.raw_data(), mean.raw_data(), rstd.raw_data(),
                                           w.raw_data(), sum_g.raw_data(), sum_gx.raw_data(), dx.raw_data(), planes,
                                           lc.c, S, kDev);
    kernels().sum_planes_over_batch(t, sum_gx.raw_data(), dw.raw_data(), 2, lc.c, kDev);
    kernels().sum_planes_over_batch(t, sum_g.raw_data(), db.raw_data(), 2, lc.c, kDev);
  });
}

void leaky_relu_fwd(benchmark::State& state, DType t, LayerCase lc) {
  // Out of place: in place would shrink the negatives into denormals.
  const Tensor x = random_device(shape_of(lc), t, 1);
  Tensor y = Tensor::empty(x.shape(), t, kGpu);
  run_timed(state, lc, 2.0 * bytes_of(x),
            [&] { kernels().leaky_relu(t, x.raw_data(), y.raw_data(), 0.01, x.numel(), kDev); });
}

void leaky_relu_bwd(benchmark::State& state, DType t, LayerCase lc) {
  const Tensor ref = random_device(shape_of(lc), t, 1), g = random_device(shape_of(lc), t, 2);
  Tensor dx = Tensor::empty(ref.shape(), t, kGpu);
  run_timed(state, lc, 3.0 * bytes_of(ref), [&] {
    kernels().leaky_relu_backward(t, ref.raw_data(), g.raw_data(), dx.raw_data(), 0.01, ref.numel(), kDev);
  });
}

/// x [2, c, e/2, e/2, e/2] -> y [2, c, e, e, e].
void upsample_nearest_fwd(benchmark::State& state, DType t, LayerCase lc) {
  const int h = lc.e / 2;
  const Tensor x = random_device(Shape{2, lc.c, h, h, h}, t, 1);
  Tensor y = Tensor::empty(shape_of(lc), t, kGpu);
  run_timed(state, lc, 9.0 * bytes_of(x), [&] {
    kernels().upsample_nearest(t, x.raw_data(), y.raw_data(), 2LL * lc.c, h, h, h, 2, 2, 2, kDev);
  });
}

/// g [2, c, e, e, e] -> dx [2, c, e/2, e/2, e/2]: reads 8x what it writes.
void upsample_nearest_bwd(benchmark::State& state, DType t, LayerCase lc) {
  const int h = lc.e / 2;
  const Tensor g = random_device(shape_of(lc), t, 1);
  Tensor dx = Tensor::empty(Shape{2, lc.c, h, h, h}, t, kGpu);
  run_timed(state, lc, 9.0 * bytes_of(dx), [&] {
    kernels().upsample_nearest_backward(t, g.raw_data(), dx.raw_data(), 2LL * lc.c, h, h, h, 2, 2, 2, kDev);
  });
}

using BenchFn = void (*)(benchmark::State&, DType, LayerCase);

void add_case(const char* layer, BenchFn fn, DType t, LayerCase lc) {
  const std::string name = std::string(layer) + "/" + (t == DType::f16 ? "f16" : "f32") + "/c" +
                           std::to_string(lc.c) + "_e" + std::to_string(lc.e);
  benchmark::RegisterBenchmark(name.c_str(), [fn, t, lc](benchmark::State& s) { fn(s, t, lc); })
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

void register_all() {
  // STU-Net-B's encoder/decoder activations at a 128^3 patch, batch 2.
  const std::vector<LayerCase> levels = {{32, 128}, {64, 64}, {128, 32}, {256, 16}, {512, 8}, {512, 4}};
  // Decoder upsamplings: level l+1's channels doubled in extent to level l.
  const std::vector<LayerCase> ups = {{64, 128}, {128, 64}, {256, 32}, {512, 16}, {512, 8}};
  for (DType t : {DType::f32, DType::f16}) {
    const bool f32 = t == DType::f32;
    for (LayerCase lc : levels) {
      LayerCase fwd = lc, bwd = lc, lr = lc;
      if (lc.c == 32 && lc.e == 128) {
        fwd.anchor_ms = f32 ? 1.29 : 3.72;
        fwd.anchor = f32 ? "PyTorch H100 fp32 anchor 1.29 ms (833 GB/s)" : "PyTorch H100 fp16 anchor 3.72 ms (144 GB/s)";
        bwd.anchor_ms = f32 ? 3.32 : 3.94;
        bwd.anchor = f32 ? "PyTorch H100 fp32 anchor 3.32 ms" : "PyTorch H100 fp16 anchor 3.94 ms";
        lr.anchor_ms = f32 ? 0.38 : 0.20;
        lr.anchor = f32 ? "PyTorch H100 fp32 anchor 0.38 ms (2834 GB/s)" : "PyTorch H100 fp16 anchor 0.20 ms (2684 GB/s)";
      }
      add_case("instance_norm_fwd", instance_norm_fwd, t, fwd);
      add_case("instance_norm_bwd", instance_norm_bwd, t, bwd);
      add_case("leaky_relu_fwd", leaky_relu_fwd, t, lr);
      add_case("leaky_relu_bwd", leaky_relu_bwd, t, lc);
    }
    for (LayerCase lc : ups) {
      LayerCase up = lc;
      if (lc.c == 64 && lc.e == 128) {
        up.anchor_ms = f32 ? 1.72 : 1.73;
        up.anchor = f32 ? "PyTorch H100 fp32 anchor 1.72 ms (703 GB/s)" : "PyTorch H100 fp16 anchor 1.73 ms (349 GB/s)";
      }
      add_case("upsample_nearest_fwd", upsample_nearest_fwd, t, up);
      add_case("upsample_nearest_bwd", upsample_nearest_bwd, t, lc);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (stunet::cuda::device_count() == 0) {
    std::fprintf(stderr, "stunet_bench_layers_cuda: no CUDA device visible; these benchmarks need a GPU\n");
    return 1;
  }
  if (stunet::cuda_kernels().instance_norm_stats == nullptr) {
    std::fprintf(stderr, "stunet_bench_layers_cuda: the CUDA kernels were not registered (link stunet_cuda_kernels)\n");
    return 1;
  }
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
