#pragma once
/// \file
/// The CUDA device backend: fills stunet::cuda_backend() (core/storage.hpp)
/// so that Tensor::empty/zeros/to/copy_ work on Device::cuda(i).
///
/// Including this header from any .cu file of a program (built with
/// stunet::cuda) registers the backend during static initialisation, before
/// main. Plain .cpp files keep using <stunet/core/tensor.hpp> unchanged; CUDA
/// tensors they create go through the registered hooks.
///
/// Memory comes from the caching allocator (allocator.cuh). Copies are queued
/// on the context's stream (launch.cuh), after the kernels that produced their
/// source; copies that involve the host return once the data has arrived.

#include <cstddef>
#include <cstring>

#include <cuda_runtime.h>

#include "stunet/core/device.hpp"
#include "stunet/core/error.hpp"
#include "stunet/core/storage.hpp"
#include "stunet/cuda/allocator.cuh"
#include "stunet/cuda/check.cuh"
#include "stunet/cuda/launch.cuh"

namespace stunet::cuda {

/// Number of CUDA devices visible to this process; 0 (never an exception)
/// when there is no GPU, no driver, or the driver is too old for the runtime.
inline int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

namespace detail {

inline void* backend_allocate(std::size_t bytes, int device) { return device_allocate(bytes, device); }

inline void backend_deallocate(void* ptr, int device) { device_deallocate(ptr, device); }

inline void backend_copy(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes) {
  if (bytes == 0) return;
  STUNET_CHECK(dst != nullptr && src != nullptr, "CUDA copy of {} bytes from {} to {} with a null pointer", bytes,
               src_dev, dst_dev);
  if (dst_dev.is_cpu() && src_dev.is_cpu()) {
    std::memcpy(dst, src, bytes);
  } else if (src_dev.is_cpu()) {
    DeviceGuard guard(dst_dev.index);
    STUNET_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream(dst_dev.index)));
    // Pageable host memory: the call may return before the source was read.
    synchronize(dst_dev.index);
  } else if (dst_dev.is_cpu()) {
    DeviceGuard guard(src_dev.index);
    STUNET_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream(src_dev.index)));
    synchronize(src_dev.index);
  } else if (dst_dev.index == src_dev.index) {
    DeviceGuard guard(dst_dev.index);
    STUNET_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream(dst_dev.index)));
  } else {
    synchronize(src_dev.index);
    STUNET_CUDA_CHECK(cudaMemcpyPeerAsync(dst, dst_dev.index, src, src_dev.index, bytes, stream(dst_dev.index)));
    synchronize(dst_dev.index);
  }
}

inline void backend_memset_zero(void* ptr, std::size_t bytes, int device) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  STUNET_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, stream(device)));
}

inline bool register_backend() noexcept {
  DeviceBackend& b = cuda_backend();
  b.allocate = &backend_allocate;
  b.deallocate = &backend_deallocate;
  b.copy = &backend_copy;
  b.memset_zero = &backend_memset_zero;
  return true;
}

/// Registration at static-initialisation time in every translation unit that
/// includes this header (an inline variable: one object, initialised once).
inline const bool backend_registered = register_backend();

}  // namespace detail

/// Installs the hooks (idempotent) and returns true. Static initialisation
/// already did it; code that runs before main (another static initialiser)
/// calls this first.
inline bool ensure_backend_registered() noexcept { return detail::register_backend(); }

}  // namespace stunet::cuda
