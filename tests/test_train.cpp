// Training: the optimiser against a float64 reference written here, and
// (with the trainer) overfitting and exact resume.

#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>

#include <unistd.h>

#include <fmt/ranges.h>

#include "stunet/data/phantoms.hpp"
#include "stunet/data/preprocess.hpp"
#include "stunet/nn/stunet.hpp"
#include "stunet/optim/sgd.hpp"
#include "stunet/train/deep_supervision.hpp"
#include "stunet/train/trainer.hpp"
#include "stunet/io/safetensors.hpp"
#include "testing.hpp"

using namespace stunet;

namespace {

nn::STUNetConfig tiny_config() {
  // Two real poolings and three of 1 (allowed, as anisotropic kernels are):
  // a 16^3 input keeps a 4^3 bottleneck. With five (2,2,2) poolings it would
  // be 1 voxel, where instance norm divides rounding noise by sqrt(eps) and
  // float32 and float64 runs part ways after one step.
  return nn::STUNetConfig{.in_channels = 1,
                          .num_classes = 3,
                          .depth = {1, 1, 1, 1, 1, 1},
                          .dims = {4, 8, 8, 8, 8, 8},
                          .pool = {nn::Int3{2, 2, 2}, nn::Int3{2, 2, 2}, nn::Int3{1, 1, 1}, nn::Int3{1, 1, 1},
                                   nn::Int3{1, 1, 1}}};
}

// The fixed batch: a bright cube (class 1) and a dark slab (class 2) in noise.
struct FixedBatch {
  Tensor image;
  std::vector<Tensor> targets;
};

FixedBatch fixed_batch(DType dtype) {
  const std::int64_t s = 16;
  std::vector<double> img(static_cast<std::size_t>(2 * s * s * s));
  std::vector<std::int64_t> lab(img.size());
  Tensor noise = testing::random_tensor(Shape{2, 1, s, s, s}, DType::f64, 17, -0.3, 0.3);
  auto nv = noise.to_vector<double>();
  for (std::int64_t n = 0; n < 2; ++n)
    for (std::int64_t z = 0; z < s; ++z)
      for (std::int64_t y = 0; y < s; ++y)
        for (std::int64_t x = 0; x < s; ++x) {
          const std::size_t i = static_cast<std::size_t>(((n * s + z) * s + y) * s + x);
          int c = 0;
          if (z > 3 + n && z < 10 && y > 3 && y < 11 && x > 5 && x < 13) c = 1;
          else if (z > 12 && x < 6) c = 2;
          lab[i] = c;
          img[i] = (c == 1 ? 1.0 : c == 2 ? -1.0 : 0.0) + nv[i];
        }
  FixedBatch b;
  b.image = Tensor::from_vector<double>(img, Shape{2, 1, s, s, s}).to(dtype);
  Tensor full = Tensor::from_vector<std::int64_t>(lab, Shape{2, 1, s, s, s});
  // Deep-supervision targets: every 2^k-th voxel (nearest), as the trainer's downsampling does for factor 2.
  for (int k = 0; k < 5; ++k) {
    const std::int64_t f = std::int64_t{1} << std::min(k, 2), t = s / f;
    std::vector<std::int64_t> v(static_cast<std::size_t>(2 * t * t * t));
    for (std::int64_t n = 0; n < 2; ++n)
      for (std::int64_t z = 0; z < t; ++z)
        for (std::int64_t y = 0; y < t; ++y)
          for (std::int64_t x = 0; x < t; ++x)
            v[static_cast<std::size_t>(((n * t + z) * t + y) * t + x)] =
                lab[static_cast<std::size_t>(((n * s + z * f) * s + y * f) * s + x * f)];
    b.targets.push_back(Tensor::from_vector<std::int64_t>(v, Shape{2, 1, t, t, t}));
  }
  return b;
}

Tensor loss_of(nn::STUNet& net, const FixedBatch& b) {
  return train::deep_supervision_loss(net.forward(b.image), b.targets, train::deep_supervision_weights(5));
}

bool is_head(const std::string& key) { return key.rfind("seg_outputs.", 0) == 0; }

}  // namespace

TEST_CASE("SGD Nesterov + weight decay + clipping + two lr groups: 20 steps equal a float64 reference") {
  const double lr = 0.02, momentum = 0.99, wd = 3e-5, max_norm = 0.5;  // small max_norm: clipping fires
  for (DType dtype : {DType::f64, DType::f32}) {
    CAPTURE(dtype_name(dtype));
    nn::STUNet lib(tiny_config(), dtype), ref(tiny_config(), DType::f64);
    lib.init_he(4);
    ref.init_he(4);
    std::vector<Tensor> initial;
    for (auto& [k, p] : ref.named_parameters()) initial.push_back(p.clone());
    const FixedBatch batch_lib = fixed_batch(dtype), batch_ref = fixed_batch(DType::f64);

    // Library: backbone at 0.1x, head at lr (the paper's fine-tuning variant).
    nn::StateDict backbone, head;
    for (auto& [k, p] : lib.named_parameters()) (is_head(k) ? head : backbone).emplace_back(k, p);
    optim::SGD sgd({}, optim::SGDOptions{.lr = lr, .momentum = momentum, .weight_decay = wd});
    sgd.add_group(backbone, 0.1 * lr);
    sgd.add_group(head, lr);

    // Reference: torch.optim.SGD's update written out in double.
    std::map<std::string, std::vector<double>> buf;
    int clipped = 0;
    double first_loss = 0, last_loss = 0;
    for (int step = 0; step < 20; ++step) {
      lib.zero_grad();
      Tensor l = loss_of(lib, batch_lib);
      l.backward();
      const double norm = optim::clip_grad_norm(lib.parameters(), max_norm);
      sgd.step();

      ref.zero_grad();
      Tensor lr_loss = loss_of(ref, batch_ref);
      lr_loss.backward();
      if (step == 0) first_loss = lr_loss.item();
      last_loss = lr_loss.item();
      double sq = 0;
      for (auto& [k, p] : ref.named_parameters())
        if (p.grad().defined())
          for (double g : p.grad().to_vector<double>()) sq += g * g;
      const double ref_norm = std::sqrt(sq);
      // float32: the norm is dominated by the small coarse outputs' gradients,
      // the most rounding-sensitive part; the parameters below are the test.
      CHECK(norm == doctest::Approx(ref_norm).epsilon(dtype == DType::f64 ? 1e-9 : 5e-2));
      const double coef = std::min(1.0, max_norm / (ref_norm + 1e-6));
      if (coef < 1.0) ++clipped;
      for (auto& [k, p] : ref.named_parameters()) {
        if (!p.grad().defined()) continue;  // the weight-0 head: no gradient, no update, no decay
        const double rate = is_head(k) ? lr : 0.1 * lr;
        double* w = p.data<double>();
        const auto g = p.grad().to_vector<double>();
        auto [it, fresh] = buf.try_emplace(k, g.size(), 0.0);
        for (std::size_t i = 0; i < g.size(); ++i) {
          double d = g[i] * coef + wd * w[i];
          it->second[i] = fresh ? d : momentum * it->second[i] + d;
          d = d + momentum * it->second[i];
          w[i] -= rate * d;
        }
      }
    }
    CHECK(clipped > 0);
    CHECK(last_loss < first_loss);  // it is training, not just moving
    double worst = 0;
    std::string worst_key;
    const auto lib_params = lib.named_parameters(), ref_params = ref.named_parameters();
    // Errors relative to the largest distance training moved any parameter:
    // float32 gradients differ from float64 ones by ~1e-6 and 20 steps of
    // momentum 0.99 carry that along. (Per-tensor scales are meaningless for
    // conv biases feeding instance norm: their true gradient is 0.)
    double moved = 0;
    for (std::size_t i = 0; i < ref_params.size(); ++i)
      moved = std::max(moved, testing::max_abs_diff(ref_params[i].second, initial[i]));
    REQUIRE(moved > 1e-3);
    for (std::size_t i = 0; i < lib_params.size(); ++i) {
      const double e = testing::max_abs_diff(lib_params[i].second.to(DType::f64), ref_params[i].second) / moved;
      if (e > worst) worst_key = lib_params[i].first;
      worst = std::max(worst, e);
    }
    MESSAGE(fmt::format("{}: after 20 steps max parameter error {:.2e} (relative to the largest parameter change), loss {:.4f} -> {:.4f}, clipped {} of 20 ({})",
                        dtype_name(dtype), worst, first_loss, last_loss, clipped, worst_key));
    CHECK(worst < (dtype == DType::f64 ? 1e-10 : 1e-3));
  }
}

TEST_CASE("training steps are bitwise reproducible (fixed thread count)") {
  // Seeded runs must repeat exactly: no reduction may depend on thread timing.
  std::vector<std::vector<float>> runs;
  for (int r = 0; r < 2; ++r) {
    nn::STUNet net(tiny_config());
    net.init_he(8);
    const FixedBatch b = fixed_batch(DType::f32);
    optim::SGD sgd(net.named_parameters());
    for (int step = 0; step < 3; ++step) {
      sgd.zero_grad();
      loss_of(net, b).backward();
      optim::clip_grad_norm(net.parameters(), 12.0);
      sgd.step();
    }
    std::vector<float> all;
    for (auto& [k, p] : net.named_parameters())
      for (float v : p.to_vector<float>()) all.push_back(v);
    runs.push_back(std::move(all));
  }
  CHECK(runs[0] == runs[1]);
}

TEST_CASE("SGD: momentum buffers round-trip, errors name the parameter, poly schedule") {
  Tensor p = Tensor::from_vector<float>(std::vector<float>{1, 2, 3}, Shape{3});
  optim::SGD sgd({{"w", p}});
  p.set_grad(Tensor::from_vector<float>(std::vector<float>{1, 1, 1}, Shape{3}));
  sgd.step();
  CHECK(sgd.momentum_buffers().size() == 1);
  optim::SGD other({{"w", p}});
  other.load_momentum_buffers(sgd.momentum_buffers());
  CHECK(testing::max_abs_diff(other.momentum_buffers().at("w"), sgd.momentum_buffers().at("w")) == 0);
  CHECK_THROWS_AS(other.load_momentum_buffers({{"v", p}}), Error);
  CHECK_THROWS_AS(other.load_momentum_buffers({{"w", Tensor::zeros(Shape{4})}}), Error);
  CHECK_THROWS_AS(optim::SGD({{"w", p}, {"w", p}}), Error);
  Tensor q = Tensor::zeros(Shape{2}, DType::i64);
  CHECK_THROWS_AS(optim::SGD({{"q", q}}), Error);
  CHECK(optim::poly_lr_factor(0, 100) == 1.0);
  CHECK(optim::poly_lr_factor(50, 100) == doctest::Approx(std::pow(0.5, 0.9)));
  CHECK(optim::poly_lr_factor(100, 100) == 0.0);
  CHECK_THROWS_AS(optim::poly_lr_factor(101, 100), Error);
}

// ---- deep-supervision targets, trainer, resume, overfitting ----

TEST_CASE("deep-supervision targets equal the golden file's (nearest, even indices)") {
  if (testing::shared_dir().empty()) {
    MESSAGE("skipping: ../shared is absent (golden/stunet_tiny.safetensors)");
    return;
  }
  const auto g = io::read_safetensors(testing::shared_dir() / "golden" / "stunet_tiny.safetensors");
  const Tensor full = g.at("target.0").reshape(Shape{1, 1, 64, 64, 64});
  const auto targets = train::deep_supervision_targets(full, nn::STUNetConfig{});
  REQUIRE(targets.size() == 5);
  for (int i = 1; i < 5; ++i) {
    CAPTURE(i);
    const Tensor& ref = g.at(fmt::format("target.{}", i));
    CHECK(testing::max_abs_diff(targets[static_cast<std::size_t>(i)].reshape(ref.shape()), ref) == 0.0);
  }
  // Anisotropic kernels: (1,2,2) keeps D.
  nn::STUNetConfig c;
  c.pool[0] = {1, 2, 2};
  CHECK(train::deep_supervision_targets(full, c)[1].shape() == Shape{1, 1, 64, 32, 32});
  CHECK_THROWS_AS(train::downsample_labels(Tensor::zeros(Shape{1, 1, 5, 4, 4}), {2, 2, 2}), Error);
}

namespace {

// A labelled toy case: a bright ball (1) and a dark box (2) in noise.
data::TrainingCase toy_case(std::uint64_t seed, std::int64_t s = 24) {
  data::TrainingCase c;
  c.id = fmt::format("toy{}", seed);
  std::vector<float> img(static_cast<std::size_t>(s * s * s));
  std::vector<std::uint8_t> lab(img.size());
  const auto noise = testing::random_tensor(Shape{s * s * s}, DType::f32, seed, -0.3, 0.3).to_vector<float>();
  c.locations.resize(3);
  for (std::int64_t z = 0; z < s; ++z)
    for (std::int64_t y = 0; y < s; ++y)
      for (std::int64_t x = 0; x < s; ++x) {
        const std::size_t i = static_cast<std::size_t>((z * s + y) * s + x);
        const double r2 = (z - 10.0) * (z - 10.0) + (y - 12.0) * (y - 12.0) + (x - 9.0 - static_cast<double>(seed % 3)) * (x - 9.0 - static_cast<double>(seed % 3));
        std::uint8_t l = r2 < 36 ? 1 : (z > 16 && y < 8 ? 2 : 0);
        lab[i] = l;
        img[i] = (l == 1 ? 1.0f : l == 2 ? -1.0f : 0.0f) + noise[i];
        if (l) c.locations[l].push_back(data::Voxel{z, y, x});
      }
  c.data = Tensor::from_vector<float>(img, Shape{1, s, s, s});
  c.seg = Tensor::from_vector<std::uint8_t>(lab, Shape{1, s, s, s});
  return c;
}

train::TrainerOptions toy_options(const std::filesystem::path& dir) {
  train::TrainerOptions o;
  o.epochs = 2;
  o.iterations_per_epoch = 3;
  o.validation_batches = 2;
  o.loader.patch = {16, 16, 16};
  o.loader.workers = 1;
  o.loader.seed = 3;
  o.output_dir = dir;
  o.progress = false;
  o.label_names = {"background", "ball", "box"};
  return o;
}

}  // namespace

TEST_CASE("trainer: resume from the epoch-1 checkpoint equals the uninterrupted run, bit for bit") {
  namespace fs = std::filesystem;
  const fs::path root = fs::temp_directory_path() / fmt::format("stunet_resume_{}", ::getpid());
  fs::remove_all(root);
  auto cases = std::make_shared<std::vector<data::TrainingCase>>();
  cases->push_back(toy_case(1));
  cases->push_back(toy_case(2));
  auto val = std::make_shared<std::vector<data::TrainingCase>>(1, toy_case(3));

  nn::STUNet straight(tiny_config());
  straight.init_he(5);
  train::Trainer a(straight, cases, val, toy_options(root / "a"));
  const auto history_a = a.fit();
  REQUIRE(history_a.size() == 2);
  CHECK(fs::exists(root / "a" / "checkpoint_final.safetensors"));
  CHECK(fs::exists(root / "a" / "training_log.csv"));
  CHECK(fs::exists(root / "a" / "progress.png"));

  nn::STUNet first(tiny_config());
  first.init_he(5);
  {
    train::Trainer b(first, cases, val, toy_options(root / "b"));
    b.fit(1);  // stop after one epoch
    CHECK(b.epoch() == 1);
  }
  nn::STUNet resumed(tiny_config());
  resumed.init_he(99);  // whatever: the checkpoint overwrites it
  train::Trainer c(resumed, cases, val, toy_options(root / "b"));
  c.resume(root / "b" / "checkpoint_latest.safetensors");
  CHECK(c.epoch() == 1);
  const auto history_c = c.fit();
  REQUIRE(history_c.size() == 2);
  CHECK(history_c[1].train_loss == history_a[1].train_loss);
  CHECK(history_c[1].val_loss == history_a[1].val_loss);
  const auto pa = straight.named_parameters(), pc = resumed.named_parameters();
  double worst = 0;
  for (std::size_t i = 0; i < pa.size(); ++i) worst = std::max(worst, testing::max_abs_diff(pa[i].second, pc[i].second));
  CHECK(worst == 0.0);
  // The CSV has a header and one row per epoch.
  std::ifstream csv(root / "b" / "training_log.csv");
  std::string line;
  int lines = 0;
  while (std::getline(csv, line)) ++lines;
  CHECK(lines == 3);
  fs::remove_all(root);
}

TEST_CASE("trainer: a non-finite loss stops training and names the iteration and the last good checkpoint") {
  namespace fs = std::filesystem;
  const fs::path root = fs::temp_directory_path() / fmt::format("stunet_nan_{}", ::getpid());
  fs::remove_all(root);
  auto cases = std::make_shared<std::vector<data::TrainingCase>>(1, toy_case(1));
  Tensor bad = (*cases)[0].data.clone();
  bad.data<float>()[100] = std::numeric_limits<float>::quiet_NaN();
  (*cases)[0].data = bad;
  nn::STUNet net(tiny_config());
  net.init_he(1);
  auto o = toy_options(root);
  o.loader.patch = {24, 24, 24};
  o.loader.augment = data::AugmentOptions::none();
  train::Trainer t(net, cases, nullptr, o);
  CHECK_THROWS_WITH_AS(t.fit(), doctest::Contains("not finite at epoch 0 iteration 0"), Error);
  CHECK_FALSE(fs::exists(root / "checkpoint_latest.safetensors"));
  fs::remove_all(root);
  // Mismatched patch and pooling is refused up front.
  auto o2 = toy_options("");
  o2.loader.patch = {18, 16, 16};
  CHECK_THROWS_WITH_AS(train::Trainer(net, cases, nullptr, o2), doctest::Contains("not divisible"), Error);
}

// The overfitting run's size (a D/2 x D x D phantom) and length.
constexpr std::int64_t kOverfitSize = 48;
constexpr int kOverfitEpochs = 6, kOverfitIterations = 60;  // poly decay lets the last steps settle

TEST_CASE("trainer: a tiny STU-Net overfits one phantom case, every class Dice > 0.9") {
  // The whole case fits in one patch, so each step sees all of it and the
  // validation pass (same case, no augmentation) scores every voxel: its
  // pseudo Dice is the case's Dice per class. Momentum 0.9 with lr 0.1 (the
  // same lr / (1 - momentum) as nnU-Net's 1e-2 / 0.99) because 0.99 averages
  // ~100 steps and this run is a few hundred.
  const data::PhantomTask task = data::PhantomTask::downstream;
  const data::PhantomCase pc = data::generate_phantom(task, {kOverfitSize / 2, kOverfitSize, kOverfitSize}, 1, 0);
  data::PreprocessPlan plan;
  plan.target_spacing = pc.image.spacing;  // no resampling: the phantom's own grid
  const data::PreprocessedCase pre = data::preprocess_case(pc.image, &pc.label, plan, 0);
  auto cases = std::make_shared<std::vector<data::TrainingCase>>(
      1, data::TrainingCase{"phantom", pre.data, pre.seg, pre.class_locations});
  const int classes = static_cast<int>(data::phantom_labels(task).size());
  // Every class is present (the lesions too), so no Dice is NaN by absence.
  for (int k = 1; k < classes; ++k)
    REQUIRE_MESSAGE(pre.class_locations.size() > static_cast<std::size_t>(k), "class ", k, " absent");

  nn::STUNetConfig c{.in_channels = 1, .num_classes = classes, .depth = {1, 1, 1, 1, 1, 1},
                     .dims = {8, 16, 32, 32, 32, 32},
                     .pool = {nn::Int3{2, 2, 2}, nn::Int3{2, 2, 2}, nn::Int3{2, 2, 2}, nn::Int3{1, 2, 2},
                              nn::Int3{1, 1, 1}}};
  nn::STUNet net(c);
  net.init_he(0);
  train::TrainerOptions o;
  o.epochs = kOverfitEpochs;
  o.iterations_per_epoch = kOverfitIterations;
  o.validation_batches = 1;
  o.lr = 0.1;
  o.momentum = 0.9;
  o.loader.batch_size = 1;
  o.loader.patch = {kOverfitSize / 2, kOverfitSize, kOverfitSize};
  o.loader.workers = 0;
  o.loader.augment = data::AugmentOptions::none();
  o.progress = false;
  train::Trainer t(net, cases, cases, o);
  const train::EpochRecord before = t.validate();
  const auto& history = t.fit();
  REQUIRE(history.size() == static_cast<std::size_t>(kOverfitEpochs));
  const auto& r = history.back();
  for (int k = 1; k < classes; ++k) {
    const std::size_t i = static_cast<std::size_t>(k - 1);
    INFO("class ", data::phantom_labels(task)[static_cast<std::size_t>(k)], ": Dice ", before.dice[i], " before, ",
         r.dice[i], " after ", kOverfitEpochs * kOverfitIterations, " steps");
    CHECK(r.dice[i] > 0.9);
  }
  MESSAGE("overfit one phantom case in ", kOverfitEpochs * kOverfitIterations, " steps: train loss ", r.train_loss, ", Dice per class ",
          fmt::format("{:.3f}", fmt::join(r.dice, " ")));
}

TEST_CASE("GradScaler: unscales in place, skips on Inf/NaN, backs off and grows as torch's") {
  Tensor p = Tensor::zeros(Shape{4}).set_requires_grad();
  auto set_grad = [&](std::vector<float> g) { p.set_grad(Tensor::from_vector<float>(g, Shape{4})); };
  optim::GradScaler scaler({.init_scale = 8.0, .growth_interval = 2});
  Tensor loss = Tensor::full(Shape{}, 1.5);
  CHECK(scaler.scale(loss).item() == 12.0);

  set_grad({8, -16, 4, 0});
  CHECK_FALSE(scaler.unscale_({p}));
  CHECK(p.grad().to_vector<float>() == std::vector<float>{1, -2, 0.5f, 0});
  scaler.update(false);
  CHECK(scaler.get_scale() == 8.0);
  scaler.update(false);  // second clean step: growth_interval reached
  CHECK(scaler.get_scale() == 16.0);

  set_grad({1, std::numeric_limits<float>::infinity(), 0, 0});
  CHECK(scaler.unscale_({p}));
  set_grad({std::nanf(""), 0, 0, 0});
  CHECK(scaler.unscale_({p}));
  scaler.update(true);
  CHECK(scaler.get_scale() == 8.0);
  CHECK(scaler.skipped_steps() == 1);

  optim::GradScaler off({.enabled = false});
  CHECK(off.scale(loss).is_same(loss));
  set_grad({std::nanf(""), 0, 0, 0});
  CHECK_FALSE(off.unscale_({p}));  // disabled: the trainer's own finiteness check decides
  CHECK_THROWS_AS(optim::GradScaler({.backoff_factor = 1.5}), stunet::Error);
}

TEST_CASE("Module::to and Tensor::set_data keep parameter identity (optimiser handles follow)") {
  nn::STUNet net(nn::STUNetConfig{.in_channels = 1, .num_classes = 2, .depth = {1, 1, 1, 1, 1, 1},
                                  .dims = {2, 2, 2, 2, 2, 2}});
  net.init_he(1);
  const Tensor handle = net.named_parameters()[0].second;  // as an optimiser holds it
  const std::vector<float> values = handle.to_vector<float>();
  net.to(Device::cpu());  // already there: nothing changes
  CHECK(net.device() == Device::cpu());
  CHECK(handle.is_same(net.named_parameters()[0].second));
  // set_data swaps the storage under every handle and drops the gradient.
  Tensor p = net.named_parameters()[0].second;
  p.set_grad(Tensor::ones(p.shape()));
  p.set_data(Tensor::full(p.shape(), 2.0, DType::f64));
  CHECK(handle.dtype() == DType::f64);
  CHECK(handle.to_vector<double>()[0] == 2.0);
  CHECK_FALSE(handle.grad().defined());
  CHECK(handle.requires_grad());
  // Mixed precision is a CUDA feature: a float16 forward on the host is refused by name.
  nn::STUNet small(nn::STUNetConfig{.in_channels = 1, .num_classes = 2, .depth = {1, 1, 1, 1, 1, 1},
                                    .dims = {2, 2, 2, 2, 2, 2}});
  small.set_compute_dtype(DType::f16);
  CHECK_THROWS_WITH_AS(small.forward(Tensor::zeros(Shape{1, 1, 32, 32, 32})),
                       doctest::Contains("float16 / bfloat16 on CUDA"), stunet::Error);
}

TEST_CASE("Trainer refuses mixed precision on the host and CUDA without a GPU build or device") {
  auto cases = std::make_shared<std::vector<data::TrainingCase>>();
  data::TrainingCase tc;
  tc.id = "a";
  tc.data = Tensor::zeros(Shape{1, 16, 16, 16});
  tc.seg = Tensor::zeros(Shape{1, 16, 16, 16}, DType::i32);
  cases->push_back(tc);
  nn::STUNet net(nn::STUNetConfig{.in_channels = 1, .num_classes = 2, .depth = {1, 1, 1, 1, 1, 1},
                                  .dims = {2, 2, 2, 2, 2, 2}});
  train::TrainerOptions o;
  o.loader.patch = {32, 32, 32};
  o.compute_dtype = DType::bf16;
  CHECK_THROWS_WITH_AS(train::Trainer(net, cases, nullptr, o), doctest::Contains("CUDA only"), stunet::Error);
}
