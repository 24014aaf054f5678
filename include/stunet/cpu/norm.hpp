#pragma once
/// \file
/// CPU kernels for instance normalisation over dense [planes, S] buffers,
/// where a plane is one (sample, channel) pair and S the spatial size.
///
/// Work is split into fixed-size chunks of a plane rather than whole planes,
/// so that a few large planes (batch 1, a 128^3 volume) still use every
/// thread, and partial sums are combined in chunk order so that results do
/// not depend on the thread count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "stunet/core/parallel.hpp"

namespace stunet::cpu {

namespace detail {
/// Elements per work item: large enough to amortise scheduling, small enough
/// to balance 2M-voxel planes over many threads.
inline constexpr std::int64_t kNormChunk = 16384;

inline std::int64_t norm_chunks(std::int64_t S) { return S == 0 ? 0 : (S + kNormChunk - 1) / kNormChunk; }
}  // namespace detail

/// Per-plane mean and 1 / sqrt(biased variance + eps), computed in double
/// with two passes (a single-pass E[x^2] - E[x]^2 in float loses the variance
/// of offset data). x: [planes, S]; mean, rstd: [planes].
template <class T>
void instance_norm_stats(const T* x, std::int64_t planes, std::int64_t S, double eps, double* mean, double* rstd) {
  const std::int64_t nch = detail::norm_chunks(S);
  const std::int64_t items = planes * nch;
  std::vector<double> partial(static_cast<std::size_t>(items));

  STUNET_OMP(parallel for schedule(static) if (planes * S > 32768))
  for (std::int64_t t = 0; t < items; ++t) {
    const std::int64_t p = t / nch, k = t % nch;
    const T* row = x + p * S;
    const std::int64_t b = k * detail::kNormChunk, e = std::min(S, b + detail::kNormChunk);
    double s = 0.0;
    STUNET_OMP(simd reduction(+ : s))
    for (std::int64_t i = b; i < e; ++i) s += static_cast<double>(row[i]);
    partial[static_cast<std::size_t>(t)] = s;
  }
  for (std::int64_t p = 0; p < planes; ++p) {
    double s = 0.0;
    for (std::int64_t k = 0; k < nch; ++k) s += partial[static_cast<std::size_t>(p * nch + k)];
    mean[p] = s / static_cast<double>(S);
  }

  STUNET_OMP(parallel for schedule(static) if (planes * S > 32768))
  for (std::int64_t t = 0; t < items; ++t) {
    const std::int64_t p = t / nch, k = t % nch;
    const T* row = x + p * S;
    const double m = mean[p];
    const std::int64_t b = k * detail::kNormChunk, e = std::min(S, b + detail::kNormChunk);
    double s = 0.0;
    STUNET_OMP(simd reduction(+ : s))
    for (std::int64_t i = b; i < e; ++i) {
      const double d = static_cast<double>(row[i]) - m;
      s += d * d;
    }
    partial[static_cast<std::size_t>(t)] = s;
  }
  for (std::int64_t p = 0; p < planes; ++p) {
    double s = 0.0;
    for (std::int64_t k = 0; k < nch; ++k) s += partial[static_cast<std::size_t>(p * nch + k)];
    rstd[p] = 1.0 / std::sqrt(s / static_cast<double>(S) + eps);
  }
}

/// y = (x - mean) * rstd * weight[c] + bias[c] for plane p = n * C + c.
/// weight / bias may be null (1 / 0). x, y: [planes, S] with planes = N * C.
template <class T>
void instance_norm_forward(const T* x, const double* mean, const double* rstd, const T* weight, const T* bias, T* y,
                           std::int64_t planes, std::int64_t C, std::int64_t S) {
  const std::int64_t nch = detail::norm_chunks(S);
  const std::int64_t items = planes * nch;
  STUNET_OMP(parallel for schedule(static) if (planes * S > 32768))
  for (std::int64_t t = 0; t < items; ++t) {
    const std::int64_t p = t / nch, k = t % nch, c = p % C;
    // In double: with |mean| >> std (CT intensities), a mean rounded to
    // float, or a folded shift x * a + (b - mean * a), loses most digits.
    const double m = mean[p];
    const double a = rstd[p] * (weight ? static_cast<double>(weight[c]) : 1.0);
    const double sh = bias ? static_cast<double>(bias[c]) : 0.0;
    const T* xr = x + p * S;
    T* yr = y + p * S;
    const std::int64_t b = k * detail::kNormChunk, e = std::min(S, b + detail::kNormChunk);
    STUNET_OMP(simd)
    for (std::int64_t i = b; i < e; ++i) yr[i] = static_cast<T>((static_cast<double>(xr[i]) - m) * a + sh);
  }
}

/// Per-plane sums for the backward pass, in double:
/// sum_g[p] = sum_i g, sum_gx[p] = sum_i g * xhat with xhat = (x - mean) * rstd.
/// x, g: [planes, S]; sum_g, sum_gx: [planes].
template <class T>
void instance_norm_backward_sums(const T* x, const T* g, const double* mean, const double* rstd, std::int64_t planes,
                                 std::int64_t S, double* sum_g, double* sum_gx) {
  const std::int64_t nch = detail::norm_chunks(S);
  const std::int64_t items = planes * nch;
  std::vector<double> pg(static_cast<std::size_t>(items)), pgx(static_cast<std::size_t>(items));
  STUNET_OMP(parallel for schedule(static) if (planes * S > 32768))
  for (std::int64_t t = 0; t < items; ++t) {
    const std::int64_t p = t / nch, k = t % nch;
    const T* xr = x + p * S;
    const T* gr = g + p * S;
    const double m = mean[p];
    const std::int64_t b = k * detail::kNormChunk, e = std::min(S, b + detail::kNormChunk);
    double sg = 0.0, sgx = 0.0;
    STUNET_OMP(simd reduction(+ : sg, sgx))
    for (std::int64_t i = b; i < e; ++i) {
      const double gi = static_cast<double>(gr[i]);
      sg += gi;
      sgx += gi * (static_cast<double>(xr[i]) - m);
    }
    pg[static_cast<std::size_t>(t)] = sg;
    pgx[static_cast<std::size_t>(t)] = sgx;
  }
  for (std::int64_t p = 0; p < planes; ++p) {
    double sg = 0.0, sgx = 0.0;
    for (std::int64_t k = 0; k < nch; ++k) {
      sg += pg[static_cast<std::size_t>(p * nch + k)];
      sgx += pgx[static_cast<std::size_t>(p * nch + k)];
    }
    sum_g[p] = sg;
    sum_gx[p] = sgx * rstd[p];
  }
}

/// dx = rstd * w * (g - mean(g) - xhat * mean(g * xhat)) per plane, given the
/// sums of instance_norm_backward_sums. weight may be null (1).
/// x, g, dx: [planes, S] with planes = N * C.
template <class T>
void instance_norm_backward_input(const T* x, const T* g, const double* mean, const double* rstd, const T* weight,
                                  const double* sum_g, const double* sum_gx, T* dx, std::int64_t planes,
                                  std::int64_t C, std::int64_t S) {
  const std::int64_t nch = detail::norm_chunks(S);
  const std::int64_t items = planes * nch;
  const double invS = 1.0 / static_cast<double>(S);
  STUNET_OMP(parallel for schedule(static) if (planes * S > 32768))
  for (std::int64_t t = 0; t < items; ++t) {
    const std::int64_t p = t / nch, k = t % nch, c = p % C;
    const double r = rstd[p];
    const double a = r * (weight ? static_cast<double>(weight[c]) : 1.0);
    const double mg = sum_g[p] * invS;
    const double cx = sum_gx[p] * invS * r;  // mean(g * xhat) * rstd
    const double m = mean[p];
    const T* xr = x + p * S;
    const T* gr = g + p * S;
    T* dr = dx + p * S;
    const std::int64_t b = k * detail::kNormChunk, e = std::min(S, b + detail::kNormChunk);
    STUNET_OMP(simd)
    for (std::int64_t i = b; i < e; ++i)
      dr[i] = static_cast<T>(a * (static_cast<double>(gr[i]) - mg - (static_cast<double>(xr[i]) - m) * cx));
  }
}

}  // namespace stunet::cpu
