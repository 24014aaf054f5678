#pragma once
/// \file
/// CPU kernels for softmax along one axis of a dense buffer viewed as
/// [outer, C, inner] (OpenMP).
///
/// The softmax axis of a segmentation map is the channel axis, whose elements
/// lie `inner` (= voxels per image) apart. Walking one voxel at a time down
/// that axis would touch C cache lines per voxel, so the kernels work on
/// blocks of consecutive voxels and sweep the channels row by row, keeping the
/// per-voxel max and sum in small arrays: every pass reads memory sequentially
/// and vectorises across voxels.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "stunet/core/parallel.hpp"

namespace stunet::cpu {

/// Voxels per block: the per-voxel scratch (two arrays of this length) stays
/// in L1.
inline constexpr std::int64_t kSoftmaxBlock = 256;

/// y = softmax(x) along the middle axis of [outer, C, inner], subtracting the
/// per-position max first so that exp never overflows. C >= 1.
template <class T> void softmax_forward(const T* x, T* y, std::int64_t outer, std::int64_t C, std::int64_t inner) {
  const std::int64_t blocks = (inner + kSoftmaxBlock - 1) / kSoftmaxBlock;
  const std::int64_t tasks = outer * blocks;
  STUNET_OMP(parallel for schedule(static) if (outer * C * inner > 32768))
  for (std::int64_t t = 0; t < tasks; ++t) {
    const std::int64_t o = t / blocks;
    const std::int64_t i0 = (t % blocks) * kSoftmaxBlock;
    const std::int64_t len = std::min(kSoftmaxBlock, inner - i0);
    const T* xb = x + o * C * inner + i0;
    T* yb = y + o * C * inner + i0;
    T m[kSoftmaxBlock], s[kSoftmaxBlock];
    for (std::int64_t j = 0; j < len; ++j) m[j] = xb[j];
    for (std::int64_t c = 1; c < C; ++c)
      for (std::int64_t j = 0; j < len; ++j) m[j] = std::max(m[j], xb[c * inner + j]);
    for (std::int64_t j = 0; j < len; ++j) s[j] = T(0);
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t j = 0; j < len; ++j) {
        const T e = std::exp(xb[c * inner + j] - m[j]);
        yb[c * inner + j] = e;
        s[j] += e;
      }
    for (std::int64_t j = 0; j < len; ++j) s[j] = T(1) / s[j];
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t j = 0; j < len; ++j) yb[c * inner + j] *= s[j];
  }
}

/// dx = y * (g - sum_c g*y) along the middle axis of [outer, C, inner]: the
/// softmax Jacobian (diag(y) - y y^T) applied to g, from the saved output y.
template <class T>
void softmax_backward(const T* y, const T* g, T* dx, std::int64_t outer, std::int64_t C, std::int64_t inner) {
  const std::int64_t blocks = (inner + kSoftmaxBlock - 1) / kSoftmaxBlock;
  const std::int64_t tasks = outer * blocks;
  STUNET_OMP(parallel for schedule(static) if (outer * C * inner > 32768))
  for (std::int64_t t = 0; t < tasks; ++t) {
    const std::int64_t o = t / blocks;
    const std::int64_t i0 = (t % blocks) * kSoftmaxBlock;
    const std::int64_t len = std::min(kSoftmaxBlock, inner - i0);
    const std::int64_t base = o * C * inner + i0;
    T dot[kSoftmaxBlock];
    for (std::int64_t j = 0; j < len; ++j) dot[j] = T(0);
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t j = 0; j < len; ++j) dot[j] += g[base + c * inner + j] * y[base + c * inner + j];
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t j = 0; j < len; ++j) {
        const std::int64_t k = base + c * inner + j;
        dx[k] = y[k] * (g[k] - dot[j]);
      }
  }
}

}  // namespace stunet::cpu
