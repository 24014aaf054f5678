#pragma once
/// \file
/// Per-element math of the tensor_ops kernels (tensor_ops.cuh), shared with
/// the host so that tests/kernel_math/test_tensor_ops_math.cpp can run the
/// kernels' index arithmetic and reduction structure on a machine without a
/// GPU. No CUDA headers here: element types are converted only by the
/// callers (load_as / store_as in the kernels, to_double / from_double on the
/// host), the functions below see indices and accumulator values.

#include <cstdint>

#include "stunet/core/host_device.hpp"

namespace stunet::cuda {

// ---- strided views -----------------------------------------------------------

/// K strided views of one logical shape, reduced to the fewest dimensions
/// that describe them: extents of 1 dropped, and neighbouring dimensions
/// merged wherever every view steps through them as through one (outer
/// stride == inner extent * inner stride). The `rank` used dimensions sit in
/// n[5 - rank .. 4], innermost last; the others hold extent 1, stride 0.
///
/// Why: the kernels decode each linear index into coordinates with one
/// division per dimension, the costly part of a copy. A contiguous(), to(dtype)
/// or a concat into a channel slice collapses to rank 1 or 2 (zero or one
/// division); a flip or a permutation keeps what it needs.
template <int K> struct StridedIndex {
  int rank = 0;
  std::int64_t n[5] = {1, 1, 1, 1, 1};
  std::int64_t s[K][5] = {};
};

/// Builds the StridedIndex of K views with extents n[0..4] (outermost first)
/// and strides s[v][0..4] for view v. Strides may be negative (flips) or zero.
template <int K>
STUNET_HOST_DEVICE inline StridedIndex<K> collapse_strided(const std::int64_t n[5], const std::int64_t* const s[K]) {
  std::int64_t on[5] = {1, 1, 1, 1, 1};
  std::int64_t os[K][5] = {};
  int m = 0;
  for (int d = 0; d < 5; ++d) {
    if (n[d] == 1) continue;
    bool merge = m > 0;
    for (int v = 0; v < K && merge; ++v) merge = os[v][m - 1] == n[d] * s[v][d];
    if (merge) {
      on[m - 1] *= n[d];
      for (int v = 0; v < K; ++v) os[v][m - 1] = s[v][d];
    } else {
      on[m] = n[d];
      for (int v = 0; v < K; ++v) os[v][m] = s[v][d];
      ++m;
    }
  }
  StridedIndex<K> ix;
  ix.rank = m;
  for (int j = 0; j < m; ++j) {
    ix.n[5 - m + j] = on[j];
    for (int v = 0; v < K; ++v) ix.s[v][5 - m + j] = os[v][j];
  }
  return ix;
}

/// Element offsets (in elements, relative to each view's first element) of the
/// element with row-major linear index `i` of the logical shape, for every
/// view. I is the index type of the decode (int32 when the element count
/// allows: 32-bit division is several times cheaper on a GPU).
template <class I, int K>
STUNET_HOST_DEVICE inline void strided_offsets(const StridedIndex<K>& ix, I i, std::int64_t off[K]) {
  for (int v = 0; v < K; ++v) off[v] = 0;
  if (ix.rank == 0) return;
  const int outer = 5 - ix.rank;
  I rem = i;
  // Fixed trip counts with guards, so that every ix.n[d] / ix.s[v][d] has a
  // constant index after unrolling: a kernel reads them straight from its
  // parameters instead of copying the struct to local memory.
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int d = 4; d >= 1; --d) {
    if (d > outer) {
      const I nd = static_cast<I>(ix.n[d]);
      const I q = rem / nd;
      const std::int64_t c = static_cast<std::int64_t>(rem - q * nd);
      rem = q;
      for (int v = 0; v < K; ++v) off[v] += c * ix.s[v][d];
    }
  }
  // The outermost used dimension needs no division: what remains is its coordinate.
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int d = 0; d < 5; ++d)
    if (d == outer)
      for (int v = 0; v < K; ++v) off[v] += static_cast<std::int64_t>(rem) * ix.s[v][d];
}

/// True when every view of `ix` is dense in row-major order (rank <= 1 with
/// unit inner strides): a copy between them is a memcpy.
template <int K> STUNET_HOST_DEVICE inline bool strided_is_dense(const StridedIndex<K>& ix) {
  if (ix.rank == 0) return true;
  if (ix.rank > 1) return false;
  for (int v = 0; v < K; ++v)
    if (ix.s[v][4] != 1) return false;
  return true;
}

// ---- deterministic sums --------------------------------------------------------

/// Threads per block of the sum / sum_squares partial kernel.
inline constexpr int kSumThreads = 256;
/// Elements per thread below which fewer blocks are launched (tiny tensors,
/// such as a bias gradient, do not need a thousand blocks).
inline constexpr std::int64_t kSumPerThread = 16;
/// Largest number of partial-sum blocks; the second pass reduces them with one
/// block of this many threads.
inline constexpr int kSumMaxBlocks = 1024;

/// Blocks of the partial-sum pass over n elements. A function of n only, never
/// of the device: the reduction tree, hence every rounding, is the same on
/// every GPU and every call.
STUNET_HOST_DEVICE inline int sum_blocks(std::int64_t n) {
  const std::int64_t per_block = static_cast<std::int64_t>(kSumThreads) * kSumPerThread;
  const std::int64_t b = (n + per_block - 1) / per_block;
  return static_cast<int>(b < 1 ? 1 : (b > kSumMaxBlocks ? kSumMaxBlocks : b));
}

/// The term one element contributes: x, or x^2 for sum_squares (in double).
template <bool Squares> STUNET_HOST_DEVICE inline double sum_term(double x) {
  if constexpr (Squares) return x * x;
  else return x;
}

// ---- elementwise -------------------------------------------------------------------

/// out = a + alpha * b in the accumulation type A.
template <class A> STUNET_HOST_DEVICE inline A axpy_value(A a, A b, A alpha) { return a + alpha * b; }

// ---- argmax over channels -------------------------------------------------------------

/// Whether `candidate` replaces the running maximum `best` (scanning channels
/// in increasing order): torch.argmax semantics, where NaN counts as larger
/// than every number and the first maximum (or the first NaN) wins.
template <class A> STUNET_HOST_DEVICE inline bool argmax_takes(A candidate, A best) {
  // best != best: a NaN already holds the maximum and nothing replaces it.
  return !(best != best) && (candidate > best || candidate != candidate);
}

}  // namespace stunet::cuda
