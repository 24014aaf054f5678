// Sliding-window inference of STU-Net-S (105 classes, He-initialised: the
// weights do not change the work) on the CPU, as `stunet-predict --fast`
// runs it: nnU-Net's tiling at step 0.5, Gaussian weighting, no mirror TTA,
// one tile per network call, the streamed argmax (predict_sliding_window_argmax).
//
// - v256: a 256^3 volume with 128^3 tiles, 3 per axis = 27 tiles;
// - v160: a 160^3 volume with 128^3 tiles, 2 per axis = 8 tiles;
// - p32_v48: 32^3 tiles over 48^3 (8 tiles), a smoke case of a few seconds.
//
// Counters: tiles/s, voxels/s of the volume, GFLOP/s of the network (2 x
// nn::forward_macs per tile; the Gaussian accumulation and the argmax are
// the rest of the time). The anchors have no CPU sliding window: `vs_anchor`
// compares with tiles x the PyTorch CPU forward of one 128^3 tile (5.39 s),
// the label also gives the H100 fp16 rate (80 tiles in 1.27 s).
//
//   stunet_bench_infer_cpu --benchmark_filter=p32_v48
//
// The 128^3-tile cases take minutes. OpenMP uses every core.

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "stunet/autograd/grad_mode.hpp"
#include "stunet/infer/sliding_window.hpp"
#include "stunet/nn/stunet.hpp"

namespace {

using stunet::DType;
using stunet::Shape;
using stunet::Tensor;
namespace nn = stunet::nn;
namespace infer = stunet::infer;

/// Tile and volume extents (cubes) and the per-tile CPU anchor (0: none).
struct InferCase {
  int patch;
  int volume;
  double anchor_tile_s;
  const char* label;
};

/// A z-scored-CT-like volume [1, v, v, v]: standard normal noise.
Tensor random_volume(int v, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Tensor t = Tensor::empty(Shape{1, v, v, v}, DType::f32);
  float* p = t.data<float>();
  for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = dist(rng);
  return t;
}

void sliding_window_small(benchmark::State& state, InferCase c) {
  nn::STUNetConfig config = nn::presets::small;
  config.deep_supervision = false;  // only the full-resolution head is used, as in the predictor
  auto net = std::make_shared<nn::STUNet>(config);
  net->init_he(1);
  net->eval();
  const infer::Network network = [net](const Tensor& x) {
    stunet::NoGradGuard no_grad;
    return net->forward(x)[0];
  };
  infer::SlidingWindowOptions options;
  options.patch = {c.patch, c.patch, c.patch};
  options.step_size = 0.5;
  options.mirror_axes = {};  // no TTA
  options.tile_batch = 1;
  const Tensor volume = random_volume(c.volume, 2);
  const infer::Extent3 extent{c.volume, c.volume, c.volume};
  const auto tiles = static_cast<double>(infer::tile_origins(extent, options.patch, options.step_size).size());

  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    Tensor labels = infer::predict_sliding_window_argmax(network, volume, options);
    benchmark::DoNotOptimize(labels.raw_data());
    benchmark::ClobberMemory();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double macs = static_cast<double>(nn::forward_macs(config, {c.patch, c.patch, c.patch}));
  state.counters["tiles"] = tiles;
  state.counters["tiles/s"] = benchmark::Counter(tiles, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["voxels/s"] = benchmark::Counter(static_cast<double>(c.volume) * c.volume * c.volume,
                                                  benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(tiles * 2.0 * macs * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  const double mean = seconds / static_cast<double>(state.iterations());
  if (c.anchor_tile_s > 0 && mean > 0) state.counters["vs_anchor"] = tiles * c.anchor_tile_s / mean;
  state.SetLabel(c.label);
}

// /work/shared/anchors/README.md: STU-Net-small forward at 128^3 on this CPU
// 5.39 s; sliding window of 80 tiles (272x272x336) on the H100, fp16: 1.27 s.
constexpr InferCase kV256{128, 256, 5.39, "27 x PyTorch CPU fwd 5.39 s = 146 s; PyTorch H100 fp16 63 tiles/s"};
constexpr InferCase kV160{128, 160, 5.39, "8 x PyTorch CPU fwd 5.39 s = 43 s; PyTorch H100 fp16 63 tiles/s"};
constexpr InferCase kSmoke{32, 48, 0, "smoke case, no anchor"};

}  // namespace

// Tens of seconds to minutes per iteration: one timed run, no adaptive search.
#define STUNET_INFER_BENCH(name, c) \
  BENCHMARK_CAPTURE(sliding_window_small, name, c)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime()

STUNET_INFER_BENCH(p32_v48, kSmoke);
STUNET_INFER_BENCH(p128_v160, kV160);
STUNET_INFER_BENCH(p128_v256, kV256);

BENCHMARK_MAIN();
