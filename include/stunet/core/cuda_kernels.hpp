#pragma once
/// \file
/// The table of CUDA kernels behind the ops (dlib's twin cpu:: / cuda::
/// functions behind one signature, reached through function pointers).
///
/// Why a table: the ops (ops/*.hpp) are plain C++ that gcc compiles in .cpp
/// files, while the kernels need nvcc. A program that wants CUDA compiles one
/// .cu file that includes <stunet/cuda/kernels.cuh>; that header fills this
/// table during static initialisation, and from then on every op called with
/// CUDA tensors, from any translation unit, runs on the GPU. Without it the
/// ops throw a stunet::Error naming the op instead of failing in a kernel.
///
/// Conventions shared by every entry:
/// - pointers are device pointers of dense (contiguous) buffers of `dtype`
///   unless said otherwise; `device` is the CUDA device index;
/// - `dtype` is one of f32, f64, f16, bf16; arithmetic accumulates in float
///   (in double for f64), so f16/bf16 only round the stored values;
/// - work is queued on stunet::cuda::stream(device) (the context's stream);
///   entries that return a value to the host synchronise that stream;
/// - the caller (the op) has checked shapes and dtypes; the entries check
///   only what the host cannot (label values, launch errors);
/// - an output may alias an input only where the entry says so (add, scale,
///   leaky_relu and its backward, softmax forward y == x, softmax backward
///   dx == g); dice_sums and cross_entropy_* expect labels already validated
///   by class_labels.

#include <cstddef>
#include <cstdint>

#include "stunet/core/dtype.hpp"
#include "stunet/core/error.hpp"
#include "stunet/ops/conv3d_problem.hpp"

namespace stunet {

namespace detail {
struct Loop5;  // core/tensor.hpp: a view's shape and strides padded to rank 5
}  // namespace detail

/// What the caching device allocator did (cuda/allocator.cuh), for tests
/// and benchmarks compiled as plain C++.
struct CudaAllocatorCounts {
  std::size_t allocations = 0;     ///< requests served, all devices
  std::size_t device_mallocs = 0;  ///< of those, cache misses that called cudaMalloc
  std::size_t live_bytes = 0;      ///< handed out now on the device asked about
  std::size_t cached_bytes = 0;    ///< freed and kept on that device
};

/// Function pointers to the CUDA kernels; all null until the CUDA headers
/// register them (see the file comment).
struct CudaKernels {
  /// Number of visible CUDA devices (0 without a GPU or driver; never throws).
  int (*device_count)() = nullptr;
  /// Waits for all work queued on the device's context stream (timing).
  void (*synchronize)(int device) = nullptr;
  /// The caching allocator's counters for `device`.
  CudaAllocatorCounts (*allocator_counts)(int device) = nullptr;

  // ---- tensor plumbing (tensor_ops.cuh) -----------------------------------
  /// dst[i] = convert(src[i]) over two strided views of one shape (Loop5 from
  /// detail::pad_to_5; strides may be negative, as a flip is). Both pointers
  /// already include their storage offsets; dtypes may differ (any of
  /// f32/f64/f16/bf16/i64/i32/u8 to any). Used by contiguous(), to(dtype),
  /// concat, slicing and flip.
  void (*strided_copy)(void* dst, DType dst_dtype, const detail::Loop5& dst_loop, const void* src, DType src_dtype,
                       const detail::Loop5& src_loop, int device) = nullptr;
  /// Every element of the strided view = value (any dtype).
  void (*fill)(void* dst, DType dtype, const detail::Loop5& loop, double value, int device) = nullptr;
  /// out[i] = a[i] + alpha * b[i]; out may alias a (gradient accumulation).
  void (*add)(DType dtype, const void* a, const void* b, double alpha, void* out, std::int64_t n,
              int device) = nullptr;
  /// out[i] = s * x[i]; out may alias x.
  void (*scale)(DType dtype, const void* x, double s, void* out, std::int64_t n, int device) = nullptr;
  /// sum_i x[i], accumulated in double, deterministic (fixed reduction tree). Synchronises.
  double (*sum)(DType dtype, const void* x, std::int64_t n, int device) = nullptr;
  /// sum_i x[i]^2 in double (gradient norms; NaN/Inf when an element is). Synchronises.
  double (*sum_squares)(DType dtype, const void* x, std::int64_t n, int device) = nullptr;
  /// out[v] = argmax_c x[n, c, v] (int32 out [N, V]; the first maximum wins, as torch.argmax). x: [N, C, V].
  void (*argmax_channels)(DType dtype, const void* x, std::int32_t* out, std::int64_t N, std::int64_t C,
                          std::int64_t V, int device) = nullptr;

  // ---- activation, interpolation (elementwise.cuh) -------------------------
  /// y = x > 0 ? x : slope * x; y may alias x.
  void (*leaky_relu)(DType dtype, const void* x, void* y, double slope, std::int64_t n, int device) = nullptr;
  /// dx = ref > 0 ? g : slope * g (ref: the input, or the output, of the activation); dx may alias g.
  void (*leaky_relu_backward)(DType dtype, const void* ref, const void* g, void* dx, double slope, std::int64_t n,
                              int device) = nullptr;
  /// Nearest upsampling by integer factors: x [planes, D, H, W] -> y [planes, D*sd, H*sh, W*sw].
  void (*upsample_nearest)(DType dtype, const void* x, void* y, std::int64_t planes, std::int64_t D, std::int64_t H,
                           std::int64_t W, int sd, int sh, int sw, int device) = nullptr;
  /// dx [planes, D, H, W] = sum of g [planes, D*sd, H*sh, W*sw] over each block of sd*sh*sw.
  void (*upsample_nearest_backward)(DType dtype, const void* g, void* dx, std::int64_t planes, std::int64_t D,
                                    std::int64_t H, std::int64_t W, int sd, int sh, int sw, int device) = nullptr;

  // ---- instance norm (norm.cuh) --------------------------------------------
  /// Per plane (one (n, c) pair of S voxels): mean and 1/sqrt(biased var + eps),
  /// two passes in float (double for f64) with a deterministic split
  /// reduction. x: [planes, S]; mean, rstd: float device arrays [planes]
  /// (double arrays for f64).
  void (*instance_norm_stats)(DType dtype, const void* x, std::int64_t planes, std::int64_t S, double eps, void* mean,
                              void* rstd, int device) = nullptr;
  /// y = (x - mean[p]) * rstd[p] * weight[c] + bias[c], p = n*C + c; weight, bias: [C] of dtype or null.
  void (*instance_norm_forward)(DType dtype, const void* x, const void* mean, const void* rstd, const void* weight,
                                const void* bias, void* y, std::int64_t planes, std::int64_t C, std::int64_t S,
                                int device) = nullptr;
  /// sum_g[p] = sum g, sum_gx[p] = sum g * (x - mean) * rstd (float arrays, double for f64).
  void (*instance_norm_backward_sums)(DType dtype, const void* x, const void* g, const void* mean, const void* rstd,
                                      std::int64_t planes, std::int64_t S, void* sum_g, void* sum_gx,
                                      int device) = nullptr;
  /// dx = w[c] * rstd * (g - sum_g/S - xhat * sum_gx/S), as cpu::instance_norm_backward_input.
  void (*instance_norm_backward_input)(DType dtype, const void* x, const void* g, const void* mean, const void* rstd,
                                       const void* weight, const void* sum_g, const void* sum_gx, void* dx,
                                       std::int64_t planes, std::int64_t C, std::int64_t S, int device) = nullptr;
  /// out[c] = sum_n per_plane[n*C + c] (per_plane: float, double for f64; out: dtype [C]).
  void (*sum_planes_over_batch)(DType dtype, const void* per_plane, void* out, std::int64_t N, std::int64_t C,
                                int device) = nullptr;

  // ---- conv3d (conv3d.cuh) -------------------------------------------------
  /// y [N, K, Z, P, Q] = conv3d(x [N, C, D, H, W], w [K, C, T, R, S]) + b [K] (b may be null).
  void (*conv3d_fprop)(const Conv3dProblem& p, DType dtype, const void* x, const void* w, const void* b, void* y,
                       int device) = nullptr;
  /// dx [N, C, D, H, W] from dy [N, K, Z, P, Q] and w.
  void (*conv3d_dgrad)(const Conv3dProblem& p, DType dtype, const void* dy, const void* w, void* dx,
                       int device) = nullptr;
  /// dw [K, C, T, R, S] from x and dy (overwritten, not accumulated).
  void (*conv3d_wgrad)(const Conv3dProblem& p, DType dtype, const void* x, const void* dy, void* dw,
                       int device) = nullptr;
  /// db [K] = sum of dy over n and space.
  void (*conv3d_bgrad)(const Conv3dProblem& p, DType dtype, const void* dy, void* db, int device) = nullptr;

  // ---- softmax and losses (loss.cuh) ---------------------------------------
  /// Softmax over the middle axis of x viewed as [outer, C, inner].
  void (*softmax_forward)(DType dtype, const void* x, void* y, std::int64_t outer, std::int64_t C, std::int64_t inner,
                          int device) = nullptr;
  /// dx = y * (g - sum_c g * y).
  void (*softmax_backward)(DType dtype, const void* y, const void* g, void* dx, std::int64_t outer, std::int64_t C,
                           std::int64_t inner, int device) = nullptr;
  /// Labels as int32 (from any dtype of label map); returns the index of the
  /// first value that is not an integer in [0, classes), or -1. Synchronises.
  std::int64_t (*class_labels)(DType label_dtype, const void* labels_in, std::int32_t* out, std::int64_t n,
                               std::int64_t classes, int device) = nullptr;
  /// Sum over (n, v) of logsumexp_c x - x[label] (double, deterministic); lse [N, V] of dtype receives the
  /// per-voxel log-sum-exp. x: [N, C, V]. Synchronises.
  double (*cross_entropy_forward)(DType dtype, const void* x, const std::int32_t* labels, void* lse, std::int64_t N,
                                  std::int64_t C, std::int64_t V, int device) = nullptr;
  /// dx = (softmax(x) - onehot(label)) * factor.
  void (*cross_entropy_backward)(DType dtype, const void* x, const std::int32_t* labels, const void* lse, void* dx,
                                 std::int64_t N, std::int64_t C, std::int64_t V, double factor,
                                 int device) = nullptr;
  /// Per row (n, c) with c >= c0, into HOST arrays [N*C] (rows c < c0 left as
  /// they are): inter = sum_v p * [label == c], pred = sum_v p, gt = sum_v [label == c], in double.
  /// Synchronises.
  void (*dice_sums)(DType dtype, const void* p, const std::int32_t* labels, std::int64_t N, std::int64_t C,
                    std::int64_t V, std::int64_t c0, double* inter, double* pred, double* gt, int device) = nullptr;
  /// dx[n, c, v] = a[n*C + c] * [label == c] + b[n*C + c]; a, b are HOST arrays [N*C] (copied over).
  void (*dice_backward)(DType dtype, const std::int32_t* labels, void* dx, std::int64_t N, std::int64_t C,
                        std::int64_t V, const double* a, const double* b, int device) = nullptr;

  // ---- optimiser (optim.cuh) -----------------------------------------------
  /// torch.optim.SGD's update of one parameter, in the parameter's dtype as
  /// optim::SGD computes it on the host: d = g + wd*w; buf = first ? d :
  /// mom*buf + damp*d; d = nesterov ? d + mom*buf : buf; w -= lr*d. buf may be
  /// null (momentum 0). g is multiplied by grad_scale first (1 = none;
  /// unscaling for mixed precision).
  void (*sgd_step)(DType dtype, void* w, const void* g, void* buf, std::int64_t n, double lr, double weight_decay,
                   double momentum, double dampening, bool nesterov, bool first, double grad_scale,
                   int device) = nullptr;
};

/// The process-wide table.
inline CudaKernels& cuda_kernels() {
  static CudaKernels table;
  return table;
}

/// The entry `fn` of the table, or a stunet::Error naming `op` when the
/// program was built without the CUDA kernels.
template <class F> F require_cuda_kernel(F fn, const char* op) {
  STUNET_CHECK(fn != nullptr,
               "{}: tensors are on a CUDA device but this program has no CUDA kernels (compile one .cu file that "
               "includes <stunet/cuda/kernels.cuh> and link stunet::cuda)",
               op);
  return fn;
}

}  // namespace stunet
