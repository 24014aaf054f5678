// CPU conv3d at the shapes of STU-Net-S (batch 1, kernel 3 unless noted):
// forward alone (inference) and forward + backward of all three inputs
// (training). Reports GFLOP/s with 2 FLOPs per multiply-accumulate, counting
// 3x the forward MACs for forward + backward (2x for the stem, whose input
// image needs no gradient).
//
//   stunet_bench_cpu --benchmark_filter=16to16_64
//
// OpenMP uses every core; set OMP_NUM_THREADS to compare thread counts.

#include <benchmark/benchmark.h>

#include <array>
#include <random>
#include <vector>

#include "stunet/ops/conv3d.hpp"

namespace {

using stunet::Conv3dOptions;
using stunet::Conv3dProblem;
using stunet::DType;
using stunet::Shape;
using stunet::Tensor;

/// One benchmarked convolution: channels, cubic input extent, kernel,
/// stride and padding.
struct ConvShape {
  int cin, cout, extent, kernel;
  std::array<int, 3> stride;
  int pad;
  bool input_grad = true;  ///< false for the stem: the image needs no gradient
};

Tensor random_uniform(const Shape& shape, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(shape.numel()));
  for (float& e : v) e = dist(rng);
  return Tensor::from_vector<float>(v, shape);
}

Conv3dProblem problem_of(const ConvShape& s) {
  Conv3dProblem p;
  p.N = 1;
  p.C = s.cin;
  p.K = s.cout;
  p.D = p.H = p.W = s.extent;
  p.T = p.R = p.S = s.kernel;
  p.pad_d = p.pad_h = p.pad_w = s.pad;
  p.stride_d = s.stride[0];
  p.stride_h = s.stride[1];
  p.stride_w = s.stride[2];
  return p;
}

void conv_forward(benchmark::State& state, ConvShape s) {
  const Conv3dProblem p = problem_of(s);
  Tensor x = random_uniform(Shape{1, s.cin, s.extent, s.extent, s.extent}, 1);
  Tensor w = random_uniform(Shape{s.cout, s.cin, s.kernel, s.kernel, s.kernel}, 2);
  Tensor b = random_uniform(Shape{s.cout}, 3);
  const Conv3dOptions opt{.stride = s.stride, .padding = {s.pad, s.pad, s.pad}};
  stunet::NoGradGuard no_grad;
  for (auto _ : state) {
    Tensor y = stunet::conv3d(x, w, b, opt);
    benchmark::DoNotOptimize(y.raw_data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(static_cast<double>(p.flops()) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void conv_forward_backward(benchmark::State& state, ConvShape s) {
  const Conv3dProblem p = problem_of(s);
  Tensor x = random_uniform(Shape{1, s.cin, s.extent, s.extent, s.extent}, 1).set_requires_grad(s.input_grad);
  Tensor w = random_uniform(Shape{s.cout, s.cin, s.kernel, s.kernel, s.kernel}, 2).set_requires_grad();
  Tensor b = random_uniform(Shape{s.cout}, 3).set_requires_grad();
  const Conv3dOptions opt{.stride = s.stride, .padding = {s.pad, s.pad, s.pad}};
  Tensor grad = random_uniform(Shape{1, s.cout, p.out_d(), p.out_h(), p.out_w()}, 4);
  for (auto _ : state) {
    x.zero_grad();
    w.zero_grad();
    b.zero_grad();
    Tensor y = stunet::conv3d(x, w, b, opt);
    y.backward(grad);
    benchmark::DoNotOptimize(w.grad().raw_data());
    benchmark::ClobberMemory();
  }
  // Forward, data gradient and weight gradient each cost the forward's MACs.
  const double passes = s.input_grad ? 3.0 : 2.0;
  state.counters["GFLOP/s"] =
      benchmark::Counter(passes * static_cast<double>(p.flops()) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// STU-Net-S stages: the 64^3 stem and first stage at 16 channels (the
// headline), the stem conv from one input channel, the first downsampling
// conv, the 32^3 stage and the 4^3 bottleneck.
constexpr ConvShape k16to16_64{16, 16, 64, 3, {1, 1, 1}, 1};
constexpr ConvShape k1to16_64{1, 16, 64, 3, {1, 1, 1}, 1, false};
constexpr ConvShape k16to32_64_s2{16, 32, 64, 3, {2, 2, 2}, 1};
constexpr ConvShape k32to32_32{32, 32, 32, 3, {1, 1, 1}, 1};
constexpr ConvShape k256to256_4{256, 256, 4, 3, {1, 1, 1}, 1};
constexpr ConvShape k16to32_64_1x1{16, 32, 64, 1, {1, 1, 1}, 0};

}  // namespace

#define STUNET_CONV_BENCH(name, shape)                                                                       \
  BENCHMARK_CAPTURE(conv_forward, name, shape)->UseRealTime()->Unit(benchmark::kMillisecond);                \
  BENCHMARK_CAPTURE(conv_forward_backward, name, shape)->UseRealTime()->Unit(benchmark::kMillisecond)

STUNET_CONV_BENCH(16to16_64, k16to16_64);
STUNET_CONV_BENCH(1to16_64, k1to16_64);
STUNET_CONV_BENCH(16to32_64_s2, k16to32_64_s2);
STUNET_CONV_BENCH(32to32_32, k32to32_32);
STUNET_CONV_BENCH(256to256_4, k256to256_4);
STUNET_CONV_BENCH(16to32_64_1x1, k16to32_64_1x1);

BENCHMARK_MAIN();
