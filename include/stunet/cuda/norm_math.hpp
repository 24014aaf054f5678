#pragma once
/// \file
/// Work split and per-element math of the instance-norm kernels (norm.cuh),
/// shared with the host tests (tests/kernel_math/test_norm_math.cpp). No CUDA
/// headers: these functions see the accumulation type A (float; double for
/// double) and indices.
///
/// The split, fixed by the plane size S alone (never by the device or the
/// data's alignment), makes every result bit-reproducible:
/// - a plane (one (n, c) pair) is cut into chunks of kNormChunk elements; one
///   block of kNormThreads threads per (plane, chunk), so that 32 planes of
///   2M voxels and 1024 planes of 64 voxels both give enough blocks;
/// - within a chunk, elements go in groups of kNormVec<T> (16 bytes) counted
///   from the plane's start; thread t takes groups t, t + kNormThreads, ...
///   and adds its elements in increasing order (a group is one 16-byte load
///   when the plane is 16-byte aligned, element loads otherwise: same order);
/// - a block's thread sums meet in CUB's fixed tree, giving partial[plane,
///   chunk]; a per-plane pass adds the partials in the same way (thread t:
///   chunks t, t + kNormThreads, ... in order, then the tree).

#include <cmath>
#include <cstdint>

#include "stunet/core/host_device.hpp"

namespace stunet::cuda {

/// Threads per block of every instance-norm kernel.
inline constexpr int kNormThreads = 256;
/// Elements of one plane per block: 32 per thread; a 128^3 plane is 256 chunks.
inline constexpr std::int64_t kNormChunk = 8192;
/// Elements per 16-byte group: 4 floats, 2 doubles, 8 halves.
template <class T> inline constexpr int kNormVec = static_cast<int>(16 / sizeof(T));

/// Chunks of a plane of S elements (0 for an empty plane).
STUNET_HOST_DEVICE inline std::int64_t norm_chunks(std::int64_t S) {
  return S == 0 ? 0 : (S + kNormChunk - 1) / kNormChunk;
}
/// First element of chunk k.
STUNET_HOST_DEVICE inline std::int64_t norm_chunk_begin(std::int64_t k) { return k * kNormChunk; }
/// One past the last element of chunk k of a plane of S elements.
STUNET_HOST_DEVICE inline std::int64_t norm_chunk_end(std::int64_t S, std::int64_t k) {
  const std::int64_t e = (k + 1) * kNormChunk;
  return e < S ? e : S;
}
/// Elements of the group that starts at element i0, before `end` (V at most).
STUNET_HOST_DEVICE inline int norm_group_size(std::int64_t i0, std::int64_t end, int V) {
  return end - i0 < V ? static_cast<int>(end - i0) : V;
}

/// Mean from a plane's sum.
template <class A> STUNET_HOST_DEVICE inline A norm_mean(A sum, std::int64_t S) { return sum / static_cast<A>(S); }

/// One element's term of the second (centred) pass: (x - mean)^2.
template <class A> STUNET_HOST_DEVICE inline A norm_centred_square(A x, A mean) {
  const A d = x - mean;
  return d * d;
}

/// 1 / sqrt(biased variance + eps) from the sum of centred squares.
template <class A> STUNET_HOST_DEVICE inline A norm_rstd(A sum_sq, std::int64_t S, double eps) {
  using std::sqrt;
  return A(1) / sqrt(sum_sq / static_cast<A>(S) + static_cast<A>(eps));
}

/// y = (x - mean) * scale + shift with scale = rstd * weight[c], shift = bias[c].
template <class A> STUNET_HOST_DEVICE inline A norm_forward_value(A x, A mean, A scale, A shift) {
  return (x - mean) * scale + shift;
}

/// One element's term of sum_gx before the final * rstd: g * (x - mean).
template <class A> STUNET_HOST_DEVICE inline A norm_gx_term(A g, A x, A mean) { return g * (x - mean); }

/// Per-plane coefficients of the input gradient, as cpu::instance_norm_backward_input:
/// dx = a * (g - mg - (x - mean) * cx).
template <class A> struct NormBackwardCoef {
  A a;   ///< rstd * weight[c]
  A mg;  ///< mean of g: sum_g / S
  A cx;  ///< mean(g * xhat) * rstd: sum_gx / S * rstd
};

/// The coefficients of plane p from rstd[p], weight[c] (1 without weight) and the plane's sums.
template <class A>
STUNET_HOST_DEVICE inline NormBackwardCoef<A> norm_backward_coef(A rstd, A weight, A sum_g, A sum_gx, std::int64_t S) {
  const A inv_s = A(1) / static_cast<A>(S);
  return {rstd * weight, sum_g * inv_s, sum_gx * inv_s * rstd};
}

/// One element of the input gradient.
template <class A>
STUNET_HOST_DEVICE inline A norm_backward_value(A x, A g, A mean, const NormBackwardCoef<A>& k) {
  return k.a * (g - k.mg - (x - mean) * k.cx);
}

}  // namespace stunet::cuda
