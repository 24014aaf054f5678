#pragma once
/// \file
/// CUDA kernels of the loss family: softmax over the channel axis, label
/// validation, fused log-sum-exp cross-entropy and the soft Dice sums, with
/// their backward passes (the table entries of core/cuda_kernels.hpp; CPU
/// twins in cpu/softmax.hpp and cpu/loss.hpp).
///
/// Shapes: softmax sees x as [outer, C, inner]; the losses see scores as
/// [N, C, V] and labels as int32 [N, V]. In STU-Net C = 105 and V = 128^3, so
/// every channel-axis kernel gives one thread a voxel's column of C values
/// (strided by V): neighbouring threads read neighbouring voxels of the same
/// channel, which is a coalesced load per channel and needs no shared memory.
///
/// The per-thread bodies live in cuda/loss_math.hpp (host-testable); this
/// file holds the grids, the reductions' block trees and the host plumbing.
///
/// Determinism: the reductions (cross-entropy total, Dice sums) have a shape
/// fixed by the problem size alone (loss_math.hpp: per-thread sums in
/// double, a halving tree per block, then an in-order sum of the block
/// partials by a second kernel), and the label check reports the smallest bad
/// index with an integer atomicMin, so every entry gives the same bits on
/// every run.

#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/error.hpp"
#include "stunet/cuda/allocator.cuh"
#include "stunet/cuda/check.cuh"
#include "stunet/cuda/launch.cuh"
#include "stunet/cuda/loss_math.hpp"

namespace stunet::cuda {

namespace loss_detail {

namespace lm = loss_math;

/// Device scratch from the caching allocator, given back when the scope ends
/// (also when a check throws). Freed blocks are reused only by work queued
/// later on the same stream, so no synchronisation is needed before the free.
class Scratch {
 public:
  Scratch(std::size_t bytes, int device) : ptr_(device_allocate(bytes, device)), device_(device) {}
  ~Scratch() { device_deallocate(ptr_, device_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class U> U* as() const { return static_cast<U*>(ptr_); }

 private:
  void* ptr_;
  int device_;
};

/// Blocks for a one-dimensional grid of `n` threads of `block`, checked
/// against the grid limit (the reductions cannot grid-stride: their shape is fixed).
inline unsigned exact_blocks(std::int64_t n, int block, const char* op) {
  const std::int64_t blocks = (n + block - 1) / block;
  STUNET_CHECK(blocks >= 1 && blocks <= 0x7fffffffLL, "{}: {} blocks exceed the CUDA grid limit", op, blocks);
  return static_cast<unsigned>(blocks);
}

// ---- kernels ------------------------------------------------------------------

/// y = softmax(x) over C for each of the cols = outer * inner columns of
/// [outer, C, inner]. y may alias x (each x[c] is read before y[c] is written).
template <class T>
__global__ void softmax_forward_kernel(const T* x, T* y, std::int64_t cols, std::int64_t C, std::int64_t inner) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; col < cols; col += step) {
    const std::int64_t base = lm::column_base(col, C, inner);
    lm::softmax_forward_column<acc_t<T>>(x + base, y + base, C, inner);
  }
}

/// dx = y * (g - sum_c g * y) for each column of [outer, C, inner]. No
/// __restrict__ on g and dx: dx may overwrite g, which the column loop allows
/// (the dot product is complete before any write, and g[c] is read before dx[c]).
template <class T>
__global__ void softmax_backward_kernel(const T* __restrict__ y, const T* g, T* dx, std::int64_t cols,
                                        std::int64_t C, std::int64_t inner) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; col < cols; col += step) {
    const std::int64_t base = lm::column_base(col, C, inner);
    lm::softmax_backward_column<acc_t<T>>(y + base, g + base, dx + base, C, inner);
  }
}

/// out[i] = in[i] as a class index for i < n; *first_bad (initially n) is
/// lowered to every bad index. The minimum does not depend on the order of
/// the atomics, so the reported index is the smallest whatever the
/// scheduling; the plain read first skips the atomic when a smaller index is
/// already known.
template <class L>
__global__ void class_labels_kernel(const L* __restrict__ in, std::int32_t* __restrict__ out, std::int64_t n,
                                    std::int64_t classes, unsigned long long* first_bad) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    std::int32_t label;
    const bool ok = lm::class_label(in[i], classes, label);
    out[i] = label;
    if (!ok && static_cast<unsigned long long>(i) < *reinterpret_cast<volatile unsigned long long*>(first_bad))
      atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

/// Block `blockIdx.x` of the cross-entropy reduction: its threads take voxels
/// j = blockIdx.x * kReduceThreads + t + k * (gridDim.x * kReduceThreads),
/// store lse[j], sum their terms in order, and the block's tree leaves the
/// partial in partials[blockIdx.x]. Launch with kReduceThreads threads.
template <class T>
__global__ void __launch_bounds__(lm::kReduceThreads)
    cross_entropy_forward_kernel(const T* __restrict__ x, const std::int32_t* __restrict__ labels,
                                 T* __restrict__ lse, std::int64_t count, std::int64_t C, std::int64_t V,
                                 double* __restrict__ partials) {
  __shared__ double s[lm::kReduceThreads];
  const int t = static_cast<int>(threadIdx.x);
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * lm::kReduceThreads;
  double acc = 0.0;
  for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * lm::kReduceThreads + t; j < count; j += step)
    acc += lm::cross_entropy_voxel<acc_t<T>>(x, labels, lse, j, C, V);
  s[t] = acc;
  __syncthreads();
  for (int stride = lm::kReduceThreads / 2; stride > 0; stride >>= 1) {
    lm::tree_add(s, t, stride);
    __syncthreads();
  }
  if (t == 0) partials[blockIdx.x] = s[0];
}

/// out[o] = sum_k partials[o * count + k], k in increasing order: the second,
/// order-fixing pass of every reduction here (count is at most a few
/// thousand). A template (S = double) only so that including this header in
/// several .cu files does not define the kernel twice.
template <class S>
__global__ void ordered_sum_kernel(const S* __restrict__ partials, std::int64_t count, std::int64_t outputs,
                                   S* __restrict__ out) {
  const std::int64_t o = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= outputs) return;
  S acc = S(0);
  for (std::int64_t k = 0; k < count; ++k) acc += partials[o * count + k];
  out[o] = acc;
}

/// dx [N, C, V] from x, lse [N, V] and labels; grid lm::row_grid (y: rows n * C + c, x: voxels).
template <class T>
__global__ void cross_entropy_backward_kernel(const T* __restrict__ x, const std::int32_t* __restrict__ labels,
                                              const T* __restrict__ lse, T* __restrict__ dx, std::int64_t rows,
                                              std::int64_t C, std::int64_t V, acc_t<T> factor) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const std::int64_t n = row / C;
    const auto c = static_cast<std::int32_t>(row - n * C);
    for (std::int64_t v = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < V; v += step)
      dx[row * V + v] =
          lm::cross_entropy_backward_element<acc_t<T>>(x + row * V, labels + n * V, lse + n * V, c, v, factor);
  }
}

/// Block b = r * chunks + k sums chunk k of Dice row r (lm::dice_row) and
/// writes partials[(q * rows + r) * chunks + k] for q = inter, pred, gt.
/// Launch with kReduceThreads threads and rows * chunks blocks.
template <class T>
__global__ void __launch_bounds__(lm::kReduceThreads)
    dice_sums_kernel(const T* __restrict__ p, const std::int32_t* __restrict__ labels, std::int64_t C,
                     std::int64_t V, std::int64_t c0, std::int64_t rows, std::int64_t chunks,
                     double* __restrict__ partials) {
  __shared__ double si[lm::kReduceThreads], sp[lm::kReduceThreads], sg[lm::kReduceThreads];
  const int t = static_cast<int>(threadIdx.x);
  const std::int64_t b = blockIdx.x;
  const std::int64_t r = b / chunks, k = b - r * chunks;
  std::int64_t n, c, begin, end;
  lm::dice_row(r, C, c0, n, c);
  lm::chunk_range(k, chunks, V, begin, end);
  const T* row = p + (n * C + c) * V;
  const std::int32_t* lb = labels + n * V;
  double inter = 0.0, pred = 0.0, gt = 0.0;
  for (std::int64_t v = begin + t; v < end; v += lm::kReduceThreads)
    lm::dice_accumulate<acc_t<T>>(row, lb, static_cast<std::int32_t>(c), v, inter, pred, gt);
  si[t] = inter;
  sp[t] = pred;
  sg[t] = gt;
  __syncthreads();
  for (int stride = lm::kReduceThreads / 2; stride > 0; stride >>= 1) {
    lm::tree_add(si, t, stride);
    lm::tree_add(sp, t, stride);
    lm::tree_add(sg, t, stride);
    __syncthreads();
  }
  if (t == 0) {
    partials[(0 * rows + r) * chunks + k] = si[0];
    partials[(1 * rows + r) * chunks + k] = sp[0];
    partials[(2 * rows + r) * chunks + k] = sg[0];
  }
}

/// dx [N, C, V] from labels and ab = {a[0..rows), b[0..rows)}, rows = N * C; grid lm::row_grid.
template <class T>
__global__ void dice_backward_kernel(const std::int32_t* __restrict__ labels, T* __restrict__ dx, std::int64_t rows,
                                     std::int64_t C, std::int64_t V, const double* __restrict__ ab) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const std::int64_t n = row / C;
    const auto c = static_cast<std::int32_t>(row - n * C);
    const double a = ab[row], b = ab[rows + row];
    for (std::int64_t v = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < V; v += step)
      dx[row * V + v] = lm::dice_backward_element<T>(labels + n * V, c, v, a, b);
  }
}

// ---- launchers (the table entries) ------------------------------------------------
// Contracts as documented in core/cuda_kernels.hpp; device pointers, dense.

/// softmax_forward entry: y = softmax(x) over the middle axis of [outer, C, inner]; y may alias x.
inline void softmax_forward(DType dtype, const void* x, void* y, std::int64_t outer, std::int64_t C,
                            std::int64_t inner, int device) {
  const std::int64_t cols = outer * inner;
  if (cols == 0 || C == 0) return;
  DeviceGuard guard(device);
  dispatch_cuda_float(dtype, "softmax_forward", [&]<class T>() {
    softmax_forward_kernel<T><<<grid_for(cols), kBlock, 0, stream(device)>>>(static_cast<const T*>(x),
                                                                             static_cast<T*>(y), cols, C, inner);
    STUNET_CUDA_CHECK_LAUNCH(
        fmt::format("softmax_forward_kernel {} [{}, {}, {}]", dtype_name(dtype), outer, C, inner).c_str());
  });
}

/// softmax_backward entry: dx = y * (g - sum_c g * y) over [outer, C, inner]; dx may alias g.
inline void softmax_backward(DType dtype, const void* y, const void* g, void* dx, std::int64_t outer, std::int64_t C,
                             std::int64_t inner, int device) {
  const std::int64_t cols = outer * inner;
  if (cols == 0 || C == 0) return;
  DeviceGuard guard(device);
  dispatch_cuda_float(dtype, "softmax_backward", [&]<class T>() {
    softmax_backward_kernel<T><<<grid_for(cols), kBlock, 0, stream(device)>>>(
        static_cast<const T*>(y), static_cast<const T*>(g), static_cast<T*>(dx), cols, C, inner);
    STUNET_CUDA_CHECK_LAUNCH(
        fmt::format("softmax_backward_kernel {} [{}, {}, {}]", dtype_name(dtype), outer, C, inner).c_str());
  });
}

/// class_labels entry: out [n] int32 from labels of any dtype; the smallest bad index or -1. Synchronises.
inline std::int64_t class_labels(DType label_dtype, const void* labels_in, std::int32_t* out, std::int64_t n,
                                 std::int64_t classes, int device) {
  if (n == 0) return -1;
  DeviceGuard guard(device);
  cudaStream_t s = stream(device);
  Scratch flag(sizeof(unsigned long long), device);
  const unsigned long long none = static_cast<unsigned long long>(n);
  // Pageable source: the copy has read `none` when the call returns.
  STUNET_CUDA_CHECK(cudaMemcpyAsync(flag.as<unsigned long long>(), &none, sizeof none, cudaMemcpyHostToDevice, s));
  dispatch_cuda_all(label_dtype, "class_labels", [&]<class L>() {
    class_labels_kernel<L><<<grid_for(n), kBlock, 0, s>>>(static_cast<const L*>(labels_in), out, n, classes,
                                                          flag.as<unsigned long long>());
    STUNET_CUDA_CHECK_LAUNCH(
        fmt::format("class_labels_kernel {} n={} classes={}", dtype_name(label_dtype), n, classes).c_str());
  });
  unsigned long long first_bad = none;
  STUNET_CUDA_CHECK(cudaMemcpyAsync(&first_bad, flag.as<unsigned long long>(), sizeof first_bad,
                                    cudaMemcpyDeviceToHost, s));
  STUNET_CUDA_CHECK(cudaStreamSynchronize(s));
  return first_bad < none ? static_cast<std::int64_t>(first_bad) : -1;
}

/// cross_entropy_forward entry: lse [N, V] and sum (lse - x[label]) in double from x [N, C, V]. Synchronises.
inline double cross_entropy_forward(DType dtype, const void* x, const std::int32_t* labels, void* lse, std::int64_t N,
                                    std::int64_t C, std::int64_t V, int device) {
  const std::int64_t count = N * V;
  if (count == 0) return 0.0;
  DeviceGuard guard(device);
  cudaStream_t s = stream(device);
  const std::int64_t blocks = lm::reduce_blocks(count);
  Scratch scratch(static_cast<std::size_t>(blocks + 1) * sizeof(double), device);
  double* partials = scratch.as<double>();
  dispatch_cuda_float(dtype, "cross_entropy_forward", [&]<class T>() {
    cross_entropy_forward_kernel<T><<<static_cast<unsigned>(blocks), lm::kReduceThreads, 0, s>>>(
        static_cast<const T*>(x), labels, static_cast<T*>(lse), count, C, V, partials);
    STUNET_CUDA_CHECK_LAUNCH(
        fmt::format("cross_entropy_forward_kernel {} [N={}, C={}, V={}]", dtype_name(dtype), N, C, V).c_str());
  });
  ordered_sum_kernel<double><<<1, 32, 0, s>>>(partials, blocks, 1, partials + blocks);
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("ordered_sum_kernel (cross_entropy_forward, {} partials)", blocks).c_str());
  double total = 0.0;
  STUNET_CUDA_CHECK(cudaMemcpyAsync(&total, partials + blocks, sizeof total, cudaMemcpyDeviceToHost, s));
  STUNET_CUDA_CHECK(cudaStreamSynchronize(s));
  return total;
}

/// cross_entropy_backward entry: dx [N, C, V] = (exp(x - lse) - onehot) * factor.
inline void cross_entropy_backward(DType dtype, const void* x, const std::int32_t* labels, const void* lse, void* dx,
                                   std::int64_t N, std::int64_t C, std::int64_t V, double factor, int device) {
  if (N * C * V == 0) return;
  DeviceGuard guard(device);
  std::int64_t bx, by;
  lm::row_grid(N * C, V, kBlock, bx, by);
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  dispatch_cuda_float(dtype, "cross_entropy_backward", [&]<class T>() {
    // factor rounded to the arithmetic type first, as the CPU op's static_cast<T>(factor).
    cross_entropy_backward_kernel<T><<<grid, kBlock, 0, stream(device)>>>(
        static_cast<const T*>(x), labels, static_cast<const T*>(lse), static_cast<T*>(dx), N * C, C, V,
        static_cast<acc_t<T>>(factor));
    STUNET_CUDA_CHECK_LAUNCH(
        fmt::format("cross_entropy_backward_kernel {} [N={}, C={}, V={}]", dtype_name(dtype), N, C, V).c_str());
  });
}

/// dice_sums entry: inter, pred, gt of rows (n, c >= c0) into HOST arrays [N*C]. Synchronises.
inline void dice_sums(DType dtype, const void* p, const std::int32_t* labels, std::int64_t N, std::int64_t C,
                      std::int64_t V, std::int64_t c0, double* inter, double* pred, double* gt, int device) {
  if (c0 < 0) c0 = 0;
  if (N == 0 || C <= c0) return;
  DeviceGuard guard(device);
  cudaStream_t s = stream(device);
  const std::int64_t rows = N * (C - c0);
  const std::int64_t chunks = lm::dice_chunks(V);
  const unsigned blocks = exact_blocks(rows * chunks, 1, "dice_sums");
  Scratch scratch(static_cast<std::size_t>(3 * rows * (chunks + 1)) * sizeof(double), device);
  double* partials = scratch.as<double>();
  double* sums = partials + 3 * rows * chunks;  // [inter rows | pred rows | gt rows]
  dispatch_cuda_float(dtype, "dice_sums", [&]<class T>() {
    dice_sums_kernel<T><<<blocks, lm::kReduceThreads, 0, s>>>(static_cast<const T*>(p), labels, C, V, c0, rows,
                                                               chunks, partials);
    STUNET_CUDA_CHECK_LAUNCH(fmt::format("dice_sums_kernel {} [N={}, C={}, V={}] c0={} chunks={}",
                                         dtype_name(dtype), N, C, V, c0, chunks)
                                 .c_str());
  });
  ordered_sum_kernel<double>
      <<<exact_blocks(3 * rows, kBlock, "dice_sums"), kBlock, 0, s>>>(partials, chunks, 3 * rows, sums);
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("ordered_sum_kernel (dice_sums, {} rows x {} chunks)", rows, chunks).c_str());
  std::vector<double> host(static_cast<std::size_t>(3 * rows));
  STUNET_CUDA_CHECK(cudaMemcpyAsync(host.data(), sums, host.size() * sizeof(double), cudaMemcpyDeviceToHost, s));
  STUNET_CUDA_CHECK(cudaStreamSynchronize(s));
  for (std::int64_t r = 0; r < rows; ++r) {
    std::int64_t n, c;
    lm::dice_row(r, C, c0, n, c);
    const auto i = static_cast<std::size_t>(r);
    inter[n * C + c] = host[i];
    pred[n * C + c] = host[static_cast<std::size_t>(rows) + i];
    gt[n * C + c] = host[static_cast<std::size_t>(2 * rows) + i];
  }
}

/// dice_backward entry: dx [N, C, V] = a * onehot + b per row; a, b are HOST arrays [N*C].
inline void dice_backward(DType dtype, const std::int32_t* labels, void* dx, std::int64_t N, std::int64_t C,
                          std::int64_t V, const double* a, const double* b, int device) {
  if (N * C * V == 0) return;
  DeviceGuard guard(device);
  cudaStream_t s = stream(device);
  const std::int64_t rows = N * C;
  std::vector<double> ab(static_cast<std::size_t>(2 * rows));
  for (std::int64_t r = 0; r < rows; ++r) {
    ab[static_cast<std::size_t>(r)] = a[r];
    ab[static_cast<std::size_t>(rows + r)] = b[r];
  }
  Scratch coeffs(ab.size() * sizeof(double), device);
  STUNET_CUDA_CHECK(cudaMemcpyAsync(coeffs.as<double>(), ab.data(), ab.size() * sizeof(double),
                                    cudaMemcpyHostToDevice, s));
  // `ab` (like the caller's a and b) is pageable memory that is gone once we
  // return. The runtime stages pageable host-to-device copies before
  // returning, but a page-locked caller buffer would be read later; waiting
  // here keeps the entry correct for any host memory (one sync per Dice
  // backward, a few per training step).
  STUNET_CUDA_CHECK(cudaStreamSynchronize(s));
  std::int64_t bx, by;
  lm::row_grid(rows, V, kBlock, bx, by);
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  dispatch_cuda_float(dtype, "dice_backward", [&]<class T>() {
    dice_backward_kernel<T><<<grid, kBlock, 0, s>>>(labels, static_cast<T*>(dx), rows, C, V, coeffs.as<double>());
    STUNET_CUDA_CHECK_LAUNCH(
        fmt::format("dice_backward_kernel {} [N={}, C={}, V={}]", dtype_name(dtype), N, C, V).c_str());
  });
}

}  // namespace loss_detail

/// Installs this family's entries in the kernel table.
inline void register_loss(CudaKernels& t) {
  t.softmax_forward = &loss_detail::softmax_forward;
  t.softmax_backward = &loss_detail::softmax_backward;
  t.class_labels = &loss_detail::class_labels;
  t.cross_entropy_forward = &loss_detail::cross_entropy_forward;
  t.cross_entropy_backward = &loss_detail::cross_entropy_backward;
  t.dice_sums = &loss_detail::dice_sums;
  t.dice_backward = &loss_detail::dice_backward;
}

}  // namespace stunet::cuda
