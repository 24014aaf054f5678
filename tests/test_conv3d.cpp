// conv3d: forward and the three gradients against a naive float64 loop nest
// written here (scatter form, independent of the kernels' im2col and gather),
// finite-difference checks, autograd plumbing and argument errors.

#include "testing.hpp"

#include "stunet/ops/conv3d.hpp"

#include <array>
#include <vector>

using namespace stunet;
using testing::random_tensor;

namespace {

/// One convolution geometry of the reference tests.
struct Case {
  int n, cin, cout;
  std::array<int, 3> in, kernel, stride, pad;
  bool bias;
};

std::string describe(const Case& c) {
  return fmt::format("N={} Cin={} Cout={} in=({},{},{}) kernel=({},{},{}) stride=({},{},{}) pad=({},{},{}) bias={}",
                     c.n, c.cin, c.cout, c.in[0], c.in[1], c.in[2], c.kernel[0], c.kernel[1], c.kernel[2],
                     c.stride[0], c.stride[1], c.stride[2], c.pad[0], c.pad[1], c.pad[2], c.bias);
}

int out_extent(int in, int k, int s, int p) { return (in + 2 * p - k) / s + 1; }

/// Reference results in float64: y, and dx, dw, db for a given dy.
struct Reference {
  std::vector<double> y, dx, dw, db;
};

/// The textbook definition: y[n,k,o] = b[k] + sum_{c,t} w[k,c,t] x[n,c,o*s-p+t],
/// and its gradients accumulated by scattering over the same index triples.
Reference reference(const Case& c, const std::vector<double>& x, const std::vector<double>& w,
                    const std::vector<double>& b, const std::vector<double>& dy) {
  const int D = c.in[0], H = c.in[1], W = c.in[2];
  const int kD = c.kernel[0], kH = c.kernel[1], kW = c.kernel[2];
  const int oD = out_extent(D, kD, c.stride[0], c.pad[0]), oH = out_extent(H, kH, c.stride[1], c.pad[1]),
            oW = out_extent(W, kW, c.stride[2], c.pad[2]);
  Reference r;
  r.y.assign(static_cast<std::size_t>(c.n * c.cout * oD * oH * oW), 0.0);
  r.dx.assign(x.size(), 0.0);
  r.dw.assign(w.size(), 0.0);
  r.db.assign(static_cast<std::size_t>(c.cout), 0.0);
  auto xi = [&](int n, int ci, int d, int h, int v) { return (((n * c.cin + ci) * D + d) * H + h) * W + v; };
  auto wi = [&](int k, int ci, int a, int e, int f) { return (((k * c.cin + ci) * kD + a) * kH + e) * kW + f; };
  for (int n = 0; n < c.n; ++n)
    for (int k = 0; k < c.cout; ++k)
      for (int od = 0; od < oD; ++od)
        for (int oh = 0; oh < oH; ++oh)
          for (int ow = 0; ow < oW; ++ow) {
            const std::size_t yi = static_cast<std::size_t>((((n * c.cout + k) * oD + od) * oH + oh) * oW + ow);
            double acc = c.bias ? b[static_cast<std::size_t>(k)] : 0.0;
            const double g = dy[yi];
            r.db[static_cast<std::size_t>(k)] += g;
            for (int ci = 0; ci < c.cin; ++ci)
              for (int a = 0; a < kD; ++a)
                for (int e = 0; e < kH; ++e)
                  for (int f = 0; f < kW; ++f) {
                    const int id = od * c.stride[0] - c.pad[0] + a;
                    const int ih = oh * c.stride[1] - c.pad[1] + e;
                    const int iw = ow * c.stride[2] - c.pad[2] + f;
                    if (id < 0 || id >= D || ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                    const auto xo = static_cast<std::size_t>(xi(n, ci, id, ih, iw));
                    const auto wo = static_cast<std::size_t>(wi(k, ci, a, e, f));
                    acc += w[wo] * x[xo];
                    r.dx[xo] += w[wo] * g;
                    r.dw[wo] += x[xo] * g;
                  }
            r.y[yi] = acc;
          }
  return r;
}

Tensor from_doubles(const std::vector<double>& v, const Shape& shape, DType dtype) {
  return Tensor::from_vector<double>(v, shape).to(dtype);
}

/// Runs conv3d and its backward in `dtype` on the case's random data and
/// compares all four results with the float64 reference at relative `tol`.
void check_against_reference(const Case& c, DType dtype, double tol) {
  CAPTURE(describe(c));
  CAPTURE(dtype_name(dtype));
  const Shape xs{c.n, c.cin, c.in[0], c.in[1], c.in[2]};
  const Shape ws{c.cout, c.cin, c.kernel[0], c.kernel[1], c.kernel[2]};
  const Shape ys{c.n, c.cout, out_extent(c.in[0], c.kernel[0], c.stride[0], c.pad[0]),
                 out_extent(c.in[1], c.kernel[1], c.stride[1], c.pad[1]),
                 out_extent(c.in[2], c.kernel[2], c.stride[2], c.pad[2])};
  // The reference sees exactly the values the op sees (rounded to dtype).
  const auto xv = random_tensor(xs, dtype, 1).to_vector<double>();
  const auto wv = random_tensor(ws, dtype, 2).to_vector<double>();
  const auto bv = random_tensor(Shape{c.cout}, dtype, 3).to_vector<double>();
  const auto gv = random_tensor(ys, dtype, 4).to_vector<double>();
  const Reference r = reference(c, xv, wv, bv, gv);

  Tensor x = from_doubles(xv, xs, dtype).set_requires_grad();
  Tensor w = from_doubles(wv, ws, dtype).set_requires_grad();
  Tensor b = c.bias ? from_doubles(bv, Shape{c.cout}, dtype).set_requires_grad() : Tensor();
  Tensor y = conv3d(x, w, b, {.stride = c.stride, .padding = c.pad});
  REQUIRE(y.shape() == ys);
  REQUIRE(y.dtype() == dtype);
  CHECK(testing::max_rel_diff(y, from_doubles(r.y, ys, DType::f64)) <= tol);

  y.backward(from_doubles(gv, ys, dtype));
  REQUIRE(x.grad().defined());
  REQUIRE(w.grad().defined());
  CHECK(testing::max_rel_diff(x.grad(), from_doubles(r.dx, xs, DType::f64)) <= tol);
  CHECK(testing::max_rel_diff(w.grad(), from_doubles(r.dw, ws, DType::f64)) <= tol);
  if (c.bias) {
    REQUIRE(b.grad().defined());
    CHECK(testing::max_rel_diff(b.grad(), from_doubles(r.db, Shape{c.cout}, DType::f64)) <= tol);
  }
}

const std::vector<Case>& reference_cases() {
  static const std::vector<Case> cases = {
      // kernel 3, padding 1, stride 1: the STU-Net residual block conv.
      {2, 3, 4, {5, 7, 6}, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}, true},
      {2, 3, 4, {5, 7, 6}, {3, 3, 3}, {1, 1, 1}, {0, 0, 0}, false},
      // Downsampling convs: isotropic and anisotropic stride.
      {2, 3, 5, {5, 7, 6}, {3, 3, 3}, {2, 2, 2}, {1, 1, 1}, true},
      {2, 4, 3, {5, 7, 6}, {3, 3, 3}, {1, 2, 2}, {1, 1, 1}, false},
      {2, 3, 4, {5, 7, 6}, {3, 3, 3}, {2, 2, 2}, {0, 0, 0}, true},
      // Kernel 1: pointwise (the im2col-free path) and strided projection.
      {2, 3, 4, {5, 7, 6}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, true},
      {2, 4, 3, {5, 7, 6}, {1, 1, 1}, {1, 2, 2}, {0, 0, 0}, false},
      {2, 3, 2, {5, 7, 6}, {1, 1, 1}, {1, 1, 1}, {1, 0, 1}, true},
      // Anisotropic kernel, stride larger than the kernel, uneven padding.
      {2, 3, 4, {5, 7, 6}, {2, 3, 1}, {2, 1, 3}, {1, 0, 1}, true},
      {1, 2, 3, {4, 9, 5}, {3, 1, 2}, {3, 2, 1}, {2, 1, 0}, false},
      // Enough channels that a column tile is narrower than a sample
      // (several tiles per sample, tiles starting mid-row).
      {1, 40, 6, {9, 10, 11}, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}, true},
      {2, 24, 5, {9, 10, 11}, {3, 3, 3}, {1, 2, 2}, {1, 1, 1}, false},
      // More output channels than one vector block holds (and not a multiple
      // of it), and rows long enough that the direct kernels' row buffer
      // takes fewer output rows per work item.
      {1, 3, 20, {4, 5, 9}, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}, true},
      {1, 64, 18, {3, 9, 40}, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}, false},
      {1, 5, 17, {5, 9, 30}, {3, 3, 3}, {2, 2, 2}, {1, 1, 1}, true},
  };
  return cases;
}

Conv3dProblem problem_of(const Case& c) {
  Conv3dProblem p;
  p.N = c.n;
  p.C = c.cin;
  p.K = c.cout;
  p.D = c.in[0];
  p.H = c.in[1];
  p.W = c.in[2];
  p.T = c.kernel[0];
  p.R = c.kernel[1];
  p.S = c.kernel[2];
  p.stride_d = c.stride[0];
  p.stride_h = c.stride[1];
  p.stride_w = c.stride[2];
  p.pad_d = c.pad[0];
  p.pad_h = c.pad[1];
  p.pad_w = c.pad[2];
  return p;
}

/// Every CPU kernel variant on every reference case, called directly: the
/// op's dispatch picks one per geometry, and this keeps the others honest.
template <class Scalar> void check_kernel_variants(double tol) {
  for (const Case& c : reference_cases()) {
    CAPTURE(describe(c));
    const Conv3dProblem p = problem_of(c);
    const DType dtype = dtype_of<Scalar>;
    auto values = [&](std::int64_t n, std::uint64_t seed) {
      return random_tensor(Shape{n}, dtype, seed).template to_vector<double>();
    };
    const auto xv = values(p.input_numel(), 1), wv = values(p.weight_numel(), 2), bv = values(p.K, 3),
               gv = values(p.output_numel(), 4);
    const Reference r = reference(c, xv, wv, bv, gv);
    auto cast = [](const std::vector<double>& v) { return std::vector<Scalar>(v.begin(), v.end()); };
    const auto x = cast(xv), w = cast(wv), b = cast(bv), g = cast(gv);
    auto rel = [](const std::vector<Scalar>& got, const std::vector<double>& want) {
      double diff = 0, scale = 0;
      for (std::size_t i = 0; i < want.size(); ++i) {
        diff = std::max(diff, std::abs(static_cast<double>(got[i]) - want[i]));
        scale = std::max(scale, std::abs(want[i]));
      }
      return diff / std::max(scale, 1e-300);
    };
    const Scalar* bias = c.bias ? b.data() : nullptr;
    std::vector<Scalar> y(static_cast<std::size_t>(p.output_numel()), Scalar(-7));
    cpu::conv3d_forward_im2col(p, x.data(), w.data(), bias, y.data());
    CHECK(rel(y, r.y) <= tol);
#if STUNET_CONV3D_DIRECT
    std::fill(y.begin(), y.end(), Scalar(-7));
    cpu::conv3d_forward_direct(p, x.data(), w.data(), bias, y.data());
    CHECK(rel(y, r.y) <= tol);
#endif
    std::vector<Scalar> dw(w.size(), Scalar(-7));
    cpu::conv3d_backward_weight_im2col(p, x.data(), g.data(), dw.data());
    CHECK(rel(dw, r.dw) <= tol);
#if STUNET_CONV3D_DIRECT
    std::fill(dw.begin(), dw.end(), Scalar(-7));
    cpu::conv3d_backward_weight_direct(p, x.data(), g.data(), dw.data());
    CHECK(rel(dw, r.dw) <= tol);
#endif
    std::vector<Scalar> dx(x.size(), Scalar(-7));
    cpu::conv3d_backward_data_gather(p, g.data(), w.data(), dx.data());
    CHECK(rel(dx, r.dx) <= tol);
    std::fill(dx.begin(), dx.end(), Scalar(-7));
    cpu::conv3d_backward_data(p, g.data(), w.data(), dx.data());
    CHECK(rel(dx, r.dx) <= tol);
  }
}

}  // namespace

TEST_CASE("every conv3d kernel variant matches the reference") {
  check_kernel_variants<double>(1e-12);
  check_kernel_variants<float>(1e-5);
}

TEST_CASE("conv3d matches the float64 reference loop nest in float64") {
  for (const Case& c : reference_cases()) check_against_reference(c, DType::f64, 1e-12);
}

TEST_CASE("conv3d matches the float64 reference loop nest in float32") {
  for (const Case& c : reference_cases()) check_against_reference(c, DType::f32, 1e-5);
}

TEST_CASE("conv3d output extents follow PyTorch") {
  Conv3dProblem p;
  p.D = 5;
  p.H = 7;
  p.W = 6;
  p.T = p.R = p.S = 3;
  p.pad_d = p.pad_h = p.pad_w = 1;
  p.stride_h = p.stride_w = 2;
  CHECK(p.out_d() == 5);
  CHECK(p.out_h() == 4);
  CHECK(p.out_w() == 3);
  CHECK(p.macs() == 5 * 4 * 3 * 27);
  CHECK(p.valid());
  static_assert(Conv3dProblem::out_extent(64, 3, 1, 2) == 32);
  static_assert(Conv3dProblem::out_extent(2, 3, 0, 1) == 0);

  Tensor x = random_tensor(Shape{1, 2, 6, 5, 4}, DType::f32, 7);
  Tensor w = random_tensor(Shape{3, 2, 3, 3, 3}, DType::f32, 8);
  CHECK(conv3d(x, w, Tensor(), {.stride = {1, 2, 2}, .padding = {1, 1, 1}}).shape() == Shape{1, 3, 6, 3, 2});
  CHECK(conv3d(x, w).shape() == Shape{1, 3, 4, 3, 2});
}

TEST_CASE("conv3d gradients pass finite-difference checks") {
  struct Small {
    Shape x, w;
    Conv3dOptions opt;
  };
  const std::vector<Small> smalls = {
      {Shape{2, 2, 3, 4, 5}, Shape{3, 2, 3, 3, 3}, {.stride = {1, 2, 2}, .padding = {1, 1, 1}}},
      {Shape{1, 3, 4, 3, 4}, Shape{2, 3, 3, 3, 3}, {.stride = {1, 1, 1}, .padding = {1, 1, 1}}},
      {Shape{2, 2, 5, 4, 4}, Shape{2, 2, 3, 2, 3}, {.stride = {2, 2, 1}, .padding = {0, 1, 1}}},
      {Shape{2, 3, 3, 3, 3}, Shape{4, 3, 1, 1, 1}, {.stride = {1, 1, 1}, .padding = {0, 0, 0}}},
  };
  std::uint64_t seed = 100;
  for (const Small& s : smalls) {
    CAPTURE(fmt::format("x {} w {}", s.x, s.w));
    Tensor x = random_tensor(s.x, DType::f64, seed++).set_requires_grad();
    Tensor w = random_tensor(s.w, DType::f64, seed++).set_requires_grad();
    Tensor b = random_tensor(Shape{s.w[0]}, DType::f64, seed++).set_requires_grad();
    const Conv3dOptions opt = s.opt;
    testing::check_gradients([opt](const std::vector<Tensor>& in) { return conv3d(in[0], in[1], in[2], opt); },
                             {x, w, b}, 1e-6, 1e-7);
    testing::check_gradients([opt](const std::vector<Tensor>& in) { return conv3d(in[0], in[1], Tensor(), opt); },
                             {x, w}, 1e-6, 1e-7);
  }
}

TEST_CASE("conv3d accepts non-contiguous inputs") {
  Tensor big = random_tensor(Shape{2, 3, 7, 8, 9}, DType::f64, 11);
  Tensor x = big.box({0, 1, 1, 2, 0}, Shape{2, 2, 5, 6, 7});  // a view with the parent's strides
  REQUIRE_FALSE(x.is_contiguous());
  Tensor w = random_tensor(Shape{3, 2, 3, 3, 3}, DType::f64, 12);
  const Conv3dOptions opt{.stride = {1, 2, 1}, .padding = {1, 1, 0}};
  Tensor expected = conv3d(x.clone(), w, Tensor(), opt);
  CHECK(testing::max_abs_diff(conv3d(x, w, Tensor(), opt), expected) == 0.0);

  // A gradient reaches a non-contiguous leaf with the leaf's shape.
  x.set_requires_grad();
  Tensor y = conv3d(x, w, Tensor(), opt);
  y.backward(Tensor::ones(y.shape(), DType::f64));
  REQUIRE(x.grad().defined());
  CHECK(x.grad().shape() == x.shape());
}

TEST_CASE("conv3d computes only the gradients that are needed") {
  Tensor x = random_tensor(Shape{1, 2, 4, 4, 4}, DType::f32, 21);
  Tensor w = random_tensor(Shape{3, 2, 3, 3, 3}, DType::f32, 22).set_requires_grad();
  Tensor b = random_tensor(Shape{3}, DType::f32, 23);
  Tensor y = conv3d(x, w, b, {.padding = {1, 1, 1}});
  REQUIRE(y.grad_fn() != nullptr);
  CHECK(y.grad_fn()->name() == "Conv3dBackward");
  CHECK_FALSE(y.grad_fn()->needs_input_grad(0));
  CHECK(y.grad_fn()->needs_input_grad(1));
  CHECK_FALSE(y.grad_fn()->needs_input_grad(2));
  y.backward(Tensor::ones(y.shape()));
  CHECK(w.grad().defined());
  CHECK_FALSE(x.grad().defined());
  CHECK_FALSE(b.grad().defined());

  // No graph at all when nothing requires grad, or under NoGradGuard.
  CHECK(conv3d(x, w.detach(), b).grad_fn() == nullptr);
  NoGradGuard guard;
  CHECK_FALSE(conv3d(x, w, b).requires_grad());
}

TEST_CASE("conv3d backward survives an in-place write to its output, not to its input") {
  Tensor x = random_tensor(Shape{1, 2, 4, 4, 4}, DType::f64, 31);
  Tensor w = random_tensor(Shape{2, 2, 3, 3, 3}, DType::f64, 32).set_requires_grad();
  Tensor y = conv3d(x, w, Tensor(), {.padding = {1, 1, 1}});
  Tensor g = random_tensor(y.shape(), DType::f64, 33);
  // The output is not saved: an in-place activation may overwrite it.
  y.fill_(0.0);
  y.backward(g);
  CHECK(w.grad().defined());

  Tensor y2 = conv3d(x, w, Tensor(), {.padding = {1, 1, 1}});
  x.fill_(1.0);  // the saved input changed: the weight gradient would be wrong
  CHECK_THROWS_AS(y2.backward(g), stunet::Error);
}

TEST_CASE("conv3d rejects bad arguments with messages that name the shapes") {
  const Tensor x = Tensor::zeros(Shape{2, 3, 8, 8, 8});
  const Tensor w = Tensor::zeros(Shape{16, 3, 3, 3, 3});
  CHECK_THROWS_WITH_AS(conv3d(x, Tensor::zeros(Shape{16, 4, 3, 3, 3})),
                       doctest::Contains("input [2, 3, 8, 8, 8] has 3 channels but weight [16, 4, 3, 3, 3] expects 4"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(conv3d(Tensor::zeros(Shape{3, 8, 8, 8}), w), doctest::Contains("input of shape [3, 8, 8, 8]"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(conv3d(x, Tensor::zeros(Shape{16, 3, 3, 3})), doctest::Contains("weight of shape [16, 3, 3, 3]"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(conv3d(x, Tensor::zeros(Shape{16, 3, 3, 3, 3}, DType::f64)),
                       doctest::Contains("input [2, 3, 8, 8, 8] is float32 but weight [16, 3, 3, 3, 3] is float64"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(conv3d(Tensor::zeros(Shape{2, 3, 8, 8, 8}, DType::i64),
                              Tensor::zeros(Shape{16, 3, 3, 3, 3}, DType::i64)),
                       doctest::Contains("input [2, 3, 8, 8, 8] and weight [16, 3, 3, 3, 3] are int64"), stunet::Error);
  CHECK_THROWS_WITH_AS(conv3d(x, w, Tensor::zeros(Shape{15})),
                       doctest::Contains("bias of shape [15] must be [16] for weight [16, 3, 3, 3, 3]"), stunet::Error);
  CHECK_THROWS_WITH_AS(conv3d(x, w, Tensor::zeros(Shape{16}, DType::f64)), doctest::Contains("bias [16] is float64"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(conv3d(Tensor::zeros(Shape{1, 3, 2, 8, 8}), w),
                       doctest::Contains("kernel [16, 3, 3, 3, 3] is larger than input [1, 3, 2, 8, 8]"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(conv3d(x, w, Tensor(), {.stride = {1, 0, 1}}), doctest::Contains("stride (1, 0, 1)"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(conv3d(x, w, Tensor(), {.padding = {0, -1, 0}}), doctest::Contains("padding (0, -1, 0)"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(conv3d(x, Tensor()), doctest::Contains("undefined"), stunet::Error);
}
