// The memory-bound layers of STU-Net on the CPU, at its shapes (batch 2):
// instance norm forward and backward, LeakyReLU, nearest 2x upsampling,
// channel softmax of the 105-class head and the DC+CE loss (forward +
// backward). Cases are named cC_eE: C channels at E^3 (e32: a smoke case,
// e64: STU-Net's first stage at a 64^3 patch, e128: at the 128^3 patch,
// the shapes of the anchors' H100 layer figures, named in the label).
//
// GB/s counts the compulsory traffic only, as the anchors do: one read of
// every input and one write of every output (instance norm's second pass
// over x for its statistics is not counted), so rates compare with
// /work/shared/anchors/README.md and with a copy's bandwidth.
//
//   stunet_bench_layers_cpu --benchmark_filter=c32_e64
//
// OpenMP uses every core; set OMP_NUM_THREADS to compare thread counts.

#include <benchmark/benchmark.h>

#include <array>
#include <cstdint>

#include "stunet/autograd/grad_mode.hpp"
#include "stunet/ops/activation.hpp"
#include "stunet/ops/interp.hpp"
#include "stunet/ops/loss.hpp"
#include "stunet/ops/norm.hpp"
#include "stunet/ops/softmax.hpp"

namespace {

using stunet::DType;
using stunet::Shape;
using stunet::Tensor;

constexpr int kClasses = 105;  // TotalSegmentator, as the anchors

/// One benchmarked activation shape [n, c, e, e, e] and the anchor for it.
struct LayerShape {
  int n, c, e;
  const char* anchor = "";
};

Shape shape_of(const LayerShape& s) { return Shape{s.n, s.c, s.e, s.e, s.e}; }

/// Values in [-1, 1) from a xorshift stream: the 1.8 GB logits of the e128
/// loss case would take seconds to fill with std::mt19937 + a distribution.
Tensor random_tensor(const Shape& shape, std::uint64_t seed) {
  Tensor t = Tensor::empty(shape, DType::f32);
  float* p = t.data<float>();
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p[i] = static_cast<float>(x >> 40) * (2.0f / 16777216.0f) - 1.0f;  // 24 random bits
  }
  return t;
}

/// Labels [n, 1, e, e, e] in classes [0, c), blocks of 8 voxels cycling
/// through every class, so soft Dice sees every class present as in a real batch.
Tensor block_labels(const LayerShape& s) {
  Tensor t = Tensor::empty(Shape{s.n, 1, s.e, s.e, s.e}, DType::u8);
  std::uint8_t* p = t.data<std::uint8_t>();
  for (std::int64_t n = 0; n < s.n; ++n)
    for (std::int64_t d = 0; d < s.e; ++d)
      for (std::int64_t h = 0; h < s.e; ++h)
        for (std::int64_t w = 0; w < s.e; ++w)
          *p++ = static_cast<std::uint8_t>((n * 7 + d / 8 * 31 + h / 8 * 17 + w / 8) % s.c);
  return t;
}

void set_bytes(benchmark::State& state, const LayerShape& s, double bytes) {
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  if (s.anchor[0] != '\0') state.SetLabel(s.anchor);
}

double bytes_of(const Tensor& t) { return static_cast<double>(t.numel()) * static_cast<double>(stunet::dtype_size(t.dtype())); }

void instance_norm_fwd(benchmark::State& state, LayerShape s) {
  const Tensor x = random_tensor(shape_of(s), 1);
  const Tensor w = random_tensor(Shape{s.c}, 2), b = random_tensor(Shape{s.c}, 3);
  stunet::NoGradGuard no_grad;
  for (auto _ : state) {
    Tensor y = stunet::instance_norm(x, w, b);
    benchmark::DoNotOptimize(y.raw_data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, s, 2.0 * bytes_of(x));
}

/// Backward alone (x, weight and bias gradients): the forward that records
/// the graph runs with the timer paused; its cost is instance_norm_fwd.
void instance_norm_bwd(benchmark::State& state, LayerShape s) {
  Tensor x = random_tensor(shape_of(s), 1).set_requires_grad();
  Tensor w = random_tensor(Shape{s.c}, 2).set_requires_grad();
  Tensor b = random_tensor(Shape{s.c}, 3).set_requires_grad();
  const Tensor g = random_tensor(shape_of(s), 4);
  for (auto _ : state) {
    state.PauseTiming();
    x.zero_grad();
    w.zero_grad();
    b.zero_grad();
    Tensor y = stunet::instance_norm(x, w, b);
    state.ResumeTiming();
    y.backward(g);
    benchmark::DoNotOptimize(x.grad().raw_data());
    benchmark::ClobberMemory();
  }
  // Reads x and the output gradient, writes the input gradient.
  set_bytes(state, s, 3.0 * bytes_of(x));
}

void leaky_relu_fwd(benchmark::State& state, LayerShape s) {
  // Out of place: in place would shrink the negatives by 0.01 per iteration
  // into denormals and time those instead.
  const Tensor x = random_tensor(shape_of(s), 1);
  stunet::NoGradGuard no_grad;
  for (auto _ : state) {
    Tensor y = stunet::leaky_relu(x, 0.01);
    benchmark::DoNotOptimize(y.raw_data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, s, 2.0 * bytes_of(x));
}

/// Nearest 2x upsampling to [n, c, e, e, e] from [n, c, e/2, e/2, e/2], as
/// STU-Net's decoder (and the anchors' "64ch 64^3" case: c64_e128).
void upsample_nearest_fwd(benchmark::State& state, LayerShape s) {
  const Tensor x = random_tensor(Shape{s.n, s.c, s.e / 2, s.e / 2, s.e / 2}, 1);
  stunet::NoGradGuard no_grad;
  for (auto _ : state) {
    Tensor y = stunet::upsample_nearest(x, {2, 2, 2});
    benchmark::DoNotOptimize(y.raw_data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, s, 9.0 * bytes_of(x));  // read x once, write 8x its size
}

/// Channel softmax of the full-resolution head's logits [n, c, e^3] (c: the
/// 105 classes).
void softmax_fwd(benchmark::State& state, LayerShape s) {
  const Tensor x = random_tensor(shape_of(s), 1);
  stunet::NoGradGuard no_grad;
  for (auto _ : state) {
    Tensor y = stunet::softmax(x, 1);
    benchmark::DoNotOptimize(y.raw_data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, s, 2.0 * bytes_of(x));
  state.counters["voxels/s"] = benchmark::Counter(static_cast<double>(s.n) * s.e * s.e * s.e,
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

/// nnU-Net's DC+CE (softmax, soft Dice with batch Dice, cross-entropy) on
/// the head's logits, forward and backward to the logits' gradient: the
/// loss part of one deep-supervision term at full resolution.
void dc_ce_loss_fwd_bwd(benchmark::State& state, LayerShape s) {
  Tensor x = random_tensor(shape_of(s), 1).set_requires_grad();
  const Tensor labels = block_labels(s);
  for (auto _ : state) {
    x.zero_grad();
    Tensor loss = stunet::dc_and_ce_loss(x, labels);
    loss.backward();
    benchmark::DoNotOptimize(x.grad().raw_data());
    benchmark::ClobberMemory();
  }
  // Reads the logits (and the one-byte labels), writes their gradient.
  set_bytes(state, s, 2.0 * bytes_of(x) + static_cast<double>(labels.numel()));
  state.counters["voxels/s"] = benchmark::Counter(static_cast<double>(s.n) * s.e * s.e * s.e,
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

constexpr LayerShape kC32E32{2, 32, 32};
constexpr LayerShape kC32E64{2, 32, 64};
constexpr LayerShape kInormFwd128{2, 32, 128, "PyTorch H100 fp32 anchor 1.29 ms (833 GB/s)"};
constexpr LayerShape kInormBwd128{2, 32, 128, "PyTorch H100 fp32 anchor 3.32 ms"};
constexpr LayerShape kLrelu128{2, 32, 128, "PyTorch H100 fp32 anchor 0.38 ms (2834 GB/s)"};
constexpr LayerShape kUpsample128{2, 64, 128, "PyTorch H100 fp32 anchor 1.72 ms (703 GB/s)"};
constexpr LayerShape kHead32{2, kClasses, 32};
constexpr LayerShape kHead64{2, kClasses, 64};
constexpr LayerShape kHead128{2, kClasses, 128};

}  // namespace

#define STUNET_LAYER_BENCH(fn, name, shape) \
  BENCHMARK_CAPTURE(fn, name, shape)->UseRealTime()->Unit(benchmark::kMillisecond)

STUNET_LAYER_BENCH(instance_norm_fwd, c32_e32, kC32E32);
STUNET_LAYER_BENCH(instance_norm_fwd, c32_e64, kC32E64);
STUNET_LAYER_BENCH(instance_norm_fwd, c32_e128, kInormFwd128);
STUNET_LAYER_BENCH(instance_norm_bwd, c32_e32, kC32E32);
STUNET_LAYER_BENCH(instance_norm_bwd, c32_e64, kC32E64);
STUNET_LAYER_BENCH(instance_norm_bwd, c32_e128, kInormBwd128);
STUNET_LAYER_BENCH(leaky_relu_fwd, c32_e32, kC32E32);
STUNET_LAYER_BENCH(leaky_relu_fwd, c32_e64, kC32E64);
STUNET_LAYER_BENCH(leaky_relu_fwd, c32_e128, kLrelu128);
STUNET_LAYER_BENCH(upsample_nearest_fwd, c32_e32, kC32E32);
STUNET_LAYER_BENCH(upsample_nearest_fwd, c32_e64, kC32E64);
STUNET_LAYER_BENCH(upsample_nearest_fwd, c64_e128, kUpsample128);
STUNET_LAYER_BENCH(softmax_fwd, c105_e32, kHead32);
STUNET_LAYER_BENCH(softmax_fwd, c105_e64, kHead64);
STUNET_LAYER_BENCH(softmax_fwd, c105_e128, kHead128);
STUNET_LAYER_BENCH(dc_ce_loss_fwd_bwd, c105_e32, kHead32);
STUNET_LAYER_BENCH(dc_ce_loss_fwd_bwd, c105_e64, kHead64);
STUNET_LAYER_BENCH(dc_ce_loss_fwd_bwd, c105_e128, kHead128);

BENCHMARK_MAIN();
