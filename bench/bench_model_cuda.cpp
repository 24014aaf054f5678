// Whole STU-Net on the GPU: inference forward (batch 1) and a train step
// (batch 2: forward, deep-supervision DC+CE, backward, clip 12, SGD Nesterov)
// of S and B at a 128^3 patch, 105 classes, in fp32 and fp16/bf16 mixed
// precision (float32 master weights, dynamic loss scaling for fp16). Timed
// on the host around synchronisations of the context stream (manual time); TFLOP/s counts the
// convolutions only, 2 * MACs forward and 3x that for a train step, as
// ../shared/anchors/README.md does. Anchors (PyTorch 2.11 + cuDNN, H100):
// train step b2 S fp32 294.9 / fp16 133.5 / bf16 145.8 ms, B fp32 497.1 /
// fp16 155.8 / bf16 169.1 ms; forward b1 S 24.0 / 14.7 / 23.5 ms, B 44.8 /
// 19.5 / 29.0 ms. `vs_anchor` = anchor time / ours (> 1: faster than PyTorch).
#include <benchmark/benchmark.h>

#include <cstdio>
#include <string>

#include <chrono>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/autograd/grad_mode.hpp"
#include "stunet/nn/stunet.hpp"
#include "stunet/optim/grad_scaler.hpp"
#include "stunet/optim/sgd.hpp"
#include "stunet/train/deep_supervision.hpp"
#include "stunet/train/targets.hpp"

using namespace stunet;

namespace {

struct Anchor {
  double train_ms, forward_ms;
};

Anchor anchor_for(const std::string& preset, DType dt) {
  const bool small = preset == "small";
  switch (dt) {
    case DType::f16: return small ? Anchor{133.5, 14.7} : Anchor{155.8, 19.5};
    case DType::bf16: return small ? Anchor{145.8, 23.5} : Anchor{169.1, 29.0};
    default: return small ? Anchor{294.9, 24.0} : Anchor{497.1, 44.8};
  }
}

const char* precision_name(DType dt) { return dt == DType::f16 ? "fp16" : dt == DType::bf16 ? "bf16" : "fp32"; }

/// Milliseconds of `body`, from an idle GPU to the end of its work: a whole
/// step is ~100 ms of many kernels with host syncs inside (loss values), so
/// host timing around two stream synchronisations measures what a user waits.
template <class F> double time_ms(F&& body) {
  cuda_kernels().synchronize(0);
  const auto t0 = std::chrono::steady_clock::now();
  body();
  cuda_kernels().synchronize(0);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

nn::STUNetConfig config_for(const std::string& preset) {
  return preset == "small" ? nn::presets::small : nn::presets::base;
}

void BM_forward(benchmark::State& state, std::string preset, DType dt, int patch) {
  nn::STUNet net(config_for(preset));
  net.init_he(0);
  net.to(Device::cuda(0));
  net.set_compute_dtype(dt);
  Tensor x = Tensor::full(Shape{1, 1, patch, patch, patch}, 0.5, DType::f32, Device::cuda(0));
  NoGradGuard no_grad;
  for (auto _ : state) state.SetIterationTime(time_ms([&] { (void)net.forward(x); }) / 1e3);
  const double flops = 2.0 * static_cast<double>(nn::forward_macs(net.config(), {patch, patch, patch}));
  state.counters["TFLOP/s"] = benchmark::Counter(flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  if (patch == 128) {
    const double ms = anchor_for(preset, dt).forward_ms;
    state.SetLabel(fmt::format("anchor PyTorch {} {} fwd b1 {} ms", preset, precision_name(dt), ms));
    state.counters["vs_anchor"] = benchmark::Counter(ms / 1e3, benchmark::Counter::kIsIterationInvariantRate);
  }
}

void BM_train_step(benchmark::State& state, std::string preset, DType dt, int patch) {
  nn::STUNet net(config_for(preset));
  net.init_he(0);
  net.to(Device::cuda(0));
  net.set_compute_dtype(dt);
  optim::SGD sgd(net.named_parameters(), {.lr = 1e-2, .momentum = 0.99});
  optim::GradScaler scaler({.enabled = dt == DType::f16});
  Tensor x = Tensor::full(Shape{2, 1, patch, patch, patch}, 0.5, DType::f32, Device::cuda(0));
  // A label map with every class present, so that Dice has work everywhere.
  Tensor label = Tensor::empty(Shape{2, 1, patch, patch, patch}, DType::f32);
  {
    float* p = label.data<float>();
    for (std::int64_t i = 0; i < label.numel(); ++i) p[i] = static_cast<float>(i % 105);
  }
  std::vector<Tensor> targets = train::deep_supervision_targets(label, net.config());
  for (Tensor& t : targets) t = t.to(Device::cuda(0));
  const auto weights = train::deep_supervision_weights(5);
  auto step = [&] {
    sgd.zero_grad();
    Tensor loss = train::deep_supervision_loss(net.forward(x), targets, weights);
    scaler.scale(loss).backward();
    const auto params = net.parameters();
    if (!scaler.unscale_(params)) {
      optim::clip_grad_norm(params, 12.0);
      sgd.step();
    }
    scaler.update(false);
  };
  step();  // first step: momentum buffers, cache warm-up
  const auto before = cuda_kernels().allocator_counts(0);
  for (auto _ : state) state.SetIterationTime(time_ms(step) / 1e3);
  const auto after = cuda_kernels().allocator_counts(0);
  const double flops = 3 * 2.0 * 2 * static_cast<double>(nn::forward_macs(net.config(), {patch, patch, patch}));
  state.counters["TFLOP/s"] = benchmark::Counter(flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["cudaMalloc"] = static_cast<double>(after.device_mallocs - before.device_mallocs);
  state.counters["peak_GiB"] = static_cast<double>(after.live_bytes + after.cached_bytes) / (1024.0 * 1024 * 1024);
  if (patch == 128) {
    const double ms = anchor_for(preset, dt).train_ms;
    state.SetLabel(fmt::format("anchor PyTorch {} {} train b2 {} ms", preset, precision_name(dt), ms));
    state.counters["vs_anchor"] = benchmark::Counter(ms / 1e3, benchmark::Counter::kIsIterationInvariantRate);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (cuda_kernels().device_count == nullptr || cuda_kernels().device_count() == 0) {
    std::printf("stunet_bench_model_cuda: no CUDA device visible; nothing to measure\n");
    return 1;  // a run that measured nothing must not look like a success
  }
  for (const char* preset : {"small", "base"})
    for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
      const std::string tag = fmt::format("{}/{}", preset, precision_name(dt));
      benchmark::RegisterBenchmark(("forward_b1_128^3/" + tag).c_str(), BM_forward, preset, dt, 128)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->MinWarmUpTime(0.2);
      benchmark::RegisterBenchmark(("train_step_b2_128^3/" + tag).c_str(), BM_train_step, preset, dt, 128)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(5);
      // A small patch for a quick look (and for the smoke run).
      benchmark::RegisterBenchmark(("train_step_b2_32^3/" + tag).c_str(), BM_train_step, preset, dt, 32)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(3);
    }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
