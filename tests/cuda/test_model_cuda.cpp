// STU-Net on the GPU from plain C++ (g++, Eigen allowed: no CUDA header
// here; the GPU is reached through the kernel table that the linked kernels
// object fills), through the same ops as on the host: the golden tiny
// model (PyTorch float64 outputs, DC+CE loss and every gradient) in float64,
// float32 and mixed precision; training steps equal to the CPU's; no device
// allocation in a steady-state step; float16 loss scaling skipping an
// overflowing step; device mismatches reported.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <filesystem>
#include <memory>

#include <unistd.h>

#include <fmt/ranges.h>

#include "../testing.hpp"
#include "stunet/data/phantoms.hpp"
#include "stunet/data/preprocess.hpp"
#include "stunet/train/trainer.hpp"
#include "stunet/core/cuda_kernels.hpp"
#include "stunet/io/safetensors.hpp"
#include "stunet/nn/stunet.hpp"
#include "stunet/ops/conv3d.hpp"
#include "stunet/optim/grad_scaler.hpp"
#include "stunet/optim/sgd.hpp"
#include "stunet/train/deep_supervision.hpp"
#include "stunet/train/targets.hpp"

using namespace stunet;

namespace {

const nn::STUNetConfig kTiny{.in_channels = 1, .num_classes = 3, .depth = {1, 1, 1, 1, 1, 1},
                             .dims = {4, 8, 8, 16, 16, 16}};

double max_abs(const Tensor& t) {
  double m = 0;
  for (double v : t.to_vector<double>()) m = std::max(m, std::abs(v));
  return m;
}

/// Worst relative errors of one golden run.
struct GoldenErrors {
  double output = 0, loss = 0, grad = 0, input_grad = 0;
};

/// The golden tiny STU-Net with parameters of `param_dtype` on cuda:0,
/// activations in `compute_dtype`, against PyTorch's float64 figures.
GoldenErrors golden_on_gpu(DType param_dtype, DType compute_dtype) {
  auto g = io::read_safetensors(testing::shared_dir() / "golden" / "stunet_tiny.safetensors");
  nn::STUNet net(kTiny, param_dtype);
  nn::StateDict weights;
  for (const auto& [k, t] : g.tensors)
    if (k.rfind("conv_blocks", 0) == 0 || k.rfind("upsample", 0) == 0 || k.rfind("seg_outputs", 0) == 0)
      weights.emplace_back(k, t);
  net.load_state_dict(weights, /*strict=*/true);
  net.to(Device::cuda(0));
  net.set_compute_dtype(compute_dtype);
  CHECK(net.device() == Device::cuda(0));

  Tensor x = g.at("input").to(param_dtype).to(Device::cuda(0)).set_requires_grad();
  auto outputs = net.forward(x);
  REQUIRE(outputs.size() == 5);
  GoldenErrors e;
  std::vector<Tensor> targets;
  for (int i = 0; i < 5; ++i) {
    const Tensor& out = outputs[static_cast<std::size_t>(i)];
    CHECK(out.device() == Device::cuda(0));
    CHECK(out.dtype() == param_dtype);
    e.output = std::max(e.output, testing::max_rel_diff(out, g.at(fmt::format("output.{}", i))));
    targets.push_back(g.at(fmt::format("target.{}", i)).to(Device::cuda(0)));
  }
  Tensor loss = train::deep_supervision_loss(outputs, targets, train::deep_supervision_weights(5));
  CHECK(loss.device() == Device::cuda(0));
  const double ref_loss = std::stod(g.metadata.at("loss"));
  e.loss = std::abs(loss.item() - ref_loss) / std::abs(ref_loss);
  loss.backward();
  for (const auto& [k, p] : net.named_parameters()) {
    CAPTURE(k);
    const Tensor& ref = g.at("grad." + k);
    // Relative to the layer's gradient scale, as the CPU golden test (a conv
    // bias before an instance norm has a true gradient of zero).
    double scale = max_abs(ref);
    if (k.size() > 5 && k.compare(k.size() - 5, 5, ".bias") == 0)
      scale = std::max(scale, max_abs(g.at("grad." + k.substr(0, k.size() - 5) + ".weight")));
    if (!p.grad().defined()) {
      CHECK(scale == 0.0);
      continue;
    }
    CHECK(p.grad().device() == Device::cuda(0));
    CHECK(p.grad().dtype() == param_dtype);  // master gradients in the master dtype
    if (scale > 0) e.grad = std::max(e.grad, testing::max_abs_diff(p.grad(), ref) / scale);
  }
  e.input_grad = testing::max_rel_diff(x.grad(), g.at("input.grad"));
  return e;
}

/// A batch of the tiny model: image [2, 1, 16, 16, 16], labels in [0, 3).
struct TinyBatch {
  Tensor image, label;
};
TinyBatch tiny_batch(std::uint64_t seed) {
  return {testing::random_tensor(Shape{2, 1, 16, 16, 16}, DType::f32, seed),
          testing::random_labels(Shape{2, 1, 16, 16, 16}, 3, seed + 1, DType::f32)};
}

/// zero_grad, forward, deep-supervision DC+CE, backward, clip 12, SGD step.
double train_step(nn::STUNet& net, optim::SGD& sgd, const TinyBatch& b, Device dev,
                  optim::GradScaler* scaler = nullptr, bool* skipped = nullptr) {
  sgd.zero_grad();
  auto outputs = net.forward(b.image.to(net.named_parameters().front().second.dtype()).to(dev));
  std::vector<Tensor> targets = train::deep_supervision_targets(b.label, net.config());
  for (Tensor& t : targets) t = t.to(dev);
  Tensor loss = train::deep_supervision_loss(outputs, targets, train::deep_supervision_weights(5));
  const double value = loss.item();
  (scaler ? scaler->scale(loss) : loss).backward();
  const std::vector<Tensor> params = net.parameters();
  if (scaler && scaler->unscale_(params)) {
    scaler->update(true);
    if (skipped) *skipped = true;
    return value;
  }
  optim::clip_grad_norm(params, 12.0);
  sgd.step();
  if (scaler) scaler->update(false);
  if (skipped) *skipped = false;
  return value;
}

}  // namespace

TEST_CASE("cuda model: the golden tiny STU-Net on the GPU matches PyTorch (float64, float32, bf16, fp16)") {
  if (testing::shared_dir().empty()) {
    MESSAGE("skipping: ../shared is absent (golden/stunet_tiny.safetensors); set STUNET_SHARED");
    return;
  }
  SUBCASE("float64: every kernel's double path against PyTorch's float64") {
    const GoldenErrors e = golden_on_gpu(DType::f64, DType::f64);
    MESSAGE(fmt::format("cuda f64: outputs {:.2e}, loss {:.2e}, grads {:.2e}, input grad {:.2e}", e.output, e.loss,
                        e.grad, e.input_grad));
    // Only summation order differs from PyTorch's float64: ~1e-13 observed on the host.
    CHECK(e.output < 1e-10);
    CHECK(e.loss < 1e-10);
    CHECK(e.grad < 1e-8);
    CHECK(e.input_grad < 1e-8);
  }
  SUBCASE("float32: the CPU golden test's tolerances") {
    const GoldenErrors e = golden_on_gpu(DType::f32, DType::f32);
    MESSAGE(fmt::format("cuda f32: outputs {:.2e}, loss {:.2e}, grads {:.2e}, input grad {:.2e}", e.output, e.loss,
                        e.grad, e.input_grad));
    CHECK(e.output < 1e-4);
    CHECK(e.loss < 1e-5);
    CHECK(e.grad < 1e-3);
    CHECK(e.input_grad < 1e-3);
  }
  SUBCASE("mixed precision: float32 masters, 16-bit activations") {
    // Each layer rounds its activations to 8 (bf16) or 11 (fp16) significant
    // bits; through ~20 layers with renormalisation the relative error of the
    // outputs stays near a few units of the last place: 2^-8 * ~5 for bf16,
    // 2^-11 * ~5 for fp16. Gradients pass through the same roundings twice.
    const GoldenErrors h = golden_on_gpu(DType::f32, DType::f16);
    const GoldenErrors b = golden_on_gpu(DType::f32, DType::bf16);
    MESSAGE(fmt::format("cuda fp16: outputs {:.2e}, loss {:.2e}, grads {:.2e}; bf16: outputs {:.2e}, loss {:.2e}, "
                        "grads {:.2e}",
                        h.output, h.loss, h.grad, b.output, b.loss, b.grad));
    CHECK(h.output < 5e-3);
    CHECK(h.loss < 5e-3);
    CHECK(h.grad < 2e-2);
    CHECK(b.output < 4e-2);
    CHECK(b.loss < 4e-2);
    CHECK(b.grad < 1e-1);
  }
}

TEST_CASE("cuda model: three training steps on the GPU equal the CPU's") {
  for (DType dt : {DType::f64, DType::f32}) {
    CAPTURE(dt);
    nn::STUNet cpu_net(kTiny, dt), gpu_net(kTiny, dt);
    cpu_net.init_he(7);
    gpu_net.init_he(7);
    gpu_net.to(Device::cuda(0));
    optim::SGD cpu_sgd(cpu_net.named_parameters(), {.lr = 0.05, .momentum = 0.9});
    optim::SGD gpu_sgd(gpu_net.named_parameters(), {.lr = 0.05, .momentum = 0.9});
    for (int step = 0; step < 3; ++step) {
      const TinyBatch b = tiny_batch(100 + static_cast<std::uint64_t>(step));
      const double lc = train_step(cpu_net, cpu_sgd, b, Device::cpu());
      const double lg = train_step(gpu_net, gpu_sgd, b, Device::cuda(0));
      CHECK(std::abs(lc - lg) <= (dt == DType::f64 ? 1e-10 : 1e-5) * std::abs(lc));
    }
    // Parameters after three updates (momentum and Nesterov included).
    const auto cp = cpu_net.named_parameters(), gp = gpu_net.named_parameters();
    double worst = 0;
    for (std::size_t i = 0; i < cp.size(); ++i) {
      const double scale = std::max(max_abs(cp[i].second), 1e-12);
      worst = std::max(worst, testing::max_abs_diff(cp[i].second, gp[i].second.to(Device::cpu())) / scale);
    }
    MESSAGE(fmt::format("{}: parameters after 3 steps, GPU vs CPU: {:.2e} relative", dt, worst));
    // float32: different summation orders (split reductions, tiled GEMMs)
    // over 3 steps of lr 0.05; float64 leaves ~1e-12.
    CHECK(worst < (dt == DType::f64 ? 1e-9 : 1e-4));
  }
}

TEST_CASE("cuda model: a steady-state training step allocates no device memory") {
  nn::STUNet net(kTiny);
  net.init_he(3);
  net.to(Device::cuda(0));
  optim::SGD sgd(net.named_parameters(), {.lr = 0.01});
  for (int i = 0; i < 2; ++i) train_step(net, sgd, tiny_batch(200 + static_cast<std::uint64_t>(i)), Device::cuda(0));
  const auto before = cuda_kernels().allocator_counts(0);
  for (int i = 2; i < 5; ++i) train_step(net, sgd, tiny_batch(200 + static_cast<std::uint64_t>(i)), Device::cuda(0));
  const auto after = cuda_kernels().allocator_counts(0);
  MESSAGE(fmt::format("3 steady steps: {} allocations served, {} reached cudaMalloc", after.allocations - before.allocations,
                      after.device_mallocs - before.device_mallocs));
  CHECK(after.allocations > before.allocations);  // the counter counts
  CHECK(after.device_mallocs == before.device_mallocs);
}

TEST_CASE("cuda model: float16 loss scaling skips an overflowing step and backs off") {
  nn::STUNet net(kTiny);
  net.init_he(5);
  net.to(Device::cuda(0));
  net.set_compute_dtype(DType::f16);
  optim::SGD sgd(net.named_parameters(), {.lr = 0.01});
  // 2^100 overflows every float16 gradient (max 65504) on the way back.
  optim::GradScaler scaler({.init_scale = std::ldexp(1.0, 100)});
  const std::vector<double> before = net.named_parameters()[0].second.to_vector<double>();
  bool skipped = false;
  train_step(net, sgd, tiny_batch(300), Device::cuda(0), &scaler, &skipped);
  CHECK(skipped);
  CHECK(scaler.get_scale() == std::ldexp(1.0, 99));
  CHECK(scaler.skipped_steps() == 1);
  CHECK(net.named_parameters()[0].second.to_vector<double>() == before);  // untouched
  // A sane scale trains: the step is taken and the parameters move.
  optim::GradScaler ok;
  train_step(net, sgd, tiny_batch(301), Device::cuda(0), &ok, &skipped);
  CHECK_FALSE(skipped);
  CHECK(net.named_parameters()[0].second.to_vector<double>() != before);
}

TEST_CASE("cuda model: ops refuse tensors on different devices, naming them") {
  Tensor x = testing::random_tensor(Shape{1, 2, 4, 4, 4}, DType::f32, 1).to(Device::cuda(0));
  Tensor w = testing::random_tensor(Shape{3, 2, 3, 3, 3}, DType::f32, 2);  // host
  CHECK_THROWS_WITH_AS(conv3d(x, w), doctest::Contains("cuda:0"), stunet::Error);
  CHECK_THROWS_WITH_AS(add(x, x.to(Device::cpu())), doctest::Contains("devices differ"), stunet::Error);
}

TEST_CASE("cuda model: the Trainer on the GPU overfits one phantom case (fp32 and bf16), checkpoint and resume") {
  // The CPU suite's overfitting test, run by train::Trainer with device cuda:0.
  const data::PhantomTask task = data::PhantomTask::downstream;
  const data::PhantomCase pc = data::generate_phantom(task, {24, 48, 48}, 1, 0);
  data::PreprocessPlan plan;
  plan.target_spacing = pc.image.spacing;
  const data::PreprocessedCase pre = data::preprocess_case(pc.image, &pc.label, plan, 0);
  auto cases = std::make_shared<std::vector<data::TrainingCase>>(
      1, data::TrainingCase{"phantom", pre.data, pre.seg, pre.class_locations});
  const int classes = static_cast<int>(data::phantom_labels(task).size());
  const nn::STUNetConfig c{.in_channels = 1, .num_classes = classes, .depth = {1, 1, 1, 1, 1, 1},
                           .dims = {8, 16, 32, 32, 32, 32},
                           .pool = {nn::Int3{2, 2, 2}, nn::Int3{2, 2, 2}, nn::Int3{2, 2, 2}, nn::Int3{1, 2, 2},
                                    nn::Int3{1, 1, 1}}};
  for (DType precision : {DType::f32, DType::bf16}) {
    CAPTURE(precision);
    nn::STUNet net(c);
    net.init_he(0);
    train::TrainerOptions o;
    o.epochs = 6;
    o.iterations_per_epoch = 60;
    o.validation_batches = 1;
    o.lr = 0.1;
    o.momentum = 0.9;
    o.loader.batch_size = 1;
    o.loader.patch = {24, 48, 48};
    o.loader.workers = 0;
    o.loader.augment = data::AugmentOptions::none();
    o.progress = false;
    o.device = Device::cuda(0);
    o.compute_dtype = precision;
    const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                      fmt::format("stunet_cuda_trainer_{}_{}", dtype_name(precision), ::getpid());
    o.output_dir = dir;
    train::Trainer t(net, cases, cases, o);
    CHECK(net.device() == Device::cuda(0));
    const auto& history = t.fit();
    REQUIRE(history.size() == 6u);
    for (int k = 1; k < classes; ++k) CHECK(history.back().dice[static_cast<std::size_t>(k - 1)] > 0.9);
    MESSAGE(fmt::format("GPU {} overfit, 360 steps: Dice {:.3f}", dtype_name(precision),
                        fmt::join(history.back().dice, " ")));
    // The checkpoint was written from device tensors; a fresh run resumes from it on the GPU.
    nn::STUNet again(c);
    train::TrainerOptions o2 = o;
    o2.output_dir = dir / "resumed";
    train::Trainer t2(again, cases, cases, o2);
    t2.resume(dir / "checkpoint_latest.safetensors");
    CHECK(t2.epoch() == 6);
    double worst = 0;
    const auto a = net.named_parameters(), b = again.named_parameters();
    for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, testing::max_abs_diff(a[i].second, b[i].second));
    CHECK(worst == 0.0);
    std::filesystem::remove_all(dir);
  }
}
