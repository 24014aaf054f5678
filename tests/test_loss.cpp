// Softmax, cross-entropy, soft Dice and DC+CE against naive double-precision
// references written the way the PyTorch / nnU-Net v2 code reads (one-hot,
// slicing, sums), finite-difference gradient checks, and the error contract.

#include "testing.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "stunet/ops/loss.hpp"
#include "stunet/ops/softmax.hpp"

using namespace stunet;
using stunet::testing::check_gradients;
using stunet::testing::max_rel_diff;
using stunet::testing::random_labels;
using stunet::testing::random_tensor;

namespace {

// ---- naive references (double) -----------------------------------------

/// softmax along `dim` of a row-major buffer of `shape`, one position at a time.
std::vector<double> ref_softmax(const std::vector<double>& x, const Shape& shape, int dim) {
  std::int64_t outer = 1, inner = 1;
  for (int i = 0; i < dim; ++i) outer *= shape[i];
  for (int i = dim + 1; i < shape.rank(); ++i) inner *= shape[i];
  const std::int64_t C = shape[dim];
  std::vector<double> y(x.size());
  for (std::int64_t o = 0; o < outer; ++o)
    for (std::int64_t i = 0; i < inner; ++i) {
      auto at = [&](std::int64_t c) { return static_cast<std::size_t>((o * C + c) * inner + i); };
      double m = -std::numeric_limits<double>::infinity();
      for (std::int64_t c = 0; c < C; ++c) m = std::max(m, x[at(c)]);
      double s = 0;
      for (std::int64_t c = 0; c < C; ++c) s += std::exp(x[at(c)] - m);
      for (std::int64_t c = 0; c < C; ++c) y[at(c)] = std::exp(x[at(c)] - m) / s;
    }
  return y;
}

struct Ncv {
  std::int64_t N, C, V;
};
Ncv ncv(const Tensor& x) { return {x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1))}; }

/// Labels as int64, whatever the target's layout and dtype (the .long() cast).
std::vector<std::int64_t> labels_of(const Tensor& target) {
  std::vector<std::int64_t> out;
  for (double v : target.to_vector<double>()) out.push_back(static_cast<std::int64_t>(v));
  return out;
}

/// torch.nn.CrossEntropyLoss()(logits, target): mean of -log_softmax[target],
/// with log_softmax = x - max - log(sum exp(x - max)) as torch computes it.
double ref_cross_entropy(const Tensor& logits, const Tensor& target) {
  // Plain variables, not a structured binding: clang < 16 cannot capture those.
  const Ncv d = ncv(logits);
  const std::int64_t N = d.N, C = d.C, V = d.V;
  const auto x = logits.to_vector<double>();
  const auto t = labels_of(target);
  double total = 0;
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t v = 0; v < V; ++v) {
      auto at = [&](std::int64_t c) { return x[static_cast<std::size_t>((n * C + c) * V + v)]; };
      double m = at(0);
      for (std::int64_t c = 1; c < C; ++c) m = std::max(m, at(c));
      double s = 0;
      for (std::int64_t c = 0; c < C; ++c) s += std::exp(at(c) - m);
      total += -(at(t[n * V + v]) - m - std::log(s));
    }
  return total / static_cast<double>(N * V);
}

/// MemoryEfficientSoftDiceLoss.forward(x, y) with apply_nonlin = None,
/// transcribed step by step.
double ref_soft_dice(const std::vector<double>& x, const Shape& shape, const std::vector<std::int64_t>& t,
                     SoftDiceOptions opt) {
  const std::int64_t N = shape[0], C = shape[1], V = shape.numel() / (N * C);
  using Mat = std::vector<std::vector<std::vector<double>>>;  // [N][C][V]
  Mat xs(N, std::vector<std::vector<double>>(C, std::vector<double>(V)));
  Mat y_onehot(N, std::vector<std::vector<double>>(C, std::vector<double>(V, 0.0)));
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t v = 0; v < V; ++v) xs[n][c][v] = x[static_cast<std::size_t>((n * C + c) * V + v)];
  // y_onehot.scatter_(1, y.long(), 1)
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t v = 0; v < V; ++v) y_onehot[n][t[n * V + v]][v] = 1.0;
  // if not do_bg: y_onehot = y_onehot[:, 1:]; x = x[:, 1:]
  if (!opt.do_bg)
    for (std::int64_t n = 0; n < N; ++n) {
      xs[n].erase(xs[n].begin());
      y_onehot[n].erase(y_onehot[n].begin());
    }
  const std::size_t Cs = xs[0].size();
  // intersect = (x * y_onehot).sum(axes); sum_pred = x.sum(axes); sum_gt = y_onehot.sum(axes)
  std::vector<std::vector<double>> intersect(N, std::vector<double>(Cs)), sum_pred = intersect, sum_gt = intersect;
  for (std::int64_t n = 0; n < N; ++n)
    for (std::size_t c = 0; c < Cs; ++c)
      for (std::int64_t v = 0; v < V; ++v) {
        intersect[n][c] += xs[n][c][v] * y_onehot[n][c][v];
        sum_pred[n][c] += xs[n][c][v];
        sum_gt[n][c] += y_onehot[n][c][v];
      }
  // if batch_dice: intersect = intersect.sum(0); ...
  if (opt.batch_dice) {
    for (auto* m : {&intersect, &sum_pred, &sum_gt}) {
      std::vector<double> s(Cs, 0.0);
      for (const auto& row : *m)
        for (std::size_t c = 0; c < Cs; ++c) s[c] += row[c];
      *m = {s};
    }
  }
  // dc = (2 * intersect + smooth) / clip(sum_gt + sum_pred + smooth, 1e-8); return -dc.mean()
  double total = 0;
  std::size_t count = 0;
  for (std::size_t r = 0; r < intersect.size(); ++r)
    for (std::size_t c = 0; c < Cs; ++c) {
      total += (2 * intersect[r][c] + opt.smooth) / std::max(sum_gt[r][c] + sum_pred[r][c] + opt.smooth, 1e-8);
      ++count;
    }
  return -total / static_cast<double>(count);
}
double ref_soft_dice(const Tensor& probs, const Tensor& target, SoftDiceOptions opt) {
  return ref_soft_dice(probs.to_vector<double>(), probs.shape(), labels_of(target), opt);
}

double ref_dc_and_ce(const Tensor& logits, const Tensor& target, DcCeOptions opt) {
  const auto p = ref_softmax(logits.to_vector<double>(), logits.shape(), 1);
  return opt.weight_ce * ref_cross_entropy(logits, target) +
         opt.weight_dice * ref_soft_dice(p, logits.shape(), labels_of(target), opt.dice);
}

double rel_err(double a, double ref) { return std::abs(a - ref) / std::max(std::abs(ref), 1e-300); }
double tol_for(DType dt) { return dt == DType::f32 ? 1e-5 : 1e-12; }

/// A label map [N, 1, spatial...] for scores of `shape`.
Shape target_shape(const Shape& shape) {
  std::vector<std::int64_t> d(shape.begin(), shape.end());
  d[1] = 1;
  return Shape(std::span<const std::int64_t>(d));
}
/// The same map without the channel axis, [N, spatial...].
Shape squeezed(const Shape& shape) {
  std::vector<std::int64_t> d(shape.begin(), shape.end());
  d.erase(d.begin() + 1);
  return Shape(std::span<const std::int64_t>(d));
}

const std::vector<Shape> kShapes = {Shape{2, 3, 3, 5, 7}, Shape{2, 4, 5, 3, 3}, Shape{2, 3, 7, 9}, Shape{2, 4, 11}};
const SoftDiceOptions kDiceVariants[] = {
    {true, false, 1e-5}, {true, true, 1e-5}, {false, false, 1e-5}, {false, true, 1e-5}};

std::string describe(const Shape& s, DType dt) { return fmt::format("shape {} dtype {}", s, dt); }
std::string describe(const SoftDiceOptions& o) {
  return fmt::format("batch_dice={} do_bg={} smooth={}", o.batch_dice, o.do_bg, o.smooth);
}

}  // namespace

// ---- forward against the references ---------------------------------------

TEST_CASE("softmax matches a double reference along any axis") {
  for (DType dt : {DType::f32, DType::f64})
    for (const Shape& s : kShapes)
      for (int dim : {1, 0, -1, 2}) {
        CAPTURE(describe(s, dt));
        CAPTURE(dim);
        Tensor x = random_tensor(s, dt, 11, -4, 4);
        Tensor y = softmax(x, dim);
        REQUIRE(y.shape() == s);
        REQUIRE(y.dtype() == dt);
        const int d = dim < 0 ? dim + s.rank() : dim;
        Tensor ref = Tensor::from_vector<double>(ref_softmax(x.to_vector<double>(), s, d), s);
        CHECK(max_rel_diff(y, ref) < tol_for(dt));
      }
}

TEST_CASE("softmax and cross_entropy are stable for huge logits") {
  for (DType dt : {DType::f32, DType::f64}) {
    CAPTURE(dt);
    Shape s{2, 4, 3, 5, 7};
    Tensor x = random_tensor(s, dt, 3, -1000, 1000);
    Tensor target = random_labels(target_shape(s), 4, 4);
    const double ce = cross_entropy(x, target).item();
    REQUIRE(std::isfinite(ce));
    CHECK(rel_err(ce, ref_cross_entropy(x, target)) < tol_for(dt));
    Tensor y = softmax(x);
    auto v = y.to_vector<double>();
    for (double e : v) REQUIRE(std::isfinite(e));
    CHECK(max_rel_diff(y, Tensor::from_vector<double>(ref_softmax(x.to_vector<double>(), s, 1), s)) < tol_for(dt));
    const std::int64_t V = 3 * 5 * 7;
    for (std::int64_t n = 0; n < 2; ++n)
      for (std::int64_t i = 0; i < V; ++i) {
        double sum = 0;
        for (std::int64_t c = 0; c < 4; ++c) sum += v[static_cast<std::size_t>((n * 4 + c) * V + i)];
        CHECK(sum == doctest::Approx(1.0).epsilon(1e-6));
      }
  }
}

TEST_CASE("cross_entropy matches torch.nn.CrossEntropyLoss (mean)") {
  for (DType dt : {DType::f32, DType::f64})
    for (const Shape& s : kShapes) {
      CAPTURE(describe(s, dt));
      Tensor logits = random_tensor(s, dt, 21, -3, 3);
      Tensor target = random_labels(target_shape(s), static_cast<int>(s[1]), 22);
      Tensor loss = cross_entropy(logits, target);
      CHECK(loss.rank() == 0);
      CHECK(loss.dtype() == dt);
      CHECK(rel_err(loss.item(), ref_cross_entropy(logits, target)) < tol_for(dt));
    }
  SUBCASE("plain classification [N, C] with target [N]") {
    Tensor logits = random_tensor(Shape{5, 3}, DType::f64, 4, -2, 2);
    Tensor target = random_labels(Shape{5}, 3, 5);
    CHECK(rel_err(cross_entropy(logits, target).item(), ref_cross_entropy(logits, target)) < 1e-12);
  }
}

TEST_CASE("soft_dice_loss matches MemoryEfficientSoftDiceLoss") {
  for (DType dt : {DType::f32, DType::f64})
    for (const Shape& s : kShapes)
      for (const SoftDiceOptions& opt : kDiceVariants) {
        CAPTURE(describe(s, dt));
        CAPTURE(describe(opt));
        Tensor probs = random_tensor(s, dt, 31, 0, 1);
        Tensor target = random_labels(target_shape(s), static_cast<int>(s[1]), 32);
        Tensor loss = soft_dice_loss(probs, target, opt);
        CHECK(loss.rank() == 0);
        CHECK(loss.dtype() == dt);
        CHECK(rel_err(loss.item(), ref_soft_dice(probs, target, opt)) < tol_for(dt));
      }
}

TEST_CASE("soft_dice_loss options change the result") {
  // Guards against an implementation that ignores an option: every variant
  // gives a different value on the same data.
  Shape s{2, 3, 3, 5, 7};
  Tensor probs = random_tensor(s, DType::f64, 41, 0, 1);
  Tensor target = random_labels(target_shape(s), 3, 42);
  std::vector<double> values;
  for (const SoftDiceOptions& opt : kDiceVariants) values.push_back(soft_dice_loss(probs, target, opt).item());
  for (std::size_t i = 0; i < values.size(); ++i)
    for (std::size_t j = i + 1; j < values.size(); ++j) CHECK(std::abs(values[i] - values[j]) > 1e-6);
  SoftDiceOptions big_smooth{true, false, 10.0};
  CHECK(rel_err(soft_dice_loss(probs, target, big_smooth).item(), ref_soft_dice(probs, target, big_smooth)) < 1e-12);
}

TEST_CASE("dc_and_ce_loss is weight_ce * CE + weight_dice * Dice(softmax)") {
  const DcCeOptions variants[] = {{}, {0.5, 2.0, {false, true, 1e-5}}, {1.0, 0.0, {}}, {0.0, 1.0, {}}, {0.0, 0.0, {}}};
  for (DType dt : {DType::f32, DType::f64})
    for (const Shape& s : {Shape{2, 3, 3, 5, 7}, Shape{2, 4, 5, 3, 3}})
      for (const DcCeOptions& opt : variants) {
        CAPTURE(describe(s, dt));
        CAPTURE(opt.weight_ce);
        CAPTURE(opt.weight_dice);
        Tensor logits = random_tensor(s, dt, 51, -3, 3);
        Tensor target = random_labels(target_shape(s), static_cast<int>(s[1]), 52);
        Tensor loss = dc_and_ce_loss(logits, target, opt);
        CHECK(loss.rank() == 0);
        const double ref = ref_dc_and_ce(logits, target, opt);
        if (ref == 0.0) CHECK(loss.item() == 0.0);
        else CHECK(rel_err(loss.item(), ref) < tol_for(dt));
      }
}

TEST_CASE("the threaded paths agree with the reference on a large volume") {
  // V > 65536 voxels per image and > 32768 elements: every OpenMP branch runs.
  Shape s{2, 3, 41, 43, 39};
  Tensor logits = random_tensor(s, DType::f32, 61, -3, 3);
  Tensor target = random_labels(target_shape(s), 3, 62, DType::u8);
  Tensor probs = softmax(logits);
  const auto ref_p = ref_softmax(logits.to_vector<double>(), s, 1);
  CHECK(max_rel_diff(probs, Tensor::from_vector<double>(ref_p, s)) < 1e-5);
  CHECK(rel_err(cross_entropy(logits, target).item(), ref_cross_entropy(logits, target)) < 1e-5);
  for (const SoftDiceOptions& opt : kDiceVariants)
    CHECK(rel_err(soft_dice_loss(probs, target, opt).item(), ref_soft_dice(ref_p, s, labels_of(target), opt)) < 1e-5);

  // Gradient of CE: (softmax - onehot) / (N V), compared elementwise.
  Tensor leaf = logits.clone().set_requires_grad();
  cross_entropy(leaf, target).backward();
  const auto t = labels_of(target);
  const std::int64_t V = 41 * 43 * 39;
  std::vector<double> ref_g(ref_p.size());
  for (std::int64_t n = 0; n < 2; ++n)
    for (std::int64_t c = 0; c < 3; ++c)
      for (std::int64_t v = 0; v < V; ++v) {
        const auto i = static_cast<std::size_t>((n * 3 + c) * V + v);
        ref_g[i] = (ref_p[i] - (t[n * V + v] == c ? 1.0 : 0.0)) / static_cast<double>(2 * V);
      }
  CHECK(max_rel_diff(leaf.grad(), Tensor::from_vector<double>(ref_g, s)) < 1e-5);

  // The whole compound loss, a few probed elements in float64.
  Tensor x64 = logits.to(DType::f64).set_requires_grad();
  // Scaled so that per-voxel gradients are O(1) and the check's tolerance bites.
  check_gradients([&](const std::vector<Tensor>& in) { return scale(dc_and_ce_loss(in[0], target), 1e5); }, {x64},
                  1e-3, 1e-5, 8);
}

// ---- gradients (finite differences, float64) ------------------------------

TEST_CASE("softmax gradient") {
  for (int dim : {1, -1, 0}) {
    CAPTURE(dim);
    Tensor x = random_tensor(Shape{2, 4, 3, 5}, DType::f64, 71, -2, 2).set_requires_grad();
    check_gradients([&](const std::vector<Tensor>& in) { return softmax(in[0], dim); }, {x}, 1e-6, 1e-8);
  }
}

TEST_CASE("cross_entropy gradient w.r.t. logits") {
  for (const Shape& s : {Shape{2, 3, 3, 5, 3}, Shape{2, 4, 5, 3}}) {
    CAPTURE(s);
    Tensor x = random_tensor(s, DType::f64, 81, -3, 3).set_requires_grad();
    Tensor target = random_labels(target_shape(s), static_cast<int>(s[1]), 82);
    check_gradients([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], target); }, {x}, 1e-6, 1e-8);
    // And exactly: (softmax - onehot) / (N V), times the upstream gradient.
    x.zero_grad();
    scale(cross_entropy(x, target), 3.0).backward();
    const auto p = ref_softmax(x.to_vector<double>(), s, 1);
    const auto t = labels_of(target);
    const auto [N, C, V] = ncv(x);
    std::vector<double> ref(p.size());
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t v = 0; v < V; ++v) {
          const auto i = static_cast<std::size_t>((n * C + c) * V + v);
          ref[i] = 3.0 * (p[i] - (t[n * V + v] == c ? 1.0 : 0.0)) / static_cast<double>(N * V);
        }
    CHECK(max_rel_diff(x.grad(), Tensor::from_vector<double>(ref, s)) < 1e-12);
  }
}

TEST_CASE("soft_dice_loss gradient w.r.t. probs, and through softmax w.r.t. logits") {
  for (const SoftDiceOptions& opt : kDiceVariants)
    for (const Shape& s : {Shape{2, 3, 3, 5, 3}, Shape{2, 4, 5, 3}}) {
      CAPTURE(describe(opt));
      CAPTURE(s);
      Tensor target = random_labels(target_shape(s), static_cast<int>(s[1]), 92);
      Tensor p = random_tensor(s, DType::f64, 91, 0.05, 1).set_requires_grad();
      check_gradients([&](const std::vector<Tensor>& in) { return soft_dice_loss(in[0], target, opt); }, {p}, 1e-6,
                      1e-8);
      Tensor x = random_tensor(s, DType::f64, 93, -3, 3).set_requires_grad();
      check_gradients([&](const std::vector<Tensor>& in) { return soft_dice_loss(softmax(in[0]), target, opt); }, {x},
                      1e-6, 1e-8);
    }
}

TEST_CASE("dc_and_ce_loss gradient") {
  const DcCeOptions variants[] = {{}, {0.5, 2.0, {false, true, 1e-5}}, {1.0, 0.0, {}}, {0.0, 1.0, {}}};
  for (const DcCeOptions& opt : variants) {
    CAPTURE(opt.weight_ce);
    CAPTURE(opt.weight_dice);
    Shape s{2, 4, 3, 5, 3};
    Tensor x = random_tensor(s, DType::f64, 101, -3, 3).set_requires_grad();
    Tensor target = random_labels(target_shape(s), 4, 102, DType::f32);
    check_gradients([&](const std::vector<Tensor>& in) { return dc_and_ce_loss(in[0], target, opt); }, {x}, 1e-6, 1e-8);
  }
}

TEST_CASE("the soft Dice clip at 1e-8 stops the denominator's gradient") {
  // Class 1 absent from the target and predicted as exactly 0, with a smooth
  // below the clip: dc_1 = smooth / 1e-8 and d dc_1 / dp = 0 (the clipped
  // denominator is a constant and no voxel is in the intersect). Without the
  // clip the gradient would be -smooth / smooth^2 per voxel.
  const double smooth = 1e-9;
  Shape s{2, 2, 3, 5};
  std::vector<double> p(static_cast<std::size_t>(s.numel()), 0.0);
  for (std::int64_t n = 0; n < 2; ++n)
    for (std::int64_t v = 0; v < 15; ++v)
      p[static_cast<std::size_t>(n * 30 + v)] = 0.25 + 0.01 * static_cast<double>(v);
  Tensor probs = Tensor::from_vector<double>(p, s).set_requires_grad();
  Tensor target = Tensor::zeros(target_shape(s), DType::i64);
  for (bool batch : {true, false}) {
    CAPTURE(batch);
    SoftDiceOptions opt{batch, false, smooth};
    probs.zero_grad();
    Tensor loss = soft_dice_loss(probs, target, opt);
    CHECK(rel_err(loss.item(), ref_soft_dice(probs, target, opt)) < 1e-12);
    CHECK(loss.item() == doctest::Approx(-smooth / 1e-8).epsilon(1e-12));
    loss.backward();
    auto g = probs.grad().to_vector<double>();
    for (double e : g) CHECK(e == 0.0);
  }
  // With do_bg the background is scored and unclipped: its gradient is not zero.
  probs.zero_grad();
  soft_dice_loss(probs, target, {true, true, smooth}).backward();
  CHECK(std::abs(probs.grad().at({0, 0, 0, 0})) > 1e-3);
}

// ---- properties -------------------------------------------------------------

TEST_CASE("target layouts [N, 1, ...] and [N, ...] and label dtypes agree") {
  Shape s{2, 4, 3, 5, 7};
  for (DType dt : {DType::f32, DType::f64}) {
    CAPTURE(dt);
    Tensor logits = random_tensor(s, dt, 111, -3, 3);
    Tensor probs = softmax(logits);
    Tensor base = random_labels(target_shape(s), 4, 112, DType::i64);
    const double ce = cross_entropy(logits, base).item();
    const double dc = soft_dice_loss(probs, base).item();
    const double both = dc_and_ce_loss(logits, base).item();
    for (DType lt : {DType::i64, DType::i32, DType::u8, DType::f32, DType::f64, DType::f16})
      for (bool squeeze : {false, true}) {
        CAPTURE(lt);
        CAPTURE(squeeze);
        Tensor t = base.to(lt);
        if (squeeze) t = t.reshape(squeezed(s));
        CHECK(cross_entropy(logits, t).item() == ce);
        CHECK(soft_dice_loss(probs, t).item() == dc);
        CHECK(dc_and_ce_loss(logits, t).item() == both);
      }
  }
}

TEST_CASE("strided (non-contiguous) inputs give the same result as dense ones") {
  Tensor big = random_tensor(Shape{2, 4, 5, 6, 9}, DType::f64, 121, -3, 3);
  Tensor view = big.box({0, 0, 1, 2, 3}, Shape{2, 4, 3, 3, 5});
  REQUIRE(!view.is_contiguous());
  Tensor dense = view.contiguous().clone();
  Tensor target = random_labels(Shape{2, 3, 3, 5}, 4, 122);
  CHECK(max_rel_diff(softmax(view), softmax(dense)) == 0.0);
  CHECK(cross_entropy(view, target).item() == cross_entropy(dense, target).item());
  CHECK(dc_and_ce_loss(view, target).item() == dc_and_ce_loss(dense, target).item());
  Tensor tbig = random_labels(Shape{2, 4, 6, 8}, 4, 123, DType::i32);
  Tensor tview = tbig.box({0, 1, 2, 1}, Shape{2, 3, 3, 5});
  CHECK(soft_dice_loss(softmax(dense), tview).item() == soft_dice_loss(softmax(dense), tview.contiguous()).item());
}

TEST_CASE("a perfect prediction gives Dice loss -1") {
  for (const SoftDiceOptions& opt : kDiceVariants) {
    CAPTURE(describe(opt));
    Shape s{2, 3, 3, 5, 7};
    Tensor target = random_labels(target_shape(s), 3, 131);
    auto t = labels_of(target);
    std::vector<double> onehot(static_cast<std::size_t>(s.numel()), 0.0);
    const std::int64_t V = 105;
    for (std::int64_t n = 0; n < 2; ++n)
      for (std::int64_t v = 0; v < V; ++v) onehot[static_cast<std::size_t>((n * 3 + t[n * V + v]) * V + v)] = 1.0;
    Tensor probs = Tensor::from_vector<double>(onehot, s);
    CHECK(soft_dice_loss(probs, target, opt).item() == doctest::Approx(-1.0).epsilon(1e-12));
    // Confident logits: softmax is one-hot to within e^-40.
    Tensor logits = scale(probs, 40.0);
    CHECK(soft_dice_loss(softmax(logits), target, opt).item() == doctest::Approx(-1.0).epsilon(1e-12));
    CHECK(cross_entropy(logits, target).item() < 1e-15);
  }
}

TEST_CASE("a class absent from prediction and target scores dc = 1 (smooth / smooth)") {
  Shape s{2, 2, 3, 5, 7};
  std::vector<double> p(static_cast<std::size_t>(s.numel()), 0.0);
  for (std::int64_t n = 0; n < 2; ++n)
    for (std::int64_t v = 0; v < 105; ++v) p[static_cast<std::size_t>(n * 210 + v)] = 1.0;  // all background
  Tensor probs = Tensor::from_vector<double>(p, s);
  Tensor target = Tensor::zeros(target_shape(s), DType::u8);
  // do_bg = false scores only class 1, which is absent: dc = 1, loss = -1.
  for (bool batch : {true, false}) CHECK(soft_dice_loss(probs, target, {batch, false, 1e-5}).item() == -1.0);
  // Three classes, class 1 absent and predicted 0, class 2 present.
  std::vector<double> p3 = {0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5};
  Tensor probs3 = Tensor::from_vector<double>(p3, Shape{1, 3, 4});
  Tensor t3 = Tensor::from_vector<std::int64_t>(std::vector<std::int64_t>{0, 0, 2, 2}, Shape{1, 1, 4});
  // class 1: (0 + s) / (0 + 0 + s) = 1; class 2: (2 * 1 + s) / (2 + 2 + s).
  const double s5 = 1e-5;
  const double expect = -(1.0 + (2.0 + s5) / (4.0 + s5)) / 2.0;
  CHECK(soft_dice_loss(probs3, t3, {true, false, s5}).item() == doctest::Approx(expect).epsilon(1e-14));
}

TEST_CASE("targets never receive gradients - NoGradGuard records nothing") {
  Shape s{2, 3, 3, 5};
  Tensor x = random_tensor(s, DType::f64, 141).set_requires_grad();
  Tensor t = random_labels(target_shape(s), 3, 142, DType::f64).set_requires_grad();
  dc_and_ce_loss(x, t).backward();
  CHECK(x.grad().defined());
  CHECK(!t.grad().defined());
  {
    NoGradGuard guard;
    CHECK(!dc_and_ce_loss(x, t).requires_grad());
    CHECK(!softmax(x).requires_grad());
  }
  CHECK(cross_entropy(x, t).grad_fn()->name() == "CrossEntropyBackward");
  CHECK(soft_dice_loss(x, t).grad_fn()->name() == "SoftDiceBackward");
  CHECK(softmax(x).grad_fn()->name() == "SoftmaxBackward");
}

// ---- errors -------------------------------------------------------------------

TEST_CASE("bad labels throw naming the value and C") {
  Shape s{2, 3, 3, 5};
  Tensor logits = random_tensor(s, DType::f32, 151);
  Tensor probs = softmax(logits);
  auto with = [&](DType dt, double bad, std::int64_t at) {
    auto v = random_labels(target_shape(s), 3, 152).to_vector<double>();
    v[static_cast<std::size_t>(at)] = bad;
    return Tensor::from_vector<double>(v, target_shape(s)).to(dt);
  };
  // Flat index 22 of [2, 1, 3, 5] is image 1, voxel (1, 2); 29 is image 1, voxel (2, 4).
  CHECK_THROWS_WITH_AS(cross_entropy(logits, with(DType::i64, 5, 22)), doctest::Contains("target value 5 at [1, 1, 2]"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, with(DType::i64, 5, 22)), doctest::Contains("C = 3"), stunet::Error);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, with(DType::u8, 3, 0)), doctest::Contains("target value 3 at [0, 0, 0]"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(soft_dice_loss(probs, with(DType::i32, -1, 7)), doctest::Contains("target value -1"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(dc_and_ce_loss(logits, with(DType::i64, -1, 7)), doctest::Contains("C = 3"), stunet::Error);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, with(DType::f32, 1.5, 29)),
                       doctest::Contains("target value 1.5 at [1, 2, 4] is not an integral class index"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(soft_dice_loss(probs, with(DType::f64, 3.0, 1)), doctest::Contains("not a valid class"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(soft_dice_loss(probs, with(DType::f64, std::nan(""), 1)), doctest::Contains("target value nan"),
                       stunet::Error);
}

TEST_CASE("shape and dtype mismatches throw naming the shapes") {
  Tensor logits = random_tensor(Shape{2, 3, 3, 5, 7}, DType::f32, 161);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, random_labels(Shape{2, 1, 3, 5, 6}, 3, 1)),
                       doctest::Contains("target spatial shape [3, 5, 6] differs from logits spatial shape [3, 5, 7]"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(soft_dice_loss(logits, random_labels(Shape{2, 3, 4, 7}, 3, 1)),
                       doctest::Contains("target spatial shape [3, 4, 7] differs from probs spatial shape [3, 5, 7]"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(dc_and_ce_loss(logits, random_labels(Shape{1, 1, 3, 5, 7}, 3, 1)),
                       doctest::Contains("target batch size 1 differs from logits batch size 2"), stunet::Error);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, random_labels(Shape{2, 3, 3, 5, 7}, 3, 1)),
                       doctest::Contains("target of shape [2, 3, 3, 5, 7] has 3 channels"), stunet::Error);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, random_labels(Shape{2, 105}, 3, 1)),
                       doctest::Contains("target of shape [2, 105] does not fit logits of shape [2, 3, 3, 5, 7]"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(cross_entropy(random_labels(Shape{2, 3, 3, 5, 7}, 3, 1),
                                     random_labels(Shape{2, 1, 3, 5, 7}, 3, 1)),
                       doctest::Contains("logits must be float32 or float64, got int64 (shape [2, 3, 3, 5, 7])"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(dc_and_ce_loss(logits.to(DType::i32), random_labels(Shape{2, 1, 3, 5, 7}, 3, 1)),
                       doctest::Contains("got int32"), stunet::Error);
  CHECK_THROWS_WITH_AS(softmax(random_labels(Shape{2, 3}, 3, 1)), doctest::Contains("got int64 (shape [2, 3])"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(softmax(logits, 5),
                       doctest::Contains("dim 5 out of range for a tensor of shape [2, 3, 3, 5, 7]"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(soft_dice_loss(random_tensor(Shape{2, 1, 3}, DType::f32, 1),
                                      Tensor::zeros(Shape{2, 3}, DType::u8)),
                       doctest::Contains("no class left to score with do_bg = false"), stunet::Error);
}
