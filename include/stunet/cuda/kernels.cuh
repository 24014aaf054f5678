#pragma once
/// \file
/// Every CUDA kernel of stunet, registered in the table of core/cuda_kernels.hpp.
///
/// A program that runs ops on CUDA tensors compiles exactly one .cu file that
/// includes this header (examples/cuda_kernels.cu is ours) and links
/// stunet::cuda. Static initialisation of that file installs the device
/// backend (memory, copies) and fills the kernel table; the rest of the
/// program stays plain C++ compiled by the host compiler.

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/cuda/backend.cuh"
#include "stunet/cuda/conv3d.cuh"
#include "stunet/cuda/elementwise.cuh"
#include "stunet/cuda/loss.cuh"
#include "stunet/cuda/norm.cuh"
#include "stunet/cuda/optim.cuh"
#include "stunet/cuda/tensor_ops.cuh"

namespace stunet::cuda {

namespace detail {
inline bool register_kernels() noexcept {
  CudaKernels& t = cuda_kernels();
  t.device_count = [] { return cuda::device_count(); };
  t.synchronize = [](int device) { cuda::synchronize(device); };
  t.allocator_counts = [](int device) {
    const AllocatorStats s = allocator_stats(device);
    return CudaAllocatorCounts{s.allocations, s.device_mallocs, s.live_bytes, s.cached_bytes};
  };
  register_tensor_ops(t);
  register_elementwise(t);
  register_norm(t);
  register_conv3d(t);
  register_loss(t);
  register_optim(t);
  return true;
}

/// Filled during static initialisation of the including translation unit.
inline const bool kernels_registered = ensure_backend_registered() && register_kernels();
}  // namespace detail

/// Installs backend and kernels (idempotent); for code that runs before main.
inline bool ensure_kernels_registered() noexcept {
  return ensure_backend_registered() && detail::register_kernels();
}

}  // namespace stunet::cuda
