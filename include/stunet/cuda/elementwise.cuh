#pragma once
/// \file
/// CUDA kernels of LeakyReLU (forward and backward) and nearest upsampling by
/// integer factors (forward and backward), the memory-bound layers between
/// STU-Net's convolutions.
///
/// LeakyReLU runs through the 16-byte map kernels of tensor_ops.cuh. The
/// upsampling kernels work per INPUT element: the forward reads it once and
/// writes its sd x sh x sw copies (a warp's threads write neighbouring runs
/// of sw outputs per row: coalesced), the backward sums that block in a fixed
/// order (a, b, k as the CPU), so it is deterministic without atomics. Index
/// decoding (two divisions per input element, shared by sd*sh*sw outputs)
/// is in elementwise_math.hpp; it runs in int32 when the sizes allow.

#include <cstdint>

#include <fmt/format.h>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/cuda/check.cuh"
#include "stunet/cuda/elementwise_math.hpp"
#include "stunet/cuda/launch.cuh"
#include "stunet/cuda/tensor_ops.cuh"

namespace stunet::cuda {

namespace elementwise_detail {

/// y = leaky_relu(x) in acc_t<T> (map1_kernel's op).
template <class T> struct LeakyReluOp {
  acc_t<T> slope;
  __device__ T operator()(T x) const {
    using A = acc_t<T>;
    return store_as<T>(leaky_relu_value<A>(load_as<A>(x), slope));
  }
};

/// dx = leaky_relu'(ref) * g in acc_t<T> (map2_kernel's op).
template <class T> struct LeakyReluGradOp {
  acc_t<T> slope;
  __device__ T operator()(T ref, T g) const {
    using A = acc_t<T>;
    return store_as<T>(leaky_relu_grad_value<A>(load_as<A>(ref), load_as<A>(g), slope));
  }
};

/// y [slices*sd, H*sh, W*sw] from x [slices, H, W]: one thread per input element.
template <class T, class I>
__global__ void __launch_bounds__(kBlock)
    upsample_nearest_kernel(const T* __restrict__ x, T* __restrict__ y, I total, I H, I W, int sd, int sh, int sw) {
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I i = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); i < total;
       i += stride) {
    const T v = x[i];
    const SliceCoord<I> c = slice_coord<I>(i, H, W);
    for (int a = 0; a < sd; ++a)
      for (int b = 0; b < sh; ++b) {
        T* row = y + upsample_out_index<I>(c, H, W, sd, sh, sw, a, b, 0);
        for (int k = 0; k < sw; ++k) row[k] = v;
      }
  }
}

/// dx [slices, H, W] = the sum of g over each input element's sd x sh x sw
/// block, accumulated in acc_t in the order a, b, k.
template <class T, class I>
__global__ void __launch_bounds__(kBlock) upsample_nearest_backward_kernel(const T* __restrict__ g,
                                                                           T* __restrict__ dx, I total, I H, I W,
                                                                           int sd, int sh, int sw) {
  using A = acc_t<T>;
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I i = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); i < total;
       i += stride) {
    const SliceCoord<I> c = slice_coord<I>(i, H, W);
    A acc = A(0);
    for (int a = 0; a < sd; ++a)
      for (int b = 0; b < sh; ++b) {
        const T* row = g + upsample_out_index<I>(c, H, W, sd, sh, sw, a, b, 0);
        for (int k = 0; k < sw; ++k) acc += load_as<A>(row[k]);
      }
    dx[i] = store_as<T>(acc);
  }
}

/// Shared launcher: int32 indices when the OUTPUT (the larger side) fits.
template <bool Backward>
void upsample_launch(DType dtype, const void* in, void* out, std::int64_t planes, std::int64_t D, std::int64_t H,
                     std::int64_t W, int sd, int sh, int sw, int device, const char* name) {
  STUNET_CHECK(sd >= 1 && sh >= 1 && sw >= 1, "{}: scale factors ({}, {}, {}) must be positive", name, sd, sh, sw);
  const std::int64_t total = planes * D * H * W;
  if (total <= 0) return;
  const std::int64_t out_total = total * sd * sh * sw;
  DeviceGuard guard(device);
  const cudaStream_t s = stream(device);
  const unsigned grid = grid_for(total);
  dispatch_cuda_float(dtype, name, [&]<class T>() {
    auto go = [&]<class I>() {
      const T* src = static_cast<const T*>(in);
      T* dst = static_cast<T*>(out);
      if constexpr (Backward)
        upsample_nearest_backward_kernel<T, I><<<grid, kBlock, 0, s>>>(
            src, dst, static_cast<I>(total), static_cast<I>(H), static_cast<I>(W), sd, sh, sw);
      else
        upsample_nearest_kernel<T, I><<<grid, kBlock, 0, s>>>(src, dst, static_cast<I>(total), static_cast<I>(H),
                                                              static_cast<I>(W), sd, sh, sw);
    };
    if (tensor_ops_detail::index_fits_int32(out_total)) go.template operator()<std::int32_t>();
    else go.template operator()<std::int64_t>();
  });
  STUNET_CUDA_CHECK_LAUNCH(
      fmt::format("{} {} [{}, {}, {}, {}] x ({}, {}, {})", name, dtype, planes, D, H, W, sd, sh, sw).c_str());
}

}  // namespace elementwise_detail

/// y[i] = x[i] > 0 ? x[i] : slope * x[i], i < n (dense buffers); y may be x.
inline void leaky_relu(DType dtype, const void* x, void* y, double slope, std::int64_t n, int device) {
  DeviceGuard guard(device);
  dispatch_cuda_float(dtype, "leaky_relu", [&]<class T>() {
    tensor_ops_detail::launch_map1(static_cast<const T*>(x), static_cast<T*>(y), n,
                                   elementwise_detail::LeakyReluOp<T>{static_cast<acc_t<T>>(slope)}, device,
                                   "leaky_relu");
  });
}

/// dx[i] = ref[i] > 0 ? g[i] : slope * g[i], i < n; dx may be g.
inline void leaky_relu_backward(DType dtype, const void* ref, const void* g, void* dx, double slope, std::int64_t n,
                                int device) {
  DeviceGuard guard(device);
  dispatch_cuda_float(dtype, "leaky_relu_backward", [&]<class T>() {
    tensor_ops_detail::launch_map2(static_cast<const T*>(ref), static_cast<const T*>(g), static_cast<T*>(dx), n,
                                   elementwise_detail::LeakyReluGradOp<T>{static_cast<acc_t<T>>(slope)}, device,
                                   "leaky_relu_backward");
  });
}

/// y [planes, D*sd, H*sh, W*sw] = x [planes, D, H, W] repeated sd x sh x sw times (dense buffers).
inline void upsample_nearest(DType dtype, const void* x, void* y, std::int64_t planes, std::int64_t D, std::int64_t H,
                             std::int64_t W, int sd, int sh, int sw, int device) {
  elementwise_detail::upsample_launch<false>(dtype, x, y, planes, D, H, W, sd, sh, sw, device, "upsample_nearest");
}

/// dx [planes, D, H, W] = sum of g [planes, D*sd, H*sh, W*sw] over each sd x sh x sw block (deterministic).
inline void upsample_nearest_backward(DType dtype, const void* g, void* dx, std::int64_t planes, std::int64_t D,
                                      std::int64_t H, std::int64_t W, int sd, int sh, int sw, int device) {
  elementwise_detail::upsample_launch<true>(dtype, g, dx, planes, D, H, W, sd, sh, sw, device,
                                            "upsample_nearest_backward");
}

/// Installs this family's entries in the kernel table.
inline void register_elementwise(CudaKernels& t) {
  t.leaky_relu = &leaky_relu;
  t.leaky_relu_backward = &leaky_relu_backward;
  t.upsample_nearest = &upsample_nearest;
  t.upsample_nearest_backward = &upsample_nearest_backward;
}

}  // namespace stunet::cuda
