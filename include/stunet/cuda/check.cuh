#pragma once
/// \file
/// Checking CUDA runtime calls and kernel launches.
///
///   STUNET_CUDA_CHECK(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice));
///   my_kernel<<<grid, block>>>(...);
///   STUNET_CUDA_CHECK_LAUNCH("my_kernel");
///
/// A failure throws stunet::Error naming the CUDA error (cudaGetErrorName and
/// cudaGetErrorString), the call text and file:line. Define
/// STUNET_CUDA_SYNC_CHECKS=1 to also synchronise the device after every
/// launch check, so that an asynchronous fault is reported at the kernel that
/// caused it rather than at a later call (slow; for debugging).
///
/// Include only from .cu files (or code compiled by nvcc); this header pulls in
/// the CUDA runtime and stunet/core only, never Eigen.

#include <cuda_runtime.h>

#include "stunet/core/error.hpp"

#ifndef STUNET_CUDA_SYNC_CHECKS
#define STUNET_CUDA_SYNC_CHECKS 0
#endif

namespace stunet::cuda::detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  throw Error(fmt::format("CUDA error {} ({}) from `{}` ({}:{})", cudaGetErrorName(err), cudaGetErrorString(err),
                          call, file, line));
}

/// Checks for an error left by the last kernel launch. cudaGetLastError also
/// clears a non-sticky error so that the next check does not report it again.
inline void check_launch(const char* what, const char* file, int line) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) [[unlikely]]
    throw_cuda_error(err, what, file, line);
  if constexpr (STUNET_CUDA_SYNC_CHECKS != 0) {
    err = cudaDeviceSynchronize();
    if (err != cudaSuccess) [[unlikely]]
      throw_cuda_error(err, what, file, line);
  }
}

}  // namespace stunet::cuda::detail

/// STUNET_CUDA_CHECK(call): evaluates a CUDA runtime call once and throws
/// stunet::Error unless it returned cudaSuccess.
#define STUNET_CUDA_CHECK(call)                                                          \
  do {                                                                                   \
    const cudaError_t stunet_cuda_err_ = (call);                                         \
    if (stunet_cuda_err_ != cudaSuccess) [[unlikely]] {                                  \
      (void)cudaGetLastError(); /* clear it so that a later launch check stays clean */  \
      ::stunet::cuda::detail::throw_cuda_error(stunet_cuda_err_, #call, __FILE__, __LINE__); \
    }                                                                                    \
  } while (0)

/// STUNET_CUDA_CHECK_LAUNCH("kernel name"): call right after a <<<...>>>
/// launch; throws stunet::Error for a bad configuration (grid, block, shared
/// memory) or a pending asynchronous error.
#define STUNET_CUDA_CHECK_LAUNCH(what) ::stunet::cuda::detail::check_launch((what), __FILE__, __LINE__)
