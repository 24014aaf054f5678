// Instance norm, LeakyReLU (out of place and in place), nearest upsampling,
// concat and flip: naive double-precision references, finite-difference
// gradients, in-place semantics and error messages.
#include <array>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "testing.hpp"
#include "stunet/ops/activation.hpp"
#include "stunet/ops/elementwise.hpp"
#include "stunet/ops/interp.hpp"
#include "stunet/ops/norm.hpp"
#include "stunet/ops/shape_ops.hpp"

using namespace stunet;
using doctest::Contains;

namespace {

using Vec = std::vector<double>;

/// Tolerance of a float32 result against a double reference, and of float64.
double tolerance(DType d) { return d == DType::f32 ? 1e-5 : 1e-12; }

Tensor from(const Vec& v, const Shape& s) { return Tensor::from_vector<double>(v, s); }

/// Shape padded to rank 5 with leading ones, and the matching row-major index.
std::array<std::int64_t, 5> pad5(const Shape& s) {
  std::array<std::int64_t, 5> n{1, 1, 1, 1, 1};
  for (int i = 0; i < s.rank(); ++i) n[static_cast<std::size_t>(5 - s.rank() + i)] = s[i];
  return n;
}
std::int64_t lin(const std::array<std::int64_t, 5>& n, const std::array<std::int64_t, 5>& i) {
  return (((i[0] * n[1] + i[1]) * n[2] + i[2]) * n[3] + i[3]) * n[4] + i[4];
}
/// Calls f(index) for every index of a padded rank-5 shape, in row-major order.
template <class F> void for_each_index(const std::array<std::int64_t, 5>& n, F&& f) {
  std::array<std::int64_t, 5> i{};
  for (i[0] = 0; i[0] < n[0]; ++i[0])
    for (i[1] = 0; i[1] < n[1]; ++i[1])
      for (i[2] = 0; i[2] < n[2]; ++i[2])
        for (i[3] = 0; i[3] < n[3]; ++i[3])
          for (i[4] = 0; i[4] < n[4]; ++i[4]) f(i);
}

/// Random values with |v| in [0.1, 1): keeps LeakyReLU's kink out of reach
/// of finite differences.
Tensor away_from_zero(const Shape& shape, DType dtype, std::uint64_t seed) {
  Vec v = testing::random_tensor(shape, DType::f64, seed, 0.1, 1.0).to_vector<double>();
  Vec sign = testing::random_tensor(shape, DType::f64, seed + 1).to_vector<double>();
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = sign[i] < 0 ? -v[i] : v[i];
  return from(v, shape).to(dtype);
}

// ---- references --------------------------------------------------------

Vec ref_instance_norm(const Vec& x, const Shape& s, const Vec* w, const Vec* b, double eps) {
  const std::int64_t N = s[0], C = s[1], S = s.numel() / (N * C);
  Vec y(x.size());
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c) {
      const std::size_t base = static_cast<std::size_t>((n * C + c) * S);
      double mean = 0;
      for (std::int64_t i = 0; i < S; ++i) mean += x[base + static_cast<std::size_t>(i)];
      mean /= static_cast<double>(S);
      double var = 0;
      for (std::int64_t i = 0; i < S; ++i) {
        const double d = x[base + static_cast<std::size_t>(i)] - mean;
        var += d * d;
      }
      var /= static_cast<double>(S);  // biased, as PyTorch's instance norm
      const double scale = w ? (*w)[static_cast<std::size_t>(c)] : 1.0;
      const double shift = b ? (*b)[static_cast<std::size_t>(c)] : 0.0;
      for (std::int64_t i = 0; i < S; ++i) {
        const std::size_t k = base + static_cast<std::size_t>(i);
        y[k] = (x[k] - mean) / std::sqrt(var + eps) * scale + shift;
      }
    }
  return y;
}

Vec ref_leaky_relu(const Vec& x, double slope) {
  Vec y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = x[i] > 0 ? x[i] : slope * x[i];
  return y;
}

/// PyTorch's 'nearest' source index: floor(o * in / out).
Vec ref_upsample(const Vec& x, const Shape& s, std::array<int, 3> f) {
  const std::array<std::int64_t, 5> in{s[0], s[1], s[2], s[3], s[4]};
  const std::array<std::int64_t, 5> out{s[0], s[1], s[2] * f[0], s[3] * f[1], s[4] * f[2]};
  Vec y(static_cast<std::size_t>(out[0] * out[1] * out[2] * out[3] * out[4]));
  for_each_index(out, [&](const std::array<std::int64_t, 5>& o) {
    std::array<std::int64_t, 5> i = o;
    for (std::size_t d = 2; d < 5; ++d) i[d] = o[d] * in[d] / out[d];
    y[static_cast<std::size_t>(lin(out, o))] = x[static_cast<std::size_t>(lin(in, i))];
  });
  return y;
}

Vec ref_concat(const std::vector<Tensor>& xs, int dim) {
  const int r = xs[0].rank();
  const std::size_t d = static_cast<std::size_t>(5 - r + (dim < 0 ? dim + r : dim));
  std::array<std::int64_t, 5> out = pad5(xs[0].shape());
  out[d] = 0;
  for (const Tensor& t : xs) out[d] += pad5(t.shape())[d];
  Vec y(static_cast<std::size_t>(out[0] * out[1] * out[2] * out[3] * out[4]));
  for_each_index(out, [&](const std::array<std::int64_t, 5>& o) {
    std::array<std::int64_t, 5> i = o;
    for (const Tensor& t : xs) {
      const auto n = pad5(t.shape());
      if (i[d] < n[d]) {
        y[static_cast<std::size_t>(lin(out, o))] = t.to_vector<double>()[static_cast<std::size_t>(lin(n, i))];
        return;
      }
      i[d] -= n[d];
    }
  });
  return y;
}

Vec ref_flip(const Vec& x, const Shape& s, const std::vector<int>& dims) {
  const auto n = pad5(s);
  Vec y(x.size());
  for_each_index(n, [&](const std::array<std::int64_t, 5>& o) {
    std::array<std::int64_t, 5> i = o;
    for (int dim : dims) {
      const std::size_t d = static_cast<std::size_t>(5 - s.rank() + (dim < 0 ? dim + s.rank() : dim));
      i[d] = n[d] - 1 - o[d];
    }
    y[static_cast<std::size_t>(lin(n, o))] = x[static_cast<std::size_t>(lin(n, i))];
  });
  return y;
}

}  // namespace

// ======================================================================
// instance_norm
// ======================================================================

TEST_CASE("instance_norm matches a double reference (affine, no affine, ranks 3 to 5)") {
  for (DType dt : {DType::f32, DType::f64}) {
    for (Shape s : {Shape{2, 3, 3, 5, 7}, Shape{2, 4, 9}, Shape{1, 2, 6, 5}}) {
      CAPTURE(dtype_name(dt));
      CAPTURE(fmt::format("{}", s));
      const std::int64_t C = s[1];
      Tensor x = testing::random_tensor(s, dt, 11, -2.0, 3.0);
      Tensor w = testing::random_tensor({C}, dt, 12, 0.5, 1.5);
      Tensor b = testing::random_tensor({C}, dt, 13);
      Vec vx = x.to_vector<double>(), vw = w.to_vector<double>(), vb = b.to_vector<double>();
      Tensor y = instance_norm(x, w, b);
      CHECK(y.shape() == s);
      CHECK(y.dtype() == dt);
      CHECK(testing::max_rel_diff(y, from(ref_instance_norm(vx, s, &vw, &vb, 1e-5), s)) < tolerance(dt));
      Tensor y0 = instance_norm(x, Tensor(), Tensor(), 1e-3);
      CHECK(testing::max_rel_diff(y0, from(ref_instance_norm(vx, s, nullptr, nullptr, 1e-3), s)) < tolerance(dt));
      Tensor yw = instance_norm(x, w, Tensor());
      CHECK(testing::max_rel_diff(yw, from(ref_instance_norm(vx, s, &vw, nullptr, 1e-5), s)) < tolerance(dt));
    }
  }
}

TEST_CASE("instance_norm keeps float32 precision on large offset planes") {
  // 64^3 voxels per plane around 300 with std ~0.3: float sums would lose the
  // variance. The reference uses the same float32 values, in double.
  const Shape s{1, 2, 64, 64, 64};
  Tensor x = testing::random_tensor(s, DType::f32, 21, 299.5, 300.5);
  Tensor w = Tensor::from_vector<float>({1.5f, -0.5f}, {2});
  Tensor b = Tensor::from_vector<float>({0.25f, 2.0f}, {2});
  Vec vw = w.to_vector<double>(), vb = b.to_vector<double>();
  Tensor y = instance_norm(x, w, b);
  CHECK(testing::max_rel_diff(y, from(ref_instance_norm(x.to_vector<double>(), s, &vw, &vb, 1e-5), s)) < 1e-5);
}

TEST_CASE("instance_norm accepts strided views") {
  Tensor big = testing::random_tensor({2, 3, 6, 7, 8}, DType::f64, 31);
  Tensor view = big.box({0, 1, 1, 2, 3}, {2, 2, 3, 5, 5});
  REQUIRE_FALSE(view.is_contiguous());
  Tensor w = testing::random_tensor({2}, DType::f64, 32);
  CHECK(testing::max_abs_diff(instance_norm(view, w, Tensor()), instance_norm(view.contiguous(), w, Tensor())) ==
        0.0);
}

TEST_CASE("instance_norm gradients match finite differences") {
  const Shape s{2, 3, 3, 4, 5};
  auto x = testing::random_tensor(s, DType::f64, 41, -2.0, 2.0).set_requires_grad();
  auto w = testing::random_tensor({3}, DType::f64, 42, 0.5, 1.5).set_requires_grad();
  auto b = testing::random_tensor({3}, DType::f64, 43).set_requires_grad();
  SUBCASE("x, weight and bias") {
    testing::check_gradients([](const std::vector<Tensor>& in) { return instance_norm(in[0], in[1], in[2]); },
                             {x, w, b});
  }
  SUBCASE("no affine") {
    testing::check_gradients([](const std::vector<Tensor>& in) { return instance_norm(in[0], Tensor(), Tensor()); },
                             {x});
  }
  SUBCASE("rank 3, large eps") {
    auto x3 = testing::random_tensor({2, 3, 11}, DType::f64, 44).set_requires_grad();
    testing::check_gradients([](const std::vector<Tensor>& in) { return instance_norm(in[0], in[1], in[2], 0.1); },
                             {x3, w, b});
  }
  SUBCASE("parameters only (x a constant): dx is not needed") {
    Tensor xc = x.detach();
    testing::check_gradients([&](const std::vector<Tensor>& in) { return instance_norm(xc, in[0], in[1]); }, {w, b});
  }
  SUBCASE("only the gradients that are needed are produced") {
    Tensor wc = w.detach();
    x.zero_grad();
    sum(instance_norm(x, wc, b)).backward();
    CHECK(x.grad().defined());
    CHECK(b.grad().defined());
    CHECK_FALSE(wc.grad().defined());
  }
}

TEST_CASE("instance_norm results do not depend on the thread count") {
#if defined(_OPENMP)
  // Several chunks per plane: partial sums must be combined in a fixed order.
  const Shape s{1, 2, 40, 40, 40};
  Tensor x = testing::random_tensor(s, DType::f32, 51, 5.0, 6.0).set_requires_grad();
  Tensor w = testing::random_tensor({2}, DType::f32, 52).set_requires_grad();
  Tensor g = testing::random_tensor(s, DType::f32, 53);
  auto run = [&](int threads) {
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads);
    x.zero_grad();
    w.zero_grad();
    Tensor y = instance_norm(x, w, Tensor());
    y.backward(g);
    omp_set_num_threads(before);
    return std::vector<std::vector<float>>{y.to_vector<float>(), x.grad().to_vector<float>(),
                                           w.grad().to_vector<float>()};
  };
  CHECK(run(1) == run(3));
#endif
}

// ======================================================================
// leaky_relu
// ======================================================================

TEST_CASE("leaky_relu matches a double reference") {
  const Shape s{2, 3, 3, 5, 7};
  for (DType dt : {DType::f32, DType::f64}) {
    for (double slope : {0.01, 0.2, 0.0, -0.5}) {
      CAPTURE(dtype_name(dt));
      CAPTURE(slope);
      Tensor x = testing::random_tensor(s, dt, 61);
      Tensor y = leaky_relu(x, slope);
      CHECK(testing::max_rel_diff(y, from(ref_leaky_relu(x.to_vector<double>(), slope), s)) < tolerance(dt));
      Tensor z = x.clone();
      CHECK(leaky_relu_(z, slope).is_same(z));
      CHECK(z.to_vector<double>() == y.to_vector<double>());
    }
  }
  CHECK(leaky_relu(Tensor::from_vector<float>({-2.f, 0.f, 3.f}, {3})).to_vector<float>() ==
        std::vector<float>{-0.02f, 0.f, 3.f});
}

TEST_CASE("leaky_relu gradients match finite differences") {
  auto x = away_from_zero({2, 3, 3, 4, 5}, DType::f64, 71).set_requires_grad();
  for (double slope : {0.01, 0.3, -0.5}) {
    CAPTURE(slope);
    testing::check_gradients([slope](const std::vector<Tensor>& in) { return leaky_relu(in[0], slope); }, {x});
    // In place, on a non-leaf copy of the input.
    if (slope >= 0)
      testing::check_gradients(
          [slope](const std::vector<Tensor>& in) {
            Tensor h = scale(in[0], 1.0);
            return leaky_relu_(h, slope);
          },
          {x});
  }
}

TEST_CASE("in-place leaky_relu_ after instance_norm equals the out-of-place version, forward and backward") {
  const Shape s{2, 3, 3, 5, 7};
  auto x = testing::random_tensor(s, DType::f64, 81, -1.0, 2.0).set_requires_grad();
  auto w = testing::random_tensor({3}, DType::f64, 82, 0.5, 1.5).set_requires_grad();
  auto b = testing::random_tensor({3}, DType::f64, 83, -0.5, 0.5).set_requires_grad();
  Tensor g = testing::random_tensor(s, DType::f64, 84);

  Tensor y1 = leaky_relu(instance_norm(x, w, b));
  y1.backward(g);
  Tensor gx = x.grad(), gw = w.grad(), gb = b.grad();
  x.zero_grad();
  w.zero_grad();
  b.zero_grad();

  Tensor y2 = instance_norm(x, w, b);
  const auto version = y2.storage()->version();
  const auto storage = y2.storage();
  std::shared_ptr<autograd::Node> norm_node = y2.grad_fn();
  Tensor r = leaky_relu_(y2);
  CHECK(r.is_same(y2));
  CHECK(y2.storage() == storage);
  CHECK(y2.storage()->version() > version);
  REQUIRE(y2.grad_fn() != nullptr);
  CHECK(y2.grad_fn()->name() == "LeakyReluBackward");
  REQUIRE(y2.grad_fn()->next_edges.size() == 1);
  CHECK(y2.grad_fn()->next_edges[0].node == norm_node);  // rebased onto the previous producer
  CHECK(y2.to_vector<double>() == y1.to_vector<double>());
  y2.backward(g);
  CHECK(testing::max_abs_diff(x.grad(), gx) < 1e-14);
  CHECK(testing::max_abs_diff(w.grad(), gw) < 1e-14);
  CHECK(testing::max_abs_diff(b.grad(), gb) < 1e-14);

  testing::check_gradients(
      [](const std::vector<Tensor>& in) {
        Tensor h = instance_norm(in[0], in[1], in[2]);
        leaky_relu_(h);
        return h;
      },
      {x, w, b});
}

TEST_CASE("leaky_relu_: leaves, no-grad mode, views, slopes") {
  Tensor leaf = Tensor::from_vector<double>({-1, 2}, {2}).set_requires_grad();
  CHECK_THROWS_WITH_AS(leaky_relu_(leaf), Contains("leaf"), Error);
  CHECK_THROWS_WITH_AS(leaky_relu_(leaf), Contains("[2]"), Error);
  {
    // Like PyTorch, a leaf may be written under no_grad (nothing is recorded).
    NoGradGuard guard;
    Tensor l = leaf;
    leaky_relu_(l, 0.5);
    CHECK(leaf.to_vector<double>() == Vec{-0.5, 2});
    CHECK(leaf.is_leaf());
  }
  Tensor plain = Tensor::from_vector<float>({-4, 4}, {2});
  leaky_relu_(plain, -0.25);  // not recorded: any slope
  CHECK(plain.to_vector<float>() == std::vector<float>{1, 4});
  CHECK_FALSE(plain.requires_grad());

  Tensor h = scale(leaf, 1.0);
  CHECK_THROWS_WITH_AS(leaky_relu_(h, -0.1), Contains("negative_slope"), Error);
  Tensor h0 = scale(leaf, 1.0);
  leaky_relu_(h0, 0.0);  // ReLU in place is fine: output > 0 exactly where input > 0
  sum(h0).backward();
  CHECK(leaf.grad().to_vector<double>() == Vec{0, 1});

  // A strided view is written through to the base tensor.
  Tensor base = Tensor::from_vector<double>({-1, -2, -3, -4, -5, -6}, {2, 3});
  Tensor view = base.box({0, 1}, {2, 2});
  leaky_relu_(view, 0.5);
  CHECK(base.to_vector<double>() == Vec{-1, -1, -1.5, -4, -2.5, -3});
}

TEST_CASE("leaky_relu keeps its output for backward, not its input") {
  // conv -> norm -> LeakyReLU -> conv: the norm output need not outlive the
  // activation, whose output the next op keeps anyway.
  auto x = away_from_zero({2, 3, 4, 5}, DType::f64, 95).set_requires_grad();
  Tensor h = instance_norm(x, Tensor(), Tensor());
  std::weak_ptr<Storage> h_storage = h.storage();
  Tensor y = leaky_relu(h);
  h = Tensor();
  CHECK(h_storage.expired());
  // A negative slope needs the input's sign: then the input is kept.
  Tensor h2 = instance_norm(x, Tensor(), Tensor());
  std::weak_ptr<Storage> h2_storage = h2.storage();
  Tensor y2 = leaky_relu(h2, -0.5);
  h2 = Tensor();
  CHECK_FALSE(h2_storage.expired());
  sum(add(y, y2)).backward();
  CHECK(h2_storage.expired());
}

TEST_CASE("modifying a tensor saved for backward makes backward throw") {
  Tensor x = testing::random_tensor({2, 3, 4, 5}, DType::f64, 91).set_requires_grad();
  SUBCASE("the output saved by leaky_relu") {
    Tensor y = leaky_relu(scale(x, 1.0));  // its node saves y (the output)
    Tensor z = leaky_relu(y);
    leaky_relu_(y);  // overwrites what y's first node saved
    CHECK_THROWS_WITH_AS(sum(z).backward(), Contains("modified in place"), Error);
  }
  SUBCASE("the input saved by instance_norm") {
    Tensor h = scale(x, 1.0);
    Tensor y = instance_norm(h, Tensor(), Tensor());
    leaky_relu_(h);
    CHECK_THROWS_WITH_AS(sum(y).backward(), Contains("modified in place"), Error);
  }
  SUBCASE("the weight saved by instance_norm (an optimiser step before backward)") {
    Tensor w = Tensor::ones({3}, DType::f64);
    Tensor y = instance_norm(x, w, Tensor());
    w.fill_(2.0);
    CHECK_THROWS_WITH_AS(sum(y).backward(), Contains("modified in place"), Error);
  }
}

// ======================================================================
// upsample_nearest
// ======================================================================

TEST_CASE("upsample_nearest matches PyTorch's nearest indexing") {
  const Shape s{2, 3, 3, 5, 7};
  for (DType dt : {DType::f32, DType::f64}) {
    for (std::array<int, 3> f : {std::array<int, 3>{1, 2, 2}, {2, 2, 2}, {3, 1, 2}, {1, 1, 1}, {2, 3, 1}}) {
      CAPTURE(dtype_name(dt));
      CAPTURE(fmt::format("({}, {}, {})", f[0], f[1], f[2]));
      Tensor x = testing::random_tensor(s, dt, 101);
      Tensor y = upsample_nearest(x, f);
      const Shape os{2, 3, 3 * f[0], 5 * f[1], 7 * f[2]};
      CHECK(y.shape() == os);
      CHECK(y.to_vector<double>() == ref_upsample(x.to_vector<double>(), s, f));  // a copy: exact
    }
  }
}

TEST_CASE("upsample_nearest backward sums each block") {
  const Shape s{2, 3, 3, 5, 7};
  const std::array<int, 3> f{1, 2, 2};
  Tensor x = testing::random_tensor(s, DType::f32, 111).set_requires_grad();
  const Shape os{2, 3, 3, 10, 14};
  Tensor g = testing::random_tensor(os, DType::f32, 112);
  upsample_nearest(x, f).backward(g);
  Vec vg = g.to_vector<double>(), ref(static_cast<std::size_t>(s.numel()), 0.0);
  const std::array<std::int64_t, 5> in{2, 3, 3, 5, 7}, out{2, 3, 3, 10, 14};
  for_each_index(out, [&](const std::array<std::int64_t, 5>& o) {
    std::array<std::int64_t, 5> i = o;
    for (std::size_t d = 2; d < 5; ++d) i[d] = o[d] * in[d] / out[d];
    ref[static_cast<std::size_t>(lin(in, i))] += vg[static_cast<std::size_t>(lin(out, o))];
  });
  CHECK(testing::max_rel_diff(x.grad(), from(ref, s)) < 1e-6);

  auto xd = testing::random_tensor({2, 2, 3, 4, 5}, DType::f64, 113).set_requires_grad();
  for (std::array<int, 3> fd : {std::array<int, 3>{1, 2, 2}, {2, 3, 1}})
    testing::check_gradients([fd](const std::vector<Tensor>& in) { return upsample_nearest(in[0], fd); }, {xd});
}

// ======================================================================
// concat
// ======================================================================

TEST_CASE("concat matches a reference along every dim") {
  for (DType dt : {DType::f32, DType::f64}) {
    CAPTURE(dtype_name(dt));
    // STU-Net's decoder: [upsampled, skip] along channels.
    Tensor a = testing::random_tensor({2, 3, 3, 5, 7}, dt, 121);
    Tensor b = testing::random_tensor({2, 5, 3, 5, 7}, dt, 122);
    Tensor y = concat({a, b});
    CHECK(y.shape() == Shape{2, 8, 3, 5, 7});
    CHECK(y.to_vector<double>() == ref_concat({a, b}, 1));
    // Three inputs along the last dim, one of them empty along it.
    Tensor c = testing::random_tensor({2, 3, 3, 5, 2}, dt, 123);
    Tensor e = Tensor::zeros({2, 3, 3, 5, 0}, dt);
    Tensor y4 = concat({a, e, c}, -1);
    CHECK(y4.shape() == Shape{2, 3, 3, 5, 9});
    CHECK(y4.to_vector<double>() == ref_concat({a, e, c}, -1));
    // Batch (dim 0), a middle dim of a rank-3 tensor, a single input.
    Tensor p = testing::random_tensor({1, 4, 6}, dt, 124), q = testing::random_tensor({3, 4, 6}, dt, 125);
    CHECK(concat({p, q}, 0).to_vector<double>() == ref_concat({p, q}, 0));
    Tensor u = testing::random_tensor({3, 2, 6}, dt, 126);
    CHECK(concat({q, u, q}, 1).to_vector<double>() == ref_concat({q, u, q}, 1));
    CHECK(concat({a}, 2).to_vector<double>() == a.to_vector<double>());
    // A strided view as input.
    Tensor big = testing::random_tensor({2, 4, 4, 6, 8}, dt, 127);
    Tensor v = big.box({0, 1, 1, 1, 1}, {2, 3, 3, 5, 7});
    CHECK(concat({v, a}, 2).to_vector<double>() == ref_concat({v.contiguous(), a}, 2));
  }
}

TEST_CASE("concat gradients match finite differences") {
  auto a = testing::random_tensor({2, 2, 3, 2, 3}, DType::f64, 131).set_requires_grad();
  auto b = testing::random_tensor({2, 3, 3, 2, 3}, DType::f64, 132).set_requires_grad();
  auto c = testing::random_tensor({2, 1, 3, 2, 3}, DType::f64, 133).set_requires_grad();
  testing::check_gradients([](const std::vector<Tensor>& in) { return concat(in, 1); }, {a, b, c});
  auto p = testing::random_tensor({2, 3, 4}, DType::f64, 134).set_requires_grad();
  auto q = testing::random_tensor({2, 3, 1}, DType::f64, 135).set_requires_grad();
  testing::check_gradients([](const std::vector<Tensor>& in) { return concat(in, -1); }, {p, q});
  testing::check_gradients([](const std::vector<Tensor>& in) { return concat({in[0], in[0]}, 0); }, {p});
  // One input without grad receives nothing; the others get their slice.
  Tensor k = b.detach();
  a.zero_grad();
  c.zero_grad();
  Tensor g = testing::random_tensor({2, 6, 3, 2, 3}, DType::f64, 136);
  concat({a, k, c}).backward(g);
  CHECK_FALSE(k.grad().defined());
  CHECK(a.grad().to_vector<double>() == g.detach().box({0, 0, 0, 0, 0}, {2, 2, 3, 2, 3}).to_vector<double>());
  CHECK(c.grad().to_vector<double>() == g.detach().box({0, 5, 0, 0, 0}, {2, 1, 3, 2, 3}).to_vector<double>());
}

// ======================================================================
// flip
// ======================================================================

TEST_CASE("flip matches a reference for several axis subsets") {
  const Shape s{2, 3, 3, 5, 7};
  const std::vector<std::vector<int>> subsets{{}, {0}, {4}, {2, 3, 4}, {1, -1}, {-3}, {0, 1, 2, 3, 4}, {3, 2}};
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor x = testing::random_tensor(s, dt, 141);
    for (const auto& dims : subsets) {
      CAPTURE(dtype_name(dt));
      std::string dims_text;
      for (int d : dims) dims_text += fmt::format("{} ", d);
      CAPTURE(dims_text);
      Tensor y = flip(x, dims);
      CHECK(y.to_vector<double>() == ref_flip(x.to_vector<double>(), s, dims));
      CHECK(flip(y, dims).to_vector<double>() == x.to_vector<double>());
    }
    Tensor r3 = testing::random_tensor({4, 5, 6}, dt, 142);
    CHECK(flip(r3, {0, 2}).to_vector<double>() == ref_flip(r3.to_vector<double>(), r3.shape(), {0, 2}));
    Tensor r1 = Tensor::from_vector<double>({1, 2, 3}, {3}).to(dt);
    CHECK(flip(r1, {0}).to_vector<double>() == Vec{3, 2, 1});
  }
}

TEST_CASE("flip gradients match finite differences") {
  auto x = testing::random_tensor({2, 3, 3, 4, 5}, DType::f64, 151).set_requires_grad();
  for (const std::vector<int>& dims : {std::vector<int>{2, 4}, {-1}, {0, 1, 3}})
    testing::check_gradients([&dims](const std::vector<Tensor>& in) { return flip(in[0], dims); }, {x});
}

// ======================================================================
// graph recording and errors
// ======================================================================

TEST_CASE("no graph is recorded under NoGradGuard or for inputs without grad") {
  auto x = testing::random_tensor({1, 2, 3, 4, 5}, DType::f32, 161).set_requires_grad();
  Tensor w = Tensor::ones({2});
  {
    NoGradGuard guard;
    CHECK_FALSE(instance_norm(x, w, Tensor()).requires_grad());
    CHECK_FALSE(leaky_relu(x).requires_grad());
    CHECK_FALSE(upsample_nearest(x, {2, 2, 2}).requires_grad());
    CHECK_FALSE(concat({x, x}).requires_grad());
    CHECK_FALSE(flip(x, {2}).requires_grad());
  }
  Tensor c = x.detach();
  CHECK_FALSE(instance_norm(c, w, Tensor()).requires_grad());
  CHECK(instance_norm(c, w.clone().set_requires_grad(), Tensor()).requires_grad());
  CHECK(concat({c, x}).requires_grad());
  CHECK(upsample_nearest(x, {1, 2, 2}).grad_fn()->name() == "UpsampleNearest3DBackward");
  CHECK(concat({c, x}).grad_fn()->name() == "CatBackward");
  CHECK(flip(x, {-1}).grad_fn()->name() == "FlipBackward");
  CHECK(instance_norm(x, w, Tensor()).grad_fn()->name() == "InstanceNormBackward");
}

TEST_CASE("errors name the offending shapes") {
  Tensor x = Tensor::zeros({2, 3, 4, 5, 6});
  // instance_norm
  CHECK_THROWS_WITH_AS(instance_norm(Tensor::zeros({2, 3}), Tensor(), Tensor()), Contains("[2, 3]"), Error);
  CHECK_THROWS_WITH_AS(instance_norm(x, Tensor::ones({4}), Tensor()), Contains("weight of shape [4]"), Error);
  CHECK_THROWS_WITH_AS(instance_norm(x, Tensor::ones({4}), Tensor()), Contains("[2, 3, 4, 5, 6]"), Error);
  CHECK_THROWS_WITH_AS(instance_norm(x, Tensor(), Tensor::zeros({3, 1})), Contains("bias of shape [3, 1]"), Error);
  CHECK_THROWS_WITH_AS(instance_norm(x, Tensor::ones({3}, DType::f64), Tensor()), Contains("float64"), Error);
  CHECK_THROWS_WITH_AS(instance_norm(x.to(DType::i32), Tensor(), Tensor()), Contains("int32"), Error);
  CHECK_THROWS_WITH_AS(instance_norm(Tensor::zeros({2, 3, 0}), Tensor(), Tensor()), Contains("[2, 3, 0]"), Error);
  // leaky_relu
  CHECK_THROWS_WITH_AS(leaky_relu(x.to(DType::f16)), Contains("float16"), Error);
  // upsample_nearest
  CHECK_THROWS_WITH_AS(upsample_nearest(Tensor::zeros({2, 3, 4, 5}), {2, 2, 2}), Contains("[2, 3, 4, 5]"), Error);
  CHECK_THROWS_WITH_AS(upsample_nearest(x, {1, 0, 2}), Contains("(1, 0, 2)"), Error);
  CHECK_THROWS_WITH_AS(upsample_nearest(x, {1, 2, -2}), Contains("[2, 3, 4, 5, 6]"), Error);
  // concat
  Tensor y = Tensor::zeros({2, 5, 4, 5, 7});
  CHECK_THROWS_WITH_AS(concat({x, y}), Contains("[2, 3, 4, 5, 6], [2, 5, 4, 5, 7]"), Error);
  CHECK_THROWS_WITH_AS(concat({x, Tensor::zeros({2, 3, 4, 5})}), Contains("[2, 3, 4, 5]"), Error);
  CHECK_THROWS_WITH_AS(concat({x, x.to(DType::f64)}), Contains("float64"), Error);
  CHECK_THROWS_WITH_AS(concat({x, x}, 5), Contains("dim 5"), Error);
  CHECK_THROWS_WITH_AS(concat({x, x}, -6), Contains("[2, 3, 4, 5, 6]"), Error);
  CHECK_THROWS_WITH_AS(concat({}), Contains("no tensors"), Error);
  CHECK_THROWS_WITH_AS(concat({x, Tensor()}), Contains("undefined"), Error);
  // flip
  CHECK_THROWS_WITH_AS(flip(Tensor::zeros({2, 3, 4}), {3}), Contains("[2, 3, 4]"), Error);
  CHECK_THROWS_WITH_AS(flip(Tensor::zeros({2, 3, 4}), {-4}), Contains("dim -4"), Error);
  CHECK_THROWS_WITH_AS(flip(Tensor::zeros({2, 3, 4}), {1, -2}), Contains("more than once"), Error);
}
