#pragma once
/// \file
/// Per-thread bodies of the loss kernels (cuda/loss.cuh): softmax columns,
/// label checks, the cross-entropy voxel term, the soft Dice accumulation and
/// the elementwise backward formulas, plus the fixed geometry of the
/// deterministic reductions. Plain C++ (no CUDA headers) so that the host test
/// tests/kernel_math/test_loss_math.cpp runs exactly this code over the whole
/// index space, in the kernels' order, against the CPU ops (cpu/softmax.hpp,
/// cpu/loss.hpp).
///
/// Element types: T is float, double, or on the device __half /
/// __nv_bfloat16 (host stunet::f16 / bf16 work too); A = accum_t<T> is the
/// arithmetic type. Conversions go through static_cast<A>(v) and
/// static_cast<T>(a) only, which every one of those types supports.
///
/// Layouts are the CPU ops': scores [N, C, V] (V voxels per image), labels
/// int32 [N, V], softmax input [outer, C, inner].

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "stunet/core/host_device.hpp"

namespace stunet::cuda::loss_math {

/// Arithmetic type of element type T: double for double, float otherwise
/// (the 16-bit types only round what is stored).
template <class T> using accum_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// A double as element type T; through float for the 16-bit types, which
/// have no conversion from double on every toolkit.
template <class T> STUNET_HOST_DEVICE inline T narrow(double v) {
  if constexpr (std::is_arithmetic_v<T>) return static_cast<T>(v);
  else return static_cast<T>(static_cast<float>(v));
}

// ---- softmax: one thread per column (o, i) ----------------------------------

/// Offset of column `col` = o * inner + i of [outer, C, inner]: element c of
/// the column is at base + c * inner. Consecutive threads take consecutive i,
/// so every channel's loads are coalesced.
STUNET_HOST_DEVICE inline std::int64_t column_base(std::int64_t col, std::int64_t C, std::int64_t inner) {
  const std::int64_t o = col / inner;
  return o * C * inner + (col - o * inner);
}

/// Running max m and sum s = sum_c exp(x_c - m) over one column in a single
/// pass ("online softmax": when a larger value arrives the sum is rescaled),
/// so forward passes read x twice instead of three times. C >= 1. NaN inputs
/// fail the comparison and propagate through the sum, as on the CPU.
template <class A, class T>
STUNET_HOST_DEVICE inline void column_max_sumexp(const T* x, std::int64_t C, std::int64_t stride, A& m_out,
                                                 A& s_out) {
  A m = static_cast<A>(x[0]);
  A s = A(1);
  for (std::int64_t c = 1; c < C; ++c) {
    const A v = static_cast<A>(x[c * stride]);
    if (v > m) {
      s = s * std::exp(m - v) + A(1);
      m = v;
    } else {
      s += std::exp(v - m);
    }
  }
  m_out = m;
  s_out = s;
}

/// y = softmax(x) over one column (x, y point at its first element).
template <class A, class T>
STUNET_HOST_DEVICE inline void softmax_forward_column(const T* x, T* y, std::int64_t C, std::int64_t stride) {
  A m, s;
  column_max_sumexp<A>(x, C, stride, m, s);
  const A inv = A(1) / s;  // one division per column, as the CPU kernel
  for (std::int64_t c = 0; c < C; ++c)
    y[c * stride] = static_cast<T>(std::exp(static_cast<A>(x[c * stride]) - m) * inv);
}

/// dx = y * (g - sum_c g * y) over one column.
template <class A, class T>
STUNET_HOST_DEVICE inline void softmax_backward_column(const T* y, const T* g, T* dx, std::int64_t C,
                                                       std::int64_t stride) {
  A dot = A(0);
  for (std::int64_t c = 0; c < C; ++c) dot += static_cast<A>(g[c * stride]) * static_cast<A>(y[c * stride]);
  for (std::int64_t c = 0; c < C; ++c)
    dx[c * stride] = static_cast<T>(static_cast<A>(y[c * stride]) * (static_cast<A>(g[c * stride]) - dot));
}

// ---- class labels ---------------------------------------------------------------

/// A label value as double (through float for the 16-bit types).
template <class L> STUNET_HOST_DEVICE inline double label_as_double(L v) {
  if constexpr (std::is_arithmetic_v<L>) return static_cast<double>(v);
  else return static_cast<double>(static_cast<float>(v));
}

/// out = v as a class index; false (out = 0) when v is not an integer in
/// [0, classes), NaN included: cpu::class_labels' test for one element.
template <class L> STUNET_HOST_DEVICE inline bool class_label(L v, std::int64_t classes, std::int32_t& out) {
  bool ok;
  std::int64_t label = 0;
  if constexpr (std::is_integral_v<L>) {
    label = static_cast<std::int64_t>(v);
    ok = label >= 0 && label < classes;
  } else {
    const double d = label_as_double(v);
    // Written so that NaN fails every comparison.
    ok = d >= 0.0 && d < static_cast<double>(classes) && d == std::floor(d);
    if (ok) label = static_cast<std::int64_t>(d);
  }
  out = ok ? static_cast<std::int32_t>(label) : 0;
  return ok;
}

// ---- deterministic reductions ---------------------------------------------------
//
// Every reduction has a fixed shape that depends only on the problem size
// (never on the GPU): each thread sums its elements in order in double, the
// block folds its threads' sums with the halving tree of tree_add, and a
// second kernel adds the block partials of each output in index order. The
// same inputs therefore give the same bits on every run and every GPU.

/// Threads per block of the reduction kernels (a power of two: the tree).
inline constexpr int kReduceThreads = 256;
/// Upper bound on the blocks of the cross-entropy reduction (its second pass
/// is one thread adding this many partials).
inline constexpr std::int64_t kMaxReduceBlocks = 1024;
/// Voxels per Dice chunk below which a row is not split further, and the most
/// chunks per row.
inline constexpr std::int64_t kDiceChunkVoxels = 8192;
inline constexpr std::int64_t kMaxDiceChunks = 64;

/// Blocks of a grid-stride reduction over `count` items.
STUNET_HOST_DEVICE inline std::int64_t reduce_blocks(std::int64_t count) {
  const std::int64_t b = (count + kReduceThreads - 1) / kReduceThreads;
  return b < 1 ? 1 : (b > kMaxReduceBlocks ? kMaxReduceBlocks : b);
}

/// One step of the block's halving tree: for stride = kReduceThreads/2 ... 1
/// (with a barrier between steps), thread t < stride adds s[t + stride].
STUNET_HOST_DEVICE inline void tree_add(double* s, int t, int stride) {
  if (t < stride) s[t] += s[t + stride];
}

/// Chunks (blocks) per Dice row of V voxels.
STUNET_HOST_DEVICE inline std::int64_t dice_chunks(std::int64_t V) {
  const std::int64_t k = (V + kDiceChunkVoxels - 1) / kDiceChunkVoxels;
  return k < 1 ? 1 : (k > kMaxDiceChunks ? kMaxDiceChunks : k);
}

/// Voxel range [begin, end) of chunk k of `chunks` over V voxels.
STUNET_HOST_DEVICE inline void chunk_range(std::int64_t k, std::int64_t chunks, std::int64_t V, std::int64_t& begin,
                                           std::int64_t& end) {
  const std::int64_t len = (V + chunks - 1) / chunks;
  begin = k * len < V ? k * len : V;
  end = begin + len < V ? begin + len : V;
}

// ---- cross-entropy ------------------------------------------------------------

/// Voxel j = n * V + v: stores lse[j] = max + log(sum exp(x - max)) over the
/// column x[n, :, v] and returns lse - x[label] in double (the term of the
/// summed loss). The term uses the unrounded lse, so a 16-bit lse buffer does
/// not add its rounding to the loss (for float/double they are the same).
template <class A, class T>
STUNET_HOST_DEVICE inline double cross_entropy_voxel(const T* x, const std::int32_t* labels, T* lse, std::int64_t j,
                                                     std::int64_t C, std::int64_t V) {
  const std::int64_t n = j / V;
  const std::int64_t base = n * C * V + (j - n * V);
  A m, s;
  column_max_sumexp<A>(x + base, C, V, m, s);
  const A l = m + std::log(s);
  lse[j] = static_cast<T>(l);
  return static_cast<double>(l) - static_cast<double>(static_cast<A>(x[base + labels[j] * V]));
}

// The elementwise backward kernels run a two-dimensional grid: y over the
// rows (n, c) of [N, C, V], x over the voxels of a row, both grid-stride.
// That keeps 64-bit divisions out of the per-element work (a flat index
// would need two per element, at 440M elements for STU-Net).

/// Blocks along x (voxels) and y (rows) of the elementwise backward grid.
STUNET_HOST_DEVICE inline void row_grid(std::int64_t rows, std::int64_t V, int block, std::int64_t& bx,
                                        std::int64_t& by) {
  const std::int64_t x = (V + block - 1) / block;
  bx = x < 1 ? 1 : (x > 1024 ? 1024 : x);
  by = rows < 1 ? 1 : (rows > 65535 ? 65535 : rows);
}

/// dx[row, v] of row = n * C + c: (exp(x - lse[n, v]) - [label == c]) * factor.
/// x, dx are at the row's start (x + row * V); lb and ls at the image's
/// labels and lse (labels + n * V, lse + n * V).
template <class A, class T>
STUNET_HOST_DEVICE inline T cross_entropy_backward_element(const T* x_row, const std::int32_t* lb, const T* ls,
                                                           std::int32_t c, std::int64_t v, A factor) {
  const A onehot = lb[v] == c ? A(1) : A(0);
  return static_cast<T>((std::exp(static_cast<A>(x_row[v]) - static_cast<A>(ls[v])) - onehot) * factor);
}

// ---- soft Dice ------------------------------------------------------------------

/// Row r of the Dice sums (only classes c >= c0 have rows): (n, c).
STUNET_HOST_DEVICE inline void dice_row(std::int64_t r, std::int64_t C, std::int64_t c0, std::int64_t& n,
                                        std::int64_t& c) {
  n = r / (C - c0);
  c = c0 + (r - n * (C - c0));
}

/// Adds voxel v of row (n, c) to a thread's sums: pred += p, and when the
/// label is c, inter += p and gt += 1 (row points at p[n, c, 0], lb at labels[n, 0]).
template <class A, class T>
STUNET_HOST_DEVICE inline void dice_accumulate(const T* row, const std::int32_t* lb, std::int32_t cls, std::int64_t v,
                                               double& inter, double& pred, double& gt) {
  const double pv = static_cast<double>(static_cast<A>(row[v]));
  pred += pv;
  if (lb[v] == cls) {
    inter += pv;
    gt += 1.0;
  }
}

/// dx[row, v] of row = n * C + c: a * [label == c] + b, with a, b the row's
/// coefficients, rounded to T as the CPU op does (a + b in double, then one
/// rounding). lb points at the image's labels (labels + n * V).
template <class T>
STUNET_HOST_DEVICE inline T dice_backward_element(const std::int32_t* lb, std::int32_t c, std::int64_t v, double a,
                                                  double b) {
  return narrow<T>(lb[v] == c ? a + b : b);
}

}  // namespace stunet::cuda::loss_math
