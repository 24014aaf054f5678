#pragma once
/// \file
/// Per-element math of the activation and interpolation kernels
/// (elementwise.cuh), shared with the host tests
/// (tests/kernel_math/test_elementwise_math.cpp). No CUDA headers: the
/// kernels convert storage types, these functions see the accumulation type A
/// (float, or double for double) and indices.

#include <cstdint>

#include "stunet/core/host_device.hpp"

namespace stunet::cuda {

/// LeakyReLU: x > 0 ? x : slope * x (NaN stays NaN, as on the CPU).
template <class A> STUNET_HOST_DEVICE inline A leaky_relu_value(A x, A slope) { return x > A(0) ? x : slope * x; }

/// Its backward: ref > 0 ? g : slope * g, where ref is the activation's input
/// (or its output when slope >= 0).
template <class A> STUNET_HOST_DEVICE inline A leaky_relu_grad_value(A ref, A g, A slope) {
  return ref > A(0) ? g : slope * g;
}

/// Coordinates of element i of a dense [slices, H, W] buffer, where
/// slice = plane * D + depth (the nearest-upsampling kernels' view of
/// [planes, D, H, W]).
template <class I> struct SliceCoord {
  I slice, h, w;
};

/// Decodes i into (slice, h, w): two divisions per input element.
template <class I> STUNET_HOST_DEVICE inline SliceCoord<I> slice_coord(I i, I H, I W) {
  const I q = i / W;
  const I w = i - q * W;
  const I slice = q / H;
  return {slice, q - slice * H, w};
}

/// Index in y [planes, D*sd, H*sh, W*sw] of the copy (a, b, k) (a < sd,
/// b < sh, k < sw) of input element c. The output slice of input slice
/// plane * D + d at depth offset a is (plane * D + d) * sd + a, so the plane
/// never needs decoding.
template <class I>
STUNET_HOST_DEVICE inline I upsample_out_index(const SliceCoord<I>& c, I H, I W, int sd, int sh, int sw, int a, int b,
                                               int k) {
  const I OH = H * static_cast<I>(sh), OW = W * static_cast<I>(sw);
  return ((c.slice * static_cast<I>(sd) + static_cast<I>(a)) * OH + c.h * static_cast<I>(sh) + static_cast<I>(b)) *
             OW +
         c.w * static_cast<I>(sw) + static_cast<I>(k);
}

}  // namespace stunet::cuda
