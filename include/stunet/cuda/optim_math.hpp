#pragma once
/// \file
/// The per-element SGD update of the CUDA optimiser (cuda/optim.cuh), as
/// plain C++ so that the host test tests/kernel_math/test_optim_math.cpp runs
/// it against optim::SGD::step (include/stunet/optim/sgd.hpp).
///
/// Bit-reproducibility: optim::SGD::step computes, in T,
///   d = g + wd*w;  buf = first ? d : mom*buf + damp*d;
///   d = nesterov ? d + mom*buf : buf;  w = w - lr*d.
/// Whether a compiler fuses a*b + c into one FMA decides the last bits. nvcc
/// fuses by default; g++ does whenever the target has FMA (gnu++/c++ modes
/// default to -ffp-contract=fast), so a -march=native build on an FMA machine
/// computes every one of those lines as an fma, while a baseline x86-64 build
/// (and the host code of .cu files, which gets no -march) rounds every
/// product. The formula is therefore written once, over an Ops policy that
/// says how a*b + c rounds:
///   - RoundedOps: the product and the sum rounded separately (the device
///     path uses the _rn intrinsics, which nvcc never contracts; the host
///     path rounds the product through a volatile);
///   - FusedOps: one rounding (fma), the contracted CPU build's pattern:
///     fma(wd, w, g), fma(mom, buf, damp*d), fma(mom, buf, d), fma(-lr, d, w).
/// The kernel uses one of them (optim.cuh, kSgdFused).

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "stunet/core/host_device.hpp"

namespace stunet::cuda::optim_math {

/// Arithmetic type of parameter type T: double for double, float otherwise
/// (f16/bf16 parameters are updated in float and rounded once when stored).
template <class T> using accum_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// a*b and a*b + c with each operation rounded on its own.
struct RoundedOps {
  template <class A> STUNET_HOST_DEVICE static A mul(A a, A b) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<A, double>) return __dmul_rn(a, b);
    else return __fmul_rn(a, b);
#else
    // Through a volatile so that the host compiler cannot contract the
    // product into a following add: the host emulation rounds as the device.
    volatile A p = a * b;
    return p;
#endif
  }
  template <class A> STUNET_HOST_DEVICE static A add(A a, A b) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<A, double>) return __dadd_rn(a, b);
    else return __fadd_rn(a, b);
#else
    return a + b;
#endif
  }
  /// a*b + c, two roundings.
  template <class A> STUNET_HOST_DEVICE static A madd(A a, A b, A c) { return add(mul(a, b), c); }
};

/// a*b and a*b + c with a*b + c rounded once (fma).
struct FusedOps {
  template <class A> STUNET_HOST_DEVICE static A mul(A a, A b) { return RoundedOps::mul(a, b); }
  /// a*b + c, one rounding.
  template <class A> STUNET_HOST_DEVICE static A madd(A a, A b, A c) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<A, double>) return __fma_rn(a, b, c);
    else return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
  }
};

/// Hyper-parameters of one update, already in the arithmetic type A, rounded
/// from double exactly as optim::SGD::step does (static_cast<T>(lr), ...).
template <class A> struct SgdParams {
  A lr, weight_decay, momentum, damp;  ///< damp = 1 - dampening
  A grad_scale;                        ///< g is multiplied by it first (1: no-op, skipped)
  bool use_buf;                        ///< momentum != 0: buf exists and is updated
  bool nesterov, first;                ///< first: buf = d (torch creates the buffer from the first gradient)
};

/// One element of torch.optim.SGD's step: updates w (and buf when
/// p.use_buf), in A, in optim::SGD::step's order of operations.
template <class Ops, class A, class T>
STUNET_HOST_DEVICE inline void sgd_element(T& w, T g, T* buf, const SgdParams<A>& p) {
  A wv = static_cast<A>(w);
  A d = static_cast<A>(g);
  if (p.grad_scale != A(1)) d = Ops::mul(d, p.grad_scale);
  if (p.weight_decay != A(0)) d = Ops::madd(p.weight_decay, wv, d);  // g + wd * w
  if (p.use_buf) {
    // mom * buf + damp * d: the CPU build that contracts keeps damp * d as
    // the separately rounded addend.
    const A b = p.first ? d : Ops::madd(p.momentum, static_cast<A>(*buf), Ops::mul(p.damp, d));
    *buf = static_cast<T>(b);
    // Nesterov reads the buffer back as stored, as the CPU does (a no-op for float/double).
    const A bs = static_cast<A>(*buf);
    d = p.nesterov ? Ops::madd(p.momentum, bs, d) : bs;
  }
  wv = Ops::madd(-p.lr, d, wv);  // w - lr * d (negation is exact)
  w = static_cast<T>(wv);
}

}  // namespace stunet::cuda::optim_math
