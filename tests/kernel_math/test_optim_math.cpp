// Host emulation of the CUDA SGD kernel (include/stunet/cuda/optim.cuh): the
// element update of cuda/optim_math.hpp run over every element for several
// steps, against optim::SGD::step on host tensors.
//
// Bit-equality depends on how the host compiler rounds optim::SGD::step's
// a*b + c (see optim_math.hpp): g++ contracts each of them into an fma when
// the target has FMA (-march=native here), and rounds product and sum
// separately otherwise. One of the two policies must then reproduce the CPU
// to the bit, and both must agree with it to a few ulps.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../testing.hpp"
#include "stunet/cuda/optim_math.hpp"
#include "stunet/optim/sgd.hpp"

using namespace stunet;
namespace om = stunet::cuda::optim_math;

namespace {

struct SgdCase {
  const char* name;
  optim::SGDOptions opt;
  double grad_scale;
};

std::vector<SgdCase> sgd_cases() {
  std::vector<SgdCase> cases;
  cases.push_back({"nnU-Net (Nesterov 0.99, wd 3e-5)", {0.0123, 0.99, 0.0, 3e-5, true}, 1.0});
  cases.push_back({"Nesterov, large wd, grad_scale 0.5", {0.0123, 0.9, 0.0, 0.37, true}, 0.5});
  cases.push_back({"heavy ball with dampening 0.1", {0.05, 0.9, 0.1, 1e-3, false}, 1.0});
  cases.push_back({"heavy ball, no wd, grad_scale 0.5", {0.05, 0.8, 0.0, 0.0, false}, 0.5});
  cases.push_back({"plain SGD (momentum 0: no buffer)", {0.1, 0.0, 0.0, 1e-2, false}, 1.0});
  return cases;
}

/// Runs 5 steps of optim::SGD and of the emulated kernel (policy Ops) from
/// the same weights and gradients; returns the emulated weights and buffer
/// of every step next to the CPU's.
template <class T, class Ops> struct Run {
  std::vector<std::vector<T>> w_cpu, w_emu, buf_cpu, buf_emu;
};

template <class T, class Ops> Run<T, Ops> run_sgd(const SgdCase& sc, std::int64_t n) {
  using A = om::accum_t<T>;
  std::mt19937_64 rng(99);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<T> w(static_cast<std::size_t>(n));
  for (T& v : w) v = static_cast<T>(u(rng));
  Tensor p = Tensor::from_vector<T>(w, Shape{n});
  p.set_requires_grad(true);
  optim::SGD sgd(nn::StateDict{{"p", p}}, sc.opt);
  std::vector<T> buf(w.size(), T(0));
  Run<T, Ops> out;
  for (int step = 0; step < 5; ++step) {
    std::vector<T> g(w.size()), g_scaled(w.size());
    for (std::size_t i = 0; i < g.size(); ++i) {
      g[i] = static_cast<T>(u(rng));
      g_scaled[i] = g[i] * static_cast<T>(sc.grad_scale);  // a power of two: exact
    }
    p.set_grad(Tensor::from_vector<T>(g_scaled, Shape{n}));
    sgd.step();

    const om::SgdParams<A> prm{static_cast<A>(sc.opt.lr),
                               static_cast<A>(sc.opt.weight_decay),
                               static_cast<A>(sc.opt.momentum),
                               static_cast<A>(1.0 - sc.opt.dampening),
                               static_cast<A>(sc.grad_scale),
                               sc.opt.momentum != 0.0,
                               sc.opt.nesterov,
                               step == 0};
    // The kernel's grid-stride loop visits each element once; order is irrelevant.
    for (std::size_t i = 0; i < w.size(); ++i) om::sgd_element<Ops>(w[i], g[i], prm.use_buf ? &buf[i] : nullptr, prm);

    out.w_cpu.push_back(std::vector<T>(p.data<T>(), p.data<T>() + n));
    out.w_emu.push_back(w);
    if (prm.use_buf) {
      const Tensor& b = sgd.momentum_buffers().at("p");
      out.buf_cpu.push_back(std::vector<T>(b.data<T>(), b.data<T>() + n));
      out.buf_emu.push_back(buf);
    }
    // Continue both from the CPU's state so that a one-ulp difference does
    // not compound: each step is compared on its own.
    w = out.w_cpu.back();
    if (prm.use_buf) buf = out.buf_cpu.back();
  }
  return out;
}

/// Largest max_i |a - b| / max_i |b| over the steps (errors of a*b + c
/// are relative to the terms, not to a result that cancels to near zero).
template <class T> double worst(const std::vector<std::vector<T>>& a, const std::vector<std::vector<T>>& b) {
  double m = 0;
  for (std::size_t s = 0; s < a.size(); ++s) {
    double d = 0, scale = 0;
    for (std::size_t i = 0; i < a[s].size(); ++i) {
      d = std::max(d, std::abs(static_cast<double>(a[s][i]) - static_cast<double>(b[s][i])));
      scale = std::max(scale, std::abs(static_cast<double>(b[s][i])));
    }
    m = std::max(m, d / std::max(scale, 1e-300));
  }
  return m;
}

}  // namespace

TEST_CASE_TEMPLATE("cuda optim math: SGD element update matches optim::SGD::step", T, float, double) {
  const std::int64_t n = 3 * 5 * 7 * 11;
  const double ulp = std::is_same_v<T, float> ? 6e-8 : 1.2e-16;
  std::string policies;
  for (const SgdCase& sc : sgd_cases()) {
    CAPTURE(std::string(sc.name));
    auto fused = run_sgd<T, om::FusedOps>(sc, n);
    auto rounded = run_sgd<T, om::RoundedOps>(sc, n);
    // Both policies within a few ulps of the CPU, weights and buffers.
    CHECK(worst(fused.w_emu, fused.w_cpu) < 8 * ulp);
    CHECK(worst(rounded.w_emu, rounded.w_cpu) < 8 * ulp);
    CHECK(worst(fused.buf_emu, fused.buf_cpu) < 8 * ulp);
    CHECK(worst(rounded.buf_emu, rounded.buf_cpu) < 8 * ulp);
    const bool fused_exact = fused.w_emu == fused.w_cpu && fused.buf_emu == fused.buf_cpu;
    const bool rounded_exact = rounded.w_emu == rounded.w_cpu && rounded.buf_emu == rounded.buf_cpu;
    policies += policies.empty() ? "" : ", ";
    policies += fused_exact ? "fused" : rounded_exact ? "rounded" : "neither";
    CHECK((fused_exact || rounded_exact));
#if !defined(__FMA__)
    // Without FMA instructions nothing can be contracted: the rounded policy
    // (the CUDA kernel's) must be the CPU's exactly.
    CHECK(rounded_exact);
#endif
  }
  MESSAGE("policy reproducing optim::SGD::step bit for bit on this build, per case: " << policies);
}

TEST_CASE("cuda optim math: SGD first step, Nesterov and momentum by hand") {
  // One element in double, every path written out.
  const om::SgdParams<double> p{0.1, 0.5, 0.9, 1.0, 1.0, true, true, true};
  double w = 2.0, buf = 123.0;
  om::sgd_element<om::RoundedOps>(w, 1.0, &buf, p);  // d = 1 + 0.5*2 = 2; buf = 2; d = 2 + 0.9*2 = 3.8
  CHECK(buf == 2.0);
  CHECK(w == doctest::Approx(2.0 - 0.1 * 3.8).epsilon(1e-15));
  om::SgdParams<double> q = p;
  q.first = false;
  q.nesterov = false;
  q.grad_scale = 0.5;
  w = 2.0;
  buf = 1.0;
  om::sgd_element<om::RoundedOps>(w, 4.0, &buf, q);  // d = 2 + 1 = 3; buf = 0.9 + 3 = 3.9; d = 3.9
  CHECK(buf == doctest::Approx(3.9).epsilon(1e-15));
  CHECK(w == doctest::Approx(2.0 - 0.39).epsilon(1e-15));
  q.use_buf = false;  // momentum 0: buf untouched (may be null)
  w = 2.0;
  om::sgd_element<om::RoundedOps>(w, 4.0, static_cast<double*>(nullptr), q);
  CHECK(w == doctest::Approx(2.0 - 0.1 * 3.0).epsilon(1e-15));
}
