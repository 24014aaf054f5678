// Whole STU-Net on the CPU, 105 classes (TotalSegmentator, as the anchors):
//
// - forward: batch 1, no gradient recorded, eval mode, deep supervision off
//   (inference needs only the full-resolution head, as the predictor runs it);
// - train: one nnU-Net v2 step at batch 2: forward with deep supervision,
//   DC+CE on the five outputs against nearest-downsampled targets, backward,
//   clip_grad_norm(12), SGD Nesterov (lr 1e-2, momentum 0.99, wd 3e-5), i.e.
//   what train::Trainer::train_step does minus the data loader.
//
// for the presets small and base at patch 64^3 and 128^3. GFLOP/s counts
// 2 FLOPs per multiply-accumulate of nn::forward_macs (the count of
// stunet-model-info and of the anchors' "0.258 TFLOP" for S at 128^3, so
// both sides use the same numerator), and 3 x forward x batch for a train
// step (forward, data gradient, weight gradient). The label names the
// PyTorch figure of /work/shared/anchors/README.md for the same work;
// `vs_anchor` is anchor time / our time (> 1: we are faster).
//
//   stunet_bench_model_cpu --benchmark_filter=forward/small_64
//
// The 128^3 cases take minutes and many GiB (train_step/base_128 may not
// fit in 24 GiB); run them deliberately. OpenMP uses every core.

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "stunet/autograd/grad_mode.hpp"
#include "stunet/nn/stunet.hpp"
#include "stunet/optim/sgd.hpp"
#include "stunet/train/deep_supervision.hpp"
#include "stunet/train/targets.hpp"

namespace {

using stunet::DType;
using stunet::Shape;
using stunet::Tensor;
namespace nn = stunet::nn;

/// One benchmarked configuration: preset, cubic patch, and the PyTorch
/// anchor for the same work (seconds; 0 when the anchors have no CPU figure).
struct ModelCase {
  const char* preset;
  int patch;
  double anchor_s;
  const char* anchor_label;
};

/// Uniform [-1, 1) image, as a z-scored CT patch roughly spans.
Tensor random_image(const Shape& shape, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(shape.numel()));
  for (float& e : v) e = dist(rng);
  return Tensor::from_vector<float>(v, shape);
}

/// Labels in blocks of 8 voxels drawn from all classes: every class is
/// present, so soft Dice sums over non-empty foreground like a real batch.
Tensor random_labels(std::int64_t batch, int extent, int classes, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const std::int64_t blocks = (extent + 7) / 8;
  std::vector<std::uint8_t> block_label(static_cast<std::size_t>(batch * blocks * blocks * blocks));
  for (auto& b : block_label) b = static_cast<std::uint8_t>(rng() % static_cast<std::uint64_t>(classes));
  Tensor t = Tensor::empty(Shape{batch, 1, extent, extent, extent}, DType::u8);
  std::uint8_t* p = t.data<std::uint8_t>();
  for (std::int64_t n = 0; n < batch; ++n)
    for (std::int64_t d = 0; d < extent; ++d)
      for (std::int64_t h = 0; h < extent; ++h)
        for (std::int64_t w = 0; w < extent; ++w)
          *p++ = block_label[static_cast<std::size_t>(((n * blocks + d / 8) * blocks + h / 8) * blocks + w / 8)];
  return t;
}

/// Common counters: GFLOP/s and voxels/s from the work of one iteration, and
/// the ratio to the anchor from the measured mean wall time.
void set_counters(benchmark::State& state, const ModelCase& c, double flops, double voxels, double seconds) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["voxels/s"] = benchmark::Counter(voxels, benchmark::Counter::kIsIterationInvariantRate);
  const double mean = seconds / static_cast<double>(state.iterations());
  if (c.anchor_s > 0 && mean > 0) state.counters["vs_anchor"] = c.anchor_s / mean;
  state.SetLabel(c.anchor_label);
}

void forward(benchmark::State& state, ModelCase c) {
  nn::STUNetConfig config = nn::preset(c.preset);
  config.deep_supervision = false;
  nn::STUNet net(config);
  net.init_he(1);
  net.eval();
  const Tensor x = random_image(Shape{1, 1, c.patch, c.patch, c.patch}, 2);
  stunet::NoGradGuard no_grad;
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<Tensor> y = net.forward(x);
    benchmark::DoNotOptimize(y[0].raw_data());
    benchmark::ClobberMemory();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  // forward_macs counts all five heads; with deep supervision off four tiny
  // 1x1 heads are skipped (< 1% of the MACs), kept for the anchors' numerator.
  const double macs = static_cast<double>(nn::forward_macs(config, {c.patch, c.patch, c.patch}));
  set_counters(state, c, 2.0 * macs, static_cast<double>(c.patch) * c.patch * c.patch, seconds);
}

void train_step(benchmark::State& state, ModelCase c) {
  constexpr std::int64_t kBatch = 2;
  const nn::STUNetConfig config = nn::preset(c.preset);  // deep supervision on, 105 classes
  nn::STUNet net(config);
  net.init_he(1);
  net.train();
  const Tensor image = random_image(Shape{kBatch, 1, c.patch, c.patch, c.patch}, 2);
  const Tensor labels = random_labels(kBatch, c.patch, config.num_classes, 3);
  const std::vector<double> weights = stunet::train::deep_supervision_weights(5);
  stunet::optim::SGD sgd(net.named_parameters(), stunet::optim::SGDOptions{});
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    sgd.zero_grad();
    const std::vector<Tensor> outputs = net.forward(image);
    // The targets are downsampled inside the step, as Trainer::train_step does.
    const Tensor loss = stunet::train::deep_supervision_loss(
        outputs, stunet::train::deep_supervision_targets(labels, config), weights);
    double value = loss.item();  // the trainer reads the loss before backward (its finite check)
    benchmark::DoNotOptimize(value);
    loss.backward();
    double norm = stunet::optim::clip_grad_norm(net.parameters(), 12.0);
    benchmark::DoNotOptimize(norm);
    sgd.step();
    benchmark::ClobberMemory();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double macs = static_cast<double>(nn::forward_macs(config, {c.patch, c.patch, c.patch}));
  set_counters(state, c, 3.0 * 2.0 * macs * kBatch, static_cast<double>(kBatch) * c.patch * c.patch * c.patch,
               seconds);
}

// Anchors: /work/shared/anchors/README.md, "CPU: this kind of machine". Its
// train steps use CE only (ours: DC+CE, a little more work) and exist at
// 64^3 only; for 128^3 the nearest figure is the H100 fp32 train step.
constexpr ModelCase kForwardSmall64{"small", 64, 1.22, "PyTorch CPU anchor 1.22 s"};
constexpr ModelCase kForwardSmall128{"small", 128, 5.39, "PyTorch CPU anchor 5.39 s"};
constexpr ModelCase kForwardBase64{"base", 64, 2.12, "PyTorch CPU anchor 2.12 s"};
constexpr ModelCase kForwardBase128{"base", 128, 9.50, "PyTorch CPU anchor 9.50 s"};
constexpr ModelCase kTrainSmall64{"small", 64, 2.58, "PyTorch CPU anchor 2.58 s (CE only)"};
constexpr ModelCase kTrainSmall128{"small", 128, 0, "no CPU anchor (PyTorch H100 fp32 0.295 s)"};
constexpr ModelCase kTrainBase64{"base", 64, 5.30, "PyTorch CPU anchor 5.30 s (CE only)"};
constexpr ModelCase kTrainBase128{"base", 128, 0, "no CPU anchor (PyTorch H100 fp32 0.497 s)"};

}  // namespace

// Seconds-long iterations: a fixed count instead of Google Benchmark's
// adaptive search, which would otherwise repeat the 128^3 cases for minutes.
#define STUNET_MODEL_BENCH(fn, name, c, iters) \
  BENCHMARK_CAPTURE(fn, name, c)->Unit(benchmark::kSecond)->Iterations(iters)->UseRealTime()

STUNET_MODEL_BENCH(forward, small_64, kForwardSmall64, 2);
STUNET_MODEL_BENCH(forward, base_64, kForwardBase64, 2);
STUNET_MODEL_BENCH(forward, small_128, kForwardSmall128, 1);
STUNET_MODEL_BENCH(forward, base_128, kForwardBase128, 1);
STUNET_MODEL_BENCH(train_step, small_64, kTrainSmall64, 2);
STUNET_MODEL_BENCH(train_step, base_64, kTrainBase64, 1);
STUNET_MODEL_BENCH(train_step, small_128, kTrainSmall128, 1);
STUNET_MODEL_BENCH(train_step, base_128, kTrainBase128, 1);

BENCHMARK_MAIN();
