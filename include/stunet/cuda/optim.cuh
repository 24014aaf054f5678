#pragma once
/// \file
/// CUDA kernel of the optim family: torch.optim.SGD's update of one parameter
/// (the sgd_step entry of core/cuda_kernels.hpp; host twin
/// optim::SGD::step in optim/sgd.hpp). One thread per element, grid-stride;
/// the element formula is cuda/optim_math.hpp's sgd_element, shared with the
/// host test.
///
/// Precision: float and double parameters are updated in their own type, in
/// optim::SGD::step's order of operations; f16/bf16 parameters (and their
/// momentum buffers) are loaded to float, updated, and rounded once when
/// stored. Rounding of a*b + c: see kSgdFused.

#include <cstdint>
#include <type_traits>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/error.hpp"
#include "stunet/cuda/check.cuh"
#include "stunet/cuda/launch.cuh"
#include "stunet/cuda/optim_math.hpp"

namespace stunet::cuda {

/// Whether the device update rounds each a*b + c once (fma, as optim::SGD::step
/// compiled by g++ for an FMA target: -march=native on current x86) or twice
/// (product and sum separately, as a build without FMA, including the host
/// code of .cu files). false: the rounded form, which does not depend on the
/// host compiler's contraction choices. See cuda/optim_math.hpp.
inline constexpr bool kSgdFused = false;

namespace optim_detail {

namespace om = optim_math;

/// w[i], buf[i] updated from g[i] for i < n; buf is read only when p.use_buf.
template <class T, class Ops>
__global__ void sgd_step_kernel(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ buf, std::int64_t n,
                                om::SgdParams<acc_t<T>> p) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    om::sgd_element<Ops>(w[i], g[i], p.use_buf ? buf + i : nullptr, p);
}

/// The sgd_step entry: w, g, buf are dense device arrays of n elements of
/// dtype (buf may be null when momentum is 0, and is ignored then).
inline void sgd_step(DType dtype, void* w, const void* g, void* buf, std::int64_t n, double lr, double weight_decay,
                     double momentum, double dampening, bool nesterov, bool first, double grad_scale, int device) {
  if (n == 0) return;
  STUNET_CHECK(momentum == 0.0 || buf != nullptr, "sgd_step: momentum {} needs a momentum buffer, got null",
               momentum);
  DeviceGuard guard(device);
  using Ops = std::conditional_t<kSgdFused, om::FusedOps, om::RoundedOps>;
  dispatch_cuda_float(dtype, "sgd_step", [&]<class T>() {
    using A = acc_t<T>;
    // Hyper-parameters rounded from double as optim::SGD::step rounds them to T.
    const om::SgdParams<A> p{static_cast<A>(lr),         static_cast<A>(weight_decay),
                             static_cast<A>(momentum),   static_cast<A>(1.0 - dampening),
                             static_cast<A>(grad_scale), momentum != 0.0,
                             nesterov,                   first};
    sgd_step_kernel<T, Ops><<<grid_for(n), kBlock, 0, stream(device)>>>(
        static_cast<T*>(w), static_cast<const T*>(g), static_cast<T*>(buf), n, p);
    STUNET_CUDA_CHECK_LAUNCH(fmt::format("sgd_step_kernel {} n={}", dtype_name(dtype), n).c_str());
  });
}

}  // namespace optim_detail

/// Installs this family's entries in the kernel table.
inline void register_optim(CudaKernels& t) { t.sgd_step = &optim_detail::sgd_step; }

}  // namespace stunet::cuda
