#pragma once
/// \file
/// CPU kernels for data movement: strided block copies (concat and its
/// backward) and axis reversal (flip), on dense buffers (OpenMP).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "stunet/core/parallel.hpp"

namespace stunet::cpu {

/// For o < outer: copy len elements from src + o * src_stride to
/// dst + o * dst_stride. Long blocks are split into pieces so that a concat
/// along the batch or channel axis of one sample (outer = 1) still spreads
/// over all threads.
template <class T>
void copy_blocks(const T* src, std::int64_t src_stride, T* dst, std::int64_t dst_stride, std::int64_t outer,
                 std::int64_t len) {
  constexpr std::int64_t kPiece = 32768;
  const std::int64_t pieces = len == 0 ? 0 : (len + kPiece - 1) / kPiece;
  const std::int64_t items = outer * pieces;
  STUNET_OMP(parallel for schedule(static) if (outer * len > 65536))
  for (std::int64_t t = 0; t < items; ++t) {
    const std::int64_t o = t / pieces, b = (t % pieces) * kPiece;
    const std::int64_t n = std::min(len - b, kPiece);
    std::memcpy(dst + o * dst_stride + b, src + o * src_stride + b, static_cast<std::size_t>(n) * sizeof(T));
  }
}

/// y = x reversed along every axis i with flip[i], for dense buffers of
/// shape n[0..4] (rank padded to 5 with leading extents 1).
template <class T> void flip(const T* x, T* y, const std::int64_t n[5], const bool flip[5]) {
  const std::int64_t s3 = n[4], s2 = n[3] * s3, s1 = n[2] * s2, s0 = n[1] * s1;
  const std::int64_t rows = n[0] * n[1] * n[2] * n[3];
  const std::int64_t W = n[4];
  if (rows == 0 || W == 0) return;
  STUNET_OMP(parallel for schedule(static) if (rows * W > 65536))
  for (std::int64_t r = 0; r < rows; ++r) {
    std::int64_t i3 = r % n[3], q = r / n[3];
    std::int64_t i2 = q % n[2];
    q /= n[2];
    std::int64_t i1 = q % n[1], i0 = q / n[1];
    if (flip[0]) i0 = n[0] - 1 - i0;
    if (flip[1]) i1 = n[1] - 1 - i1;
    if (flip[2]) i2 = n[2] - 1 - i2;
    if (flip[3]) i3 = n[3] - 1 - i3;
    const T* xr = x + i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3;
    T* yr = y + r * W;
    if (flip[4]) {
      for (std::int64_t e = 0; e < W; ++e) yr[e] = xr[W - 1 - e];
    } else {
      std::memcpy(yr, xr, static_cast<std::size_t>(W) * sizeof(T));
    }
  }
}

}  // namespace stunet::cpu
