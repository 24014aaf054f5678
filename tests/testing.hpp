#pragma once
// Helpers shared by the test suites: seeded random tensors, error measures,
// and a finite-difference gradient check in float64.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <algorithm>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "stunet/core/tensor.hpp"

namespace stunet::testing {

/// Uniform random tensor in [lo, hi) from a fixed seed (host).
inline Tensor random_tensor(const Shape& shape, DType dtype, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(static_cast<std::size_t>(shape.numel()));
  for (double& x : v) x = dist(rng);
  return Tensor::from_vector<double>(v, shape).to(dtype);
}

/// Random integer labels in [0, classes) (host).
inline Tensor random_labels(const Shape& shape, int classes, std::uint64_t seed, DType dtype = DType::i64) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> dist(0, classes - 1);
  std::vector<std::int64_t> v(static_cast<std::size_t>(shape.numel()));
  for (auto& x : v) x = dist(rng);
  return Tensor::from_vector<std::int64_t>(v, shape).to(dtype);
}

/// max |a - b| over all elements (shapes must match).
inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  auto va = a.to_vector<double>(), vb = b.to_vector<double>();
  double m = 0;
  for (std::size_t i = 0; i < va.size(); ++i) m = std::max(m, std::abs(va[i] - vb[i]));
  return m;
}

/// max |a - ref| / max |ref|: the relative measure the golden tests use.
inline double max_rel_diff(const Tensor& a, const Tensor& ref) {
  auto vr = ref.to_vector<double>();
  double scale = 0;
  for (double x : vr) scale = std::max(scale, std::abs(x));
  return max_abs_diff(a, ref) / std::max(scale, 1e-300);
}

/// Result of a finite-difference probe: the worst relative error over the
/// probed elements, and where it was.
struct GradientError {
  double worst = 0;
  std::size_t input = 0, element = 0;
  double analytic = 0, numeric = 0;
};

/// Compares the analytic gradient of f at `inputs` with central finite
/// differences, in float64. f maps the inputs to any tensor y; the check
/// projects y on a fixed random direction R (so every output element
/// matters): analytic = J^T R from y.backward(R), numeric = d<f(x), R>/dx_i.
/// Inputs must be float64 leaves with requires_grad set. At most
/// `max_elements` entries per input are probed (chosen with a fixed seed).
/// The error is |numeric - analytic| / max(1, |numeric|).
inline GradientError gradient_error(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                                    std::vector<Tensor> inputs, double eps = 1e-6, std::size_t max_elements = 300) {
  for (auto& x : inputs) {
    REQUIRE(x.dtype() == DType::f64);
    REQUIRE(x.requires_grad());
    REQUIRE(x.is_contiguous());
    x.zero_grad();
  }
  Tensor y = f(inputs);
  REQUIRE(y.requires_grad());
  Tensor r = random_tensor(y.shape(), DType::f64, 1234567);
  y.backward(r);
  auto project = [&](const std::vector<Tensor>& in) {
    NoGradGuard guard;
    auto vy = f(in).to_vector<double>();
    auto vr = r.to_vector<double>();
    double s = 0;
    for (std::size_t i = 0; i < vy.size(); ++i) s += vy[i] * vr[i];
    return s;
  };
  std::mt19937_64 pick(42);
  GradientError result;
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    Tensor& x = inputs[k];
    REQUIRE_MESSAGE(x.grad().defined(), "input " << k << " received no gradient");
    auto analytic = x.grad().to_vector<double>();
    double* p = x.data<double>();
    const std::size_t n = static_cast<std::size_t>(x.numel());
    std::vector<std::size_t> idx(n);
    for (std::size_t i = 0; i < n; ++i) idx[i] = i;
    if (n > max_elements) {
      std::shuffle(idx.begin(), idx.end(), pick);
      idx.resize(max_elements);
    }
    for (std::size_t i : idx) {
      const double saved = p[i];
      p[i] = saved + eps;
      const double fp = project(inputs);
      p[i] = saved - eps;
      const double fm = project(inputs);
      p[i] = saved;
      const double numeric = (fp - fm) / (2 * eps);
      const double err = std::abs(numeric - analytic[i]) / std::max(1.0, std::abs(numeric));
      if (err > result.worst) result = {err, k, i, analytic[i], numeric};
    }
  }
  return result;
}

/// CHECKs that gradient_error(...) stays within tol, reporting the worst
/// element otherwise.
inline void check_gradients(const std::function<Tensor(const std::vector<Tensor>&)>& f, std::vector<Tensor> inputs,
                            double eps = 1e-6, double tol = 1e-6, std::size_t max_elements = 300) {
  std::vector<Shape> shapes;
  for (const auto& x : inputs) shapes.push_back(x.shape());
  GradientError e = gradient_error(f, std::move(inputs), eps, max_elements);
  CHECK_MESSAGE(e.worst <= tol, "input " << e.input << " (shape " << fmt::format("{}", shapes[e.input])
                                         << "): element " << e.element << " analytic " << e.analytic
                                         << " vs numeric " << e.numeric << " (rel err " << e.worst << ")");
}

/// Path of ../shared (or $STUNET_SHARED), empty when absent so that tests
/// can skip with a visible message in users' clones.
inline std::filesystem::path shared_dir() {
  if (const char* env = std::getenv("STUNET_SHARED")) return env;
  std::filesystem::path p = STUNET_SHARED_DIR;
  return std::filesystem::exists(p) ? p : std::filesystem::path();
}

}  // namespace stunet::testing
