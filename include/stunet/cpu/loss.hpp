#pragma once
/// \file
/// CPU kernels for the segmentation losses (OpenMP): label validation, fused
/// log-sum-exp cross-entropy, and the per-(image, class) sums of soft Dice.
///
/// Buffers are dense: scores as [N, C, V] (V = voxels per image), class
/// labels as int32 [N, V].

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "stunet/core/dtype.hpp"
#include "stunet/core/parallel.hpp"
#include "stunet/cpu/softmax.hpp"

namespace stunet::cpu {

/// out[i] = t[i] as a class index, i < n. Returns the smallest i whose value
/// is not an integer in [0, classes) (NaN included), or -1 when all are valid.
/// Float label maps are accepted because nnU-Net keeps targets as floats and
/// casts them with .long() inside the loss.
template <class L>
std::int64_t class_labels(const L* t, std::int32_t* out, std::int64_t n, std::int64_t classes) {
  std::int64_t first_bad = n;
  STUNET_OMP(parallel for reduction(min : first_bad) schedule(static) if (n > 65536))
  for (std::int64_t i = 0; i < n; ++i) {
    bool ok;
    std::int64_t label = 0;
    if constexpr (std::is_integral_v<L>) {
      label = static_cast<std::int64_t>(t[i]);
      ok = label >= 0 && label < classes;
    } else {
      const double v = to_double(t[i]);
      // Written so that NaN fails every comparison and lands in the error.
      ok = v >= 0.0 && v < static_cast<double>(classes) && v == std::floor(v);
      if (ok) label = static_cast<std::int64_t>(v);
    }
    out[i] = ok ? static_cast<std::int32_t>(label) : 0;
    if (!ok) first_bad = std::min(first_bad, i);
  }
  return first_bad < n ? first_bad : -1;
}

/// Sum over all (n, v) of -log softmax(x[n, :, v])[labels[n, v]], accumulated
/// in double, as lse - x[label] with lse = max + log(sum exp(x - max)).
/// Stores lse[n, v] so that the backward pass gets softmax = exp(x - lse)
/// without a second reduction.
template <class T>
double cross_entropy_forward(const T* x, const std::int32_t* labels, T* lse, std::int64_t N, std::int64_t C,
                             std::int64_t V) {
  const std::int64_t blocks = (V + kSoftmaxBlock - 1) / kSoftmaxBlock;
  const std::int64_t tasks = N * blocks;
  double total = 0.0;
  STUNET_OMP(parallel for reduction(+ : total) schedule(static) if (N * C * V > 32768))
  for (std::int64_t t = 0; t < tasks; ++t) {
    const std::int64_t n = t / blocks;
    const std::int64_t v0 = (t % blocks) * kSoftmaxBlock;
    const std::int64_t len = std::min(kSoftmaxBlock, V - v0);
    const T* xb = x + n * C * V + v0;
    const std::int32_t* lb = labels + n * V + v0;
    T* ob = lse + n * V + v0;
    T m[kSoftmaxBlock], s[kSoftmaxBlock];
    for (std::int64_t j = 0; j < len; ++j) m[j] = xb[j];
    for (std::int64_t c = 1; c < C; ++c)
      for (std::int64_t j = 0; j < len; ++j) m[j] = std::max(m[j], xb[c * V + j]);
    for (std::int64_t j = 0; j < len; ++j) s[j] = T(0);
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t j = 0; j < len; ++j) s[j] += std::exp(xb[c * V + j] - m[j]);
    double block = 0.0;
    for (std::int64_t j = 0; j < len; ++j) {
      ob[j] = m[j] + std::log(s[j]);
      block += static_cast<double>(ob[j]) - static_cast<double>(xb[lb[j] * V + j]);
    }
    total += block;
  }
  return total;
}

/// dx[n, c, v] = (exp(x - lse[n, v]) - [c == labels[n, v]]) * factor, where
/// factor = upstream gradient / (N * V) for the mean reduction.
template <class T>
void cross_entropy_backward(const T* x, const std::int32_t* labels, const T* lse, T* dx, std::int64_t N,
                            std::int64_t C, std::int64_t V, T factor) {
  STUNET_OMP(parallel if (N * C * V > 32768))
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c) {
      const std::int64_t row = (n * C + c) * V;
      const std::int32_t* lb = labels + n * V;
      const T* ln = lse + n * V;
      // Every thread walks the rows and takes its share of each row's voxels.
      STUNET_OMP(for simd schedule(static) nowait)
      for (std::int64_t v = 0; v < V; ++v) {
        const T onehot = lb[v] == c ? T(1) : T(0);
        dx[row + v] = (std::exp(x[row + v] - ln[v]) - onehot) * factor;
      }
    }
}

/// Per-(n, c) sums of soft Dice for channels c >= c_begin, in double:
/// intersect[n*C + c] = sum_v p * [label == c], sum_pred = sum_v p,
/// sum_gt = sum_v [label == c]. Rows with c < c_begin are left untouched.
template <class T>
void dice_sums(const T* p, const std::int32_t* labels, std::int64_t N, std::int64_t C, std::int64_t V,
               std::int64_t c_begin, double* intersect, double* sum_pred, double* sum_gt) {
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = c_begin; c < C; ++c) {
      const T* row = p + (n * C + c) * V;
      const std::int32_t* lb = labels + n * V;
      const std::int32_t cls = static_cast<std::int32_t>(c);
      double inter = 0.0, pred = 0.0, gt = 0.0;
      STUNET_OMP(parallel for reduction(+ : inter, pred, gt) schedule(static) if (V > 65536))
      for (std::int64_t v = 0; v < V; ++v) {
        const double pv = static_cast<double>(row[v]);
        const double hit = lb[v] == cls ? 1.0 : 0.0;
        pred += pv;
        inter += pv * hit;
        gt += hit;
      }
      intersect[n * C + c] = inter;
      sum_pred[n * C + c] = pred;
      sum_gt[n * C + c] = gt;
    }
}

/// dx[n, c, v] = a[n*C + c] * [labels[n, v] == c] + b[n*C + c]: the gradient
/// of a loss that depends on p only through the Dice sums, with a = dL/d
/// intersect and b = dL/d sum_pred of the row's group.
template <class T>
void dice_backward(const std::int32_t* labels, T* dx, std::int64_t N, std::int64_t C, std::int64_t V,
                   const double* a, const double* b) {
  STUNET_OMP(parallel if (N * C * V > 32768))
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c) {
      T* row = dx + (n * C + c) * V;
      const std::int32_t* lb = labels + n * V;
      const std::int32_t cls = static_cast<std::int32_t>(c);
      const T hit = static_cast<T>(a[n * C + c] + b[n * C + c]);
      const T miss = static_cast<T>(b[n * C + c]);
      STUNET_OMP(for simd schedule(static) nowait)
      for (std::int64_t v = 0; v < V; ++v) row[v] = lb[v] == cls ? hit : miss;
    }
}

}  // namespace stunet::cpu
