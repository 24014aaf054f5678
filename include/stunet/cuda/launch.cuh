#pragma once
/// \file
/// What every kernel file shares: the context's stream per device, the dtype
/// dispatch onto CUDA's element types, the accumulation type, and grid sizes.
/// Include only from .cu files.

#include <cstdint>
#include <mutex>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "stunet/core/dtype.hpp"
#include "stunet/core/error.hpp"
#include "stunet/cuda/check.cuh"

namespace stunet::cuda {

/// Largest device index the context keeps a stream for.
inline constexpr int kMaxDevices = 64;

/// Makes `device` current for the lifetime of the guard, then restores the
/// previous one (a no-op when it already is current).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    STUNET_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) STUNET_CUDA_CHECK(cudaSetDevice(device));
    else previous_ = -1;
  }
  ~DeviceGuard() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

/// The context's stream of `device`: created once (non-blocking, so that it
/// does not serialise with other libraries' work on the legacy stream) and
/// used by every stunet kernel, copy and allocation on that device. Work on
/// one stream runs in order, which is all the ops rely on.
inline cudaStream_t stream(int device) {
  STUNET_CHECK(device >= 0 && device < kMaxDevices, "cuda::stream: device index {} out of range [0, {})", device,
               kMaxDevices);
  static cudaStream_t streams[kMaxDevices] = {};
  static std::once_flag once[kMaxDevices];
  std::call_once(once[device], [device] {
    DeviceGuard guard(device);
    STUNET_CUDA_CHECK(cudaStreamCreateWithFlags(&streams[device], cudaStreamNonBlocking));
  });
  return streams[device];
}

/// Waits for everything queued on the context's stream of `device`.
inline void synchronize(int device) { STUNET_CUDA_CHECK(cudaStreamSynchronize(stream(device))); }

/// Accumulation type: float for float and the 16-bit types, double for double.
template <class T> using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// Calls f.template operator()<T>() with T the CUDA element type of a float
/// dtype: float, double, __half or __nv_bfloat16.
template <class F> decltype(auto) dispatch_cuda_float(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::f32: return f.template operator()<float>();
    case DType::f64: return f.template operator()<double>();
    case DType::f16: return f.template operator()<__half>();
    case DType::bf16: return f.template operator()<__nv_bfloat16>();
    default: break;
  }
  STUNET_FAIL("{}: CUDA kernels compute in float32, float64, float16 or bfloat16, not {}", op, t);
}

/// Like dispatch_cuda_float, plus the integer dtypes (copies, fills, labels).
template <class F> decltype(auto) dispatch_cuda_all(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::i64: return f.template operator()<std::int64_t>();
    case DType::i32: return f.template operator()<std::int32_t>();
    case DType::u8: return f.template operator()<std::uint8_t>();
    default: return dispatch_cuda_float(t, op, static_cast<F&&>(f));
  }
}

/// Element conversions that work for every element type on host and device
/// (__half and __nv_bfloat16 have no implicit conversions to double or integers).
template <class A, class T> __host__ __device__ inline A load_as(T v) {
  if constexpr (std::is_same_v<T, __half>) return static_cast<A>(__half2float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return static_cast<A>(__bfloat162float(v));
  else return static_cast<A>(v);
}
template <class T, class A> __host__ __device__ inline T store_as(A v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  else return static_cast<T>(v);
}

/// Threads per block of the elementwise kernels.
inline constexpr int kBlock = 256;

/// Blocks for a grid-stride loop over n elements: enough to fill the GPU
/// several times over, never more than the grid limit.
inline unsigned grid_for(std::int64_t n, int block = kBlock) {
  const std::int64_t blocks = (n + block - 1) / block;
  constexpr std::int64_t kMaxBlocks = 65535LL * 32;  // far below 2^31-1, plenty for grid-stride loops
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace stunet::cuda
