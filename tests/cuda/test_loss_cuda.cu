// CUDA loss and optimiser kernels (include/stunet/cuda/loss.cuh, optim.cuh)
// against the CPU kernels: softmax, class labels, cross-entropy, soft Dice
// sums and their backward passes, and the SGD step against optim::SGD. Odd
// shapes, every float dtype, determinism (two calls give the same bits).
//
// Reference convention: the input is drawn in the tested dtype T, converted
// exactly to float64 on the host, and the CPU kernel runs in float64 on it;
// so the only differences are the kernel's arithmetic (float, or double for
// f64) and the rounding of its stored outputs to T.

#include <doctest/doctest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../testing.hpp"
#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cpu/loss.hpp"
#include "stunet/cpu/softmax.hpp"
#include "stunet/cuda/optim.cuh"
#include "stunet/cuda/optim_math.hpp"
#include "stunet/optim/sgd.hpp"

using namespace stunet;
using stunet::testing::max_rel_diff;
using stunet::testing::random_labels;
using stunet::testing::random_tensor;

namespace {

const CudaKernels& K() { return cuda_kernels(); }
Tensor dev(const Tensor& h) { return h.to(Device::cuda(0)); }
Tensor host(const Tensor& d) { return d.to(Device::cpu()); }

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.nbytes() == b.nbytes() && std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0;
}

const DType kFloatTypes[] = {DType::f64, DType::f32, DType::f16, DType::bf16};

/// Tolerance, relative to the largest reference magnitude, for an output
/// computed in float (double for f64) from T inputs and stored as T:
///   f64: summation order only;
///   f32: a few float ulps per term of at most 105-term sums (the 1e-5 bar);
///   f16: dominated by rounding the stored result, 2^-11 = 4.9e-4 relative,
///        doubled for a value derived from another stored 16-bit value;
///   bf16: likewise with 2^-8 = 3.9e-3.
double stored_tol(DType t) {
  switch (t) {
    case DType::f64: return 1e-13;
    case DType::f32: return 1e-5;
    case DType::f16: return 1e-3;
    default: return 8e-3;
  }
}

struct Ncv {
  std::int64_t N, C, V;
};

/// s * g as dtype t (host), through float64: exact for the powers of two used.
Tensor scaled(const Tensor& g, double s, DType t) {
  std::vector<double> v = g.to_vector<double>();
  for (double& x : v) x *= s;
  return Tensor::from_vector<double>(v, g.shape()).to(t);
}

}  // namespace

TEST_CASE("cuda loss: the table entries are registered") {
  CHECK((K().softmax_forward != nullptr));
  CHECK((K().softmax_backward != nullptr));
  CHECK((K().class_labels != nullptr));
  CHECK((K().cross_entropy_forward != nullptr));
  CHECK((K().cross_entropy_backward != nullptr));
  CHECK((K().dice_sums != nullptr));
  CHECK((K().dice_backward != nullptr));
  CHECK((K().sgd_step != nullptr));
}

TEST_CASE("cuda loss: softmax forward and backward match the CPU") {
  // [outer, C, inner]: STU-Net's layout at odd sizes, several grid-stride
  // rounds, softmax over the last axis (inner = 1), and 105 classes.
  for (Ncv s : {Ncv{2, 5, 3 * 5 * 7}, Ncv{3, 7, 17 * 19 * 23}, Ncv{37, 11, 1}, Ncv{2, 105, 1001}}) {
    for (DType t : kFloatTypes) {
      const std::string dtype(dtype_name(t));
      CAPTURE(dtype);
      CAPTURE(s.N);
      CAPTURE(s.C);
      CAPTURE(s.V);
      const Shape shape{s.N, s.C, s.V};
      Tensor x = random_tensor(shape, t, 101, -6.0, 6.0);
      Tensor x64 = x.to(DType::f64);
      Tensor y_ref = Tensor::empty(shape, DType::f64);
      cpu::softmax_forward(x64.data<double>(), y_ref.data<double>(), s.N, s.C, s.V);

      Tensor xd = dev(x), yd = Tensor::empty(shape, t, Device::cuda(0));
      K().softmax_forward(t, xd.raw_data(), yd.raw_data(), s.N, s.C, s.V, 0);
      Tensor y = host(yd);
      CHECK(max_rel_diff(y.to(DType::f64), y_ref) < stored_tol(t));
      K().softmax_forward(t, xd.raw_data(), yd.raw_data(), s.N, s.C, s.V, 0);
      CHECK(same_bytes(host(yd), y));
      Tensor x2 = dev(x);  // in place gives the same bits
      K().softmax_forward(t, x2.raw_data(), x2.raw_data(), s.N, s.C, s.V, 0);
      CHECK(same_bytes(host(x2), y));

      // Backward from the stored y (as the op saves it) and a random g.
      Tensor g = random_tensor(shape, t, 102);
      Tensor dx_ref = Tensor::empty(shape, DType::f64);
      cpu::softmax_backward(y.to(DType::f64).data<double>(), g.to(DType::f64).data<double>(), dx_ref.data<double>(),
                            s.N, s.C, s.V);
      Tensor gd = dev(g), dxd = Tensor::empty(shape, t, Device::cuda(0));
      K().softmax_backward(t, yd.raw_data(), gd.raw_data(), dxd.raw_data(), s.N, s.C, s.V, 0);
      Tensor dx = host(dxd);
      CHECK(max_rel_diff(dx.to(DType::f64), dx_ref) < stored_tol(t));
      // In place over g gives the same bits.
      K().softmax_backward(t, yd.raw_data(), gd.raw_data(), gd.raw_data(), s.N, s.C, s.V, 0);
      CHECK(same_bytes(host(gd), dx));
    }
  }
}

TEST_CASE("cuda loss: class labels convert every dtype and report the smallest bad index") {
  const std::int64_t N = 2, V = 33 * 35 * 37, n = N * V, C = 5;  // 85470 labels: many blocks
  for (DType t : {DType::f32, DType::f64, DType::f16, DType::bf16, DType::i64, DType::i32, DType::u8}) {
    const std::string dtype(dtype_name(t));
    CAPTURE(dtype);
    Tensor valid = random_labels(Shape{N, V}, static_cast<int>(C), 201, t);
    Tensor out = Tensor::empty(Shape{N, V}, DType::i32, Device::cuda(0));
    Tensor ref = Tensor::empty(Shape{N, V}, DType::i32);
    CHECK(K().class_labels(t, dev(valid).raw_data(), out.data<std::int32_t>(), n, C, 0) == -1);
    dispatch_all(t, [&]<class L>() { return cpu::class_labels(valid.data<L>(), ref.data<std::int32_t>(), n, C); });
    CHECK(same_bytes(host(out), ref));

    // Bad values in late blocks, then one in the first block: the reported
    // index must be the smallest, whichever thread finishes first.
    std::vector<double> v = valid.to_vector<double>();
    const bool is_float = is_floating(t);
    v[80000] = static_cast<double>(C);      // == C
    v[70001] = 200.0;                       // far out of range (fits u8)
    if (is_float) v[75000] = 2.5;           // not an integer
    if (is_float) v[76000] = std::nan("");  // NaN
    if (t != DType::u8) v[77000] = -1.0;
    Tensor bad = Tensor::from_vector<double>(v, Shape{N, V}).to(t);
    std::int64_t expect = 70001;
    for (int round = 0; round < 2; ++round) {
      CAPTURE(round);
      CHECK(K().class_labels(t, dev(bad).raw_data(), out.data<std::int32_t>(), n, C, 0) == expect);
      const std::int64_t cpu_bad = dispatch_all(
          t, [&]<class L>() { return cpu::class_labels(bad.data<L>(), ref.data<std::int32_t>(), n, C); });
      CHECK(cpu_bad == expect);  // the op formats its error message from this index
      CHECK(same_bytes(host(out), ref));
      v[3] = 7.0;
      bad = Tensor::from_vector<double>(v, Shape{N, V}).to(t);
      expect = 3;
    }
  }
}

TEST_CASE("cuda loss: cross-entropy forward and backward match the CPU") {
  // One block; a few hundred blocks; the 1024-block cap with a grid-stride loop.
  for (Ncv s : {Ncv{2, 5, 3 * 5 * 7}, Ncv{3, 7, 17 * 19 * 23}, Ncv{3, 4, 65 * 67 * 69}}) {
    for (DType t : kFloatTypes) {
      const std::string dtype(dtype_name(t));
      CAPTURE(dtype);
      CAPTURE(s.V);
      const Shape shape{s.N, s.C, s.V};
      Tensor x = random_tensor(shape, t, 301, -5.0, 5.0);
      Tensor labels = random_labels(Shape{s.N, s.V}, static_cast<int>(s.C), 302, DType::i32);
      Tensor x64 = x.to(DType::f64);
      Tensor lse_ref = Tensor::empty(Shape{s.N, s.V}, DType::f64);
      const double total_ref = cpu::cross_entropy_forward(x64.data<double>(), labels.data<std::int32_t>(),
                                                          lse_ref.data<double>(), s.N, s.C, s.V);

      Tensor xd = dev(x), ld = dev(labels), lsed = Tensor::empty(Shape{s.N, s.V}, t, Device::cuda(0));
      const double total = K().cross_entropy_forward(t, xd.raw_data(), ld.data<std::int32_t>(), lsed.raw_data(), s.N,
                                                     s.C, s.V, 0);
      // The total uses the unrounded lse, so even 16-bit inputs sum to float accuracy.
      CHECK(std::abs(total - total_ref) <= (t == DType::f64 ? 1e-12 : 1e-5) * std::abs(total_ref));
      Tensor lse = host(lsed);
      CHECK(max_rel_diff(lse.to(DType::f64), lse_ref) < stored_tol(t));
      // Deterministic: the same bits twice.
      const double again = K().cross_entropy_forward(t, xd.raw_data(), ld.data<std::int32_t>(), lsed.raw_data(), s.N,
                                                     s.C, s.V, 0);
      CHECK(std::memcmp(&again, &total, sizeof total) == 0);
      CHECK(same_bytes(host(lsed), lse));

      // Backward from the kernel's own (stored) lse: the reference uses it too.
      const double factor = 0.7 / static_cast<double>(s.N * s.V);
      Tensor dx_ref = Tensor::empty(shape, DType::f64);
      cpu::cross_entropy_backward(x64.data<double>(), labels.data<std::int32_t>(), lse.to(DType::f64).data<double>(),
                                  dx_ref.data<double>(), s.N, s.C, s.V, factor);
      Tensor dxd = Tensor::empty(shape, t, Device::cuda(0));
      K().cross_entropy_backward(t, xd.raw_data(), ld.data<std::int32_t>(), lsed.raw_data(), dxd.raw_data(), s.N, s.C,
                                 s.V, factor, 0);
      CHECK(max_rel_diff(host(dxd).to(DType::f64), dx_ref) < stored_tol(t));
    }
  }
}

TEST_CASE("cuda loss: dice sums and backward match the CPU") {
  // One chunk per row; 6 ragged chunks; 19 chunks.
  for (Ncv s : {Ncv{2, 5, 3 * 5 * 7}, Ncv{2, 3, 33 * 35 * 37}, Ncv{2, 4, 150001}}) {
    for (DType t : kFloatTypes) {
      for (std::int64_t c0 : {0, 1}) {
        const std::string dtype(dtype_name(t));
        CAPTURE(dtype);
        CAPTURE(s.V);
        CAPTURE(c0);
        const Shape shape{s.N, s.C, s.V};
        Tensor p = random_tensor(shape, t, 401, 0.0, 1.0);
        Tensor labels = random_labels(Shape{s.N, s.V}, static_cast<int>(s.C), 402, DType::i32);
        Tensor p64 = p.to(DType::f64);
        const auto rows = static_cast<std::size_t>(s.N * s.C);
        std::vector<double> i_ref(rows, -7.0), p_ref(rows, -7.0), g_ref(rows, -7.0);
        cpu::dice_sums(p64.data<double>(), labels.data<std::int32_t>(), s.N, s.C, s.V, c0, i_ref.data(),
                       p_ref.data(), g_ref.data());

        Tensor pd = dev(p), ld = dev(labels);
        std::vector<double> i_got(rows, -7.0), p_got(rows, -7.0), g_got(rows, -7.0);
        K().dice_sums(t, pd.raw_data(), ld.data<std::int32_t>(), s.N, s.C, s.V, c0, i_got.data(), p_got.data(),
                      g_got.data(), 0);
        // Every T value is exact in double and the sums are in double: only
        // the order of the additions differs, whatever the dtype.
        for (std::size_t r = 0; r < rows; ++r) {
          CAPTURE(r);
          if (static_cast<std::int64_t>(r) % s.C < c0) {
            CHECK(i_got[r] == -7.0);
            CHECK(p_got[r] == -7.0);
            CHECK(g_got[r] == -7.0);
            continue;
          }
          CHECK(std::abs(i_got[r] - i_ref[r]) <= 1e-12 * std::abs(i_ref[r]));
          CHECK(std::abs(p_got[r] - p_ref[r]) <= 1e-12 * std::abs(p_ref[r]));
          CHECK(g_got[r] == g_ref[r]);
        }
        std::vector<double> i2(rows, -7.0), p2(rows, -7.0), g2(rows, -7.0);
        K().dice_sums(t, pd.raw_data(), ld.data<std::int32_t>(), s.N, s.C, s.V, c0, i2.data(), p2.data(), g2.data(), 0);
        CHECK(std::memcmp(i2.data(), i_got.data(), rows * sizeof(double)) == 0);
        CHECK(std::memcmp(p2.data(), p_got.data(), rows * sizeof(double)) == 0);
        CHECK(std::memcmp(g2.data(), g_got.data(), rows * sizeof(double)) == 0);

        // Backward; the coefficient arrays die right after the call (the
        // entry must have copied them before returning).
        Tensor dxd = Tensor::empty(shape, t, Device::cuda(0));
        std::vector<double> a(rows), b(rows);
        for (std::size_t r = 0; r < rows; ++r) {
          a[r] = -0.3 / static_cast<double>(r + 1);
          b[r] = 1e-3 * static_cast<double>(r) - 0.0015;
        }
        Tensor dx_ref = Tensor::empty(shape, DType::f64);
        cpu::dice_backward(labels.data<std::int32_t>(), dx_ref.data<double>(), s.N, s.C, s.V, a.data(), b.data());
        {
          std::vector<double> a_tmp = a, b_tmp = b;
          K().dice_backward(t, ld.data<std::int32_t>(), dxd.raw_data(), s.N, s.C, s.V, a_tmp.data(), b_tmp.data(), 0);
          std::fill(a_tmp.begin(), a_tmp.end(), 1e30);  // would show up if read late
          std::fill(b_tmp.begin(), b_tmp.end(), 1e30);
        }
        Tensor dx = host(dxd);
        if (t == DType::f64) {
          CHECK(same_bytes(dx, dx_ref));
        } else if (t == DType::f32) {
          // The CPU op's float kernel rounds the same double a + b once.
          Tensor dx32 = Tensor::empty(shape, DType::f32);
          cpu::dice_backward(labels.data<std::int32_t>(), dx32.data<float>(), s.N, s.C, s.V, a.data(), b.data());
          CHECK(same_bytes(dx, dx32));
        } else {
          CHECK(max_rel_diff(dx.to(DType::f64), dx_ref) < stored_tol(t));
        }
      }
    }
  }
}

// ---- optimiser ------------------------------------------------------------------

namespace {

struct SgdCase {
  const char* name;
  optim::SGDOptions opt;
  double grad_scale;
};

const SgdCase kSgdCases[] = {
    {"nnU-Net (Nesterov 0.99, wd 3e-5)", {0.0123, 0.99, 0.0, 3e-5, true}, 1.0},
    {"Nesterov, large wd, grad_scale 0.5", {0.0123, 0.9, 0.0, 0.37, true}, 0.5},
    {"heavy ball with dampening 0.1", {0.05, 0.9, 0.1, 1e-3, false}, 1.0},
    {"heavy ball, no wd, grad_scale 0.5", {0.05, 0.8, 0.0, 0.0, false}, 0.5},
    {"plain SGD (momentum 0: null buffer)", {0.1, 0.0, 0.0, 1e-2, false}, 1.0},
};

// Whether the CPU reference compiled into this file rounds a*b + c like the
// kernel: the host code of .cu files gets no -march, so without FMA nothing
// is contracted and the kernel's rounded form must match optim::SGD to the
// bit (with kSgdFused, only an FMA-contracting host build would).
#if defined(__FMA__)
constexpr bool kHostContracts = true;
#else
constexpr bool kHostContracts = false;
#endif
constexpr bool kExpectBitExact = cuda::kSgdFused == kHostContracts;

}  // namespace

TEST_CASE("cuda optim: SGD step matches optim::SGD over 5 steps") {
  const std::int64_t n = 3 * 5 * 7 * 11 * 13;  // 15015: several blocks, ragged tail
  for (const SgdCase& sc : kSgdCases) {
    for (DType t : {DType::f64, DType::f32}) {
      const std::string dtype(dtype_name(t)), name(sc.name);
      CAPTURE(name);
      CAPTURE(dtype);
      Tensor p = random_tensor(Shape{n}, t, 501);
      Tensor wd = dev(p);
      Tensor bufd = sc.opt.momentum != 0.0 ? Tensor::zeros(Shape{n}, t, Device::cuda(0)) : Tensor();
      p.set_requires_grad(true);
      optim::SGD sgd(nn::StateDict{{"p", p}}, sc.opt);
      for (int step = 0; step < 5; ++step) {
        CAPTURE(step);
        Tensor g = random_tensor(Shape{n}, t, 510 + static_cast<std::uint64_t>(step));
        // The CPU gets the scaled gradient (a power of two: exact).
        p.set_grad(scaled(g, sc.grad_scale, t));
        sgd.step();
        K().sgd_step(t, wd.raw_data(), dev(g).raw_data(), bufd.defined() ? bufd.raw_data() : nullptr, n, sc.opt.lr,
                     sc.opt.weight_decay, sc.opt.momentum, sc.opt.dampening, sc.opt.nesterov, step == 0,
                     sc.grad_scale, 0);
        Tensor w = host(wd);
        const double tol = t == DType::f32 ? 1e-6 : 1e-14;
        CHECK(max_rel_diff(w, p.detach()) < tol);
        if (kExpectBitExact) CHECK(same_bytes(w, p.detach()));
        if (bufd.defined()) {
          const Tensor& b = sgd.momentum_buffers().at("p");
          CHECK(max_rel_diff(host(bufd), b) < tol);
          if (kExpectBitExact) CHECK(same_bytes(host(bufd), b));
        }
      }
    }
  }
}

namespace {

/// CUDA's 16-bit type with the bit layout of host type H.
template <class H> using cuda_half_t = std::conditional_t<std::is_same_v<H, f16>, __half, __nv_bfloat16>;

/// Reinterprets 16-bit elements (stunet::f16/bf16 <-> __half/__nv_bfloat16: same bits).
template <class To, class From> std::vector<To> bit_copy(const std::vector<From>& v) {
  static_assert(sizeof(To) == sizeof(From));
  std::vector<To> out(v.size());
  if (!v.empty())
    std::memcpy(static_cast<void*>(out.data()), static_cast<const void*>(v.data()), v.size() * sizeof(From));
  return out;
}

/// The kernel's element update run on the host with the same policy, for
/// 16-bit parameters (optim::SGD takes float32/float64 only). D is CUDA's
/// type, whose host conversions round to nearest even as the device's.
template <class D>
void host_sgd_16(std::vector<D>& w, const std::vector<D>& g, std::vector<D>& buf, const SgdCase& sc, bool first) {
  using Ops = std::conditional_t<cuda::kSgdFused, cuda::optim_math::FusedOps, cuda::optim_math::RoundedOps>;
  const cuda::optim_math::SgdParams<float> prm{static_cast<float>(sc.opt.lr),
                                               static_cast<float>(sc.opt.weight_decay),
                                               static_cast<float>(sc.opt.momentum),
                                               static_cast<float>(1.0 - sc.opt.dampening),
                                               static_cast<float>(sc.grad_scale),
                                               sc.opt.momentum != 0.0,
                                               sc.opt.nesterov,
                                               first};
  for (std::size_t i = 0; i < w.size(); ++i)
    cuda::optim_math::sgd_element<Ops>(w[i], g[i], prm.use_buf ? &buf[i] : nullptr, prm);
}

}  // namespace

TEST_CASE_TEMPLATE("cuda optim: SGD step on 16-bit parameters", H, f16, bf16) {
  using D = cuda_half_t<H>;
  const DType t = dtype_of<H>;
  const std::int64_t n = 3 * 5 * 7 * 11;
  for (const SgdCase& sc : kSgdCases) {
    const std::string name(sc.name);
    CAPTURE(name);
    Tensor p = random_tensor(Shape{n}, t, 601);
    std::vector<D> w = bit_copy<D>(p.to_vector<H>()), buf(w.size(), D(0.0f));
    Tensor wd = dev(p);
    Tensor bufd = sc.opt.momentum != 0.0 ? Tensor::zeros(Shape{n}, t, Device::cuda(0)) : Tensor();
    // A float32 run of optim::SGD from the same (rounded) values bounds the
    // 16-bit drift: each step rounds w (and buf) once to 2^-11 (f16) or
    // 2^-8 (bf16) relative.
    Tensor p32 = p.to(DType::f32);
    p32.set_requires_grad(true);
    optim::SGD sgd(nn::StateDict{{"p", p32}}, sc.opt);
    for (int step = 0; step < 5; ++step) {
      CAPTURE(step);
      Tensor g = random_tensor(Shape{n}, t, 610 + static_cast<std::uint64_t>(step));
      K().sgd_step(t, wd.raw_data(), dev(g).raw_data(), bufd.defined() ? bufd.raw_data() : nullptr, n, sc.opt.lr,
                   sc.opt.weight_decay, sc.opt.momentum, sc.opt.dampening, sc.opt.nesterov, step == 0, sc.grad_scale,
                   0);
      host_sgd_16(w, bit_copy<D>(g.to_vector<H>()), buf, sc, step == 0);
      Tensor got = host(wd);
      // Same float arithmetic, same round-to-nearest-even stores: same bits.
      CHECK(same_bytes(got, Tensor::from_vector<H>(bit_copy<H>(w), Shape{n})));
      if (bufd.defined()) CHECK(same_bytes(host(bufd), Tensor::from_vector<H>(bit_copy<H>(buf), Shape{n})));
      p32.set_grad(scaled(g, sc.grad_scale, DType::f32));
      sgd.step();
      CHECK(max_rel_diff(got.to(DType::f32), p32.detach()) < (t == DType::f16 ? 4e-3 : 3e-2));
    }
  }
}

TEST_CASE("cuda optim: SGD step with momentum needs a buffer") {
  Tensor w = Tensor::zeros(Shape{7}, DType::f32, Device::cuda(0));
  Tensor g = Tensor::zeros(Shape{7}, DType::f32, Device::cuda(0));
  CHECK_THROWS_AS(K().sgd_step(DType::f32, w.raw_data(), g.raw_data(), nullptr, 7, 0.1, 0.0, 0.9, 0.0, false, true,
                               1.0, 0),
                  stunet::Error);
}
