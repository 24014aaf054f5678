#pragma once
/// \file
/// CPU kernels for nearest-neighbour upsampling by integer factors on dense
/// [planes, D, H, W] buffers (planes = N * C).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "stunet/core/parallel.hpp"

namespace stunet::cpu {

/// y[p, od, oh, ow] = x[p, od / fd, oh / fh, ow / fw] with y: [planes, D*fd,
/// H*fh, W*fw]. Each input row is expanded once and the result copied to the
/// fd * fh output rows it feeds.
template <class T>
void upsample_nearest(const T* x, T* y, std::int64_t planes, std::int64_t D, std::int64_t H, std::int64_t W,
                      std::int64_t fd, std::int64_t fh, std::int64_t fw) {
  const std::int64_t OH = H * fh, OW = W * fw;
  const std::int64_t slices = planes * D;
  if (slices * H * W == 0) return;
  STUNET_OMP(parallel for schedule(static) if (slices * H * W > 32768))
  for (std::int64_t s = 0; s < slices; ++s) {
    const std::int64_t p = s / D, id = s % D;
    const T* xs = x + s * H * W;
    T* ys = y + (p * D * fd + id * fd) * OH * OW;
    for (std::int64_t ih = 0; ih < H; ++ih) {
      const T* xr = xs + ih * W;
      T* first = ys + ih * fh * OW;
      for (std::int64_t iw = 0; iw < W; ++iw)
        for (std::int64_t k = 0; k < fw; ++k) first[iw * fw + k] = xr[iw];
      for (std::int64_t k = 1; k < fh; ++k) std::memcpy(first + k * OW, first, static_cast<std::size_t>(OW) * sizeof(T));
    }
    for (std::int64_t k = 1; k < fd; ++k)
      std::memcpy(ys + k * OH * OW, ys, static_cast<std::size_t>(OH * OW) * sizeof(T));
  }
}

/// dx[p, id, ih, iw] = sum of g over the fd x fh x fw block that
/// upsample_nearest filled from that voxel. g: [planes, D*fd, H*fh, W*fw].
template <class T>
void upsample_nearest_backward(const T* g, T* dx, std::int64_t planes, std::int64_t D, std::int64_t H,
                               std::int64_t W, std::int64_t fd, std::int64_t fh, std::int64_t fw) {
  const std::int64_t OH = H * fh, OW = W * fw;
  const std::int64_t slices = planes * D;
  if (slices * H * W == 0) return;
  STUNET_OMP(parallel for schedule(static) if (slices * H * W > 32768))
  for (std::int64_t s = 0; s < slices; ++s) {
    const std::int64_t p = s / D, id = s % D;
    T* ds = dx + s * H * W;
    const T* gs = g + (p * D * fd + id * fd) * OH * OW;
    std::fill(ds, ds + H * W, T(0));
    for (std::int64_t a = 0; a < fd; ++a)
      for (std::int64_t ih = 0; ih < H; ++ih) {
        T* dr = ds + ih * W;
        for (std::int64_t b = 0; b < fh; ++b) {
          const T* gr = gs + a * OH * OW + (ih * fh + b) * OW;
          for (std::int64_t iw = 0; iw < W; ++iw) {
            T acc = dr[iw];
            for (std::int64_t k = 0; k < fw; ++k) acc += gr[iw * fw + k];
            dr[iw] = acc;
          }
        }
      }
  }
}

}  // namespace stunet::cpu
