#pragma once
/// \file
/// CUDA kernels of conv3d (NCDHW, weights [K, C, T, R, S] as PyTorch): the
/// forward pass, the data, weight and bias gradients, registered as
/// CudaKernels::conv3d_fprop / conv3d_dgrad / conv3d_wgrad / conv3d_bgrad.
///
/// Each of fprop, dgrad and wgrad is an implicit GEMM (no im2col buffer: the
/// operands are gathered from x, w and dy while loading shared-memory tiles)
/// in SIMT arithmetic: 256 threads, a 64x64 or 128x32 block tile, 16-deep
/// reduction tiles double-buffered in shared memory with the next tile
/// prefetched into registers during the FMAs of the current one, 4x4 outputs
/// per thread. Elements are converted to float (double for f64) when loaded,
/// so f16/bf16 only round the stored values. Tensor cores are a later step;
/// this version is the correct baseline they will be checked against.
///
/// What each GEMM is, and all the index arithmetic (which thread loads which
/// element, the im2col gather, the stride phases of dgrad, the split plans),
/// lives in conv3d_math.hpp, shared with the host test that runs it over
/// whole index spaces.
///
/// Determinism: every output is one thread's sum in a fixed order; wgrad's
/// split-K partials go to a scratch buffer and a second kernel adds them in
/// split order; bgrad reduces fixed chunks with CUB's fixed-shape block
/// reduction, then adds the chunks in order. No atomics.

#include <algorithm>
#include <cstdint>
#include <string>

#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/error.hpp"
#include "stunet/cuda/allocator.cuh"
#include "stunet/cuda/check.cuh"
#include "stunet/cuda/conv3d_math.hpp"
#include "stunet/cuda/launch.cuh"

namespace stunet::cuda {

namespace conv3d_detail {

namespace cm = conv3d_math;

/// Blocks per SM the launch bounds ask for: two 256-thread blocks in float
/// (at most 128 registers each), one in double, whose accumulators and
/// operands need twice the registers.
template <class T> inline constexpr int kMinBlocks = sizeof(acc_t<T>) == 8 ? 1 : 2;

/// Four consecutive shared-memory values in one 128-bit read (two for double).
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 q0 = *reinterpret_cast<const double2*>(p);
  const double2 q1 = *reinterpret_cast<const double2*>(p + 2);
  v[0] = q0.x;
  v[1] = q0.y;
  v[2] = q1.x;
  v[3] = q1.y;
}

/// acc += A[:, k_begin:k_end] B[k_begin:k_end, :] for this thread's 4x4 block
/// (cm::thread_xy), the operands coming tile by tile from `loader`
/// (conv3d_math.hpp). A is stored along M when kAAlongM (else along k); B
/// always along k. One barrier per tile: tile t is read from buffer t % 2
/// while tile t + 1, already in registers, is stored into the other one.
template <class Tile, bool kAAlongM, class Acc, class Loader>
__device__ __forceinline__ void gemm_mainloop(Loader& loader, int k_begin, int k_end,
                                              Acc (&acc)[cm::kThreadTile][cm::kThreadTile]) {
  constexpr int BK = Tile::BK;
  __shared__ __align__(16) Acc As[2][BK][Tile::kLdA];
  __shared__ __align__(16) Acc Bs[2][BK][Tile::kLdB];
  const int tid = static_cast<int>(threadIdx.x);
  const cm::ThreadXY t = cm::thread_xy<Tile>(tid);
  Acc ra[Tile::kPerThreadA], rb[Tile::kPerThreadB];
  auto stage = [&](int buf) {
#pragma unroll
    for (int i = 0; i < Tile::kPerThreadA; ++i) {
      cm::TileSlot s;
      if constexpr (kAAlongM) s = cm::slot_along_x<Tile::BM>(tid, i);
      else s = cm::slot_along_k(tid, i);
      As[buf][s.kk][s.x] = ra[i];
    }
#pragma unroll
    for (int i = 0; i < Tile::kPerThreadB; ++i) {
      const cm::TileSlot s = cm::slot_along_k(tid, i);
      Bs[buf][s.kk][s.x] = rb[i];
    }
  };
  if (k_begin >= k_end) return;  // the same for the whole block
  loader.load(k_begin, ra, rb);
  stage(0);
  __syncthreads();
  int buf = 0;
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    const bool more = k0 + BK < k_end;
    if (more) loader.load(k0 + BK, ra, rb);  // global loads in flight during the FMAs below
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc a[4], b[4];
      load4(&As[buf][kk][4 * t.tx], a);
      load4(&Bs[buf][kk][4 * t.ty], b);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    if (more) stage(buf ^ 1);
    __syncthreads();
    buf ^= 1;
  }
}

/// y = conv3d(x, w) + bias. Grid: (M tiles of N*Z*P*Q positions, K tiles).
template <class Tile, class T>
__global__ void __launch_bounds__(cm::kThreads, kMinBlocks<T>)
    conv3d_fprop_kernel(const Conv3dProblem p, const T* __restrict__ x, const T* __restrict__ w,
                        const T* __restrict__ bias, T* __restrict__ y) {
  using Acc = acc_t<T>;
  const int m0 = static_cast<int>(blockIdx.x) * Tile::BM, n0 = static_cast<int>(blockIdx.y) * Tile::BN;
  cm::FpropLoader<Tile, Acc, T> loader(p, x, w, m0, n0, static_cast<int>(threadIdx.x));
  Acc acc[4][4] = {};
  gemm_mainloop<Tile, true>(loader, 0, loader.gemm_k, acc);
  const cm::ThreadXY t = cm::thread_xy<Tile>(static_cast<int>(threadIdx.x));
#pragma unroll
  for (int i = 0; i < 4; ++i)
    cm::fprop_store_row(p, loader.out, loader.gemm_m, bias, y, m0 + 4 * t.tx + i, n0 + 4 * t.ty, acc[i]);
}

/// dx from dy and w, one stride phase per blockIdx.z. Grid: (M tiles of the
/// largest phase, C tiles, phases); blocks past their phase's M return.
template <class Tile, class T>
__global__ void __launch_bounds__(cm::kThreads, kMinBlocks<T>)
    conv3d_dgrad_kernel(const Conv3dProblem p, const T* __restrict__ dy, const T* __restrict__ w,
                        T* __restrict__ dx) {
  using Acc = acc_t<T>;
  const cm::DgradPhase ph = cm::dgrad_phase(p, static_cast<int>(blockIdx.z));
  const int m0 = static_cast<int>(blockIdx.x) * Tile::BM, n0 = static_cast<int>(blockIdx.y) * Tile::BN;
  if (m0 >= ph.gemm_m) return;
  cm::DgradLoader<Tile, Acc, T> loader(p, ph, dy, w, m0, n0, static_cast<int>(threadIdx.x));
  Acc acc[4][4] = {};
  gemm_mainloop<Tile, true>(loader, 0, ph.gemm_k, acc);
  const cm::ThreadXY t = cm::thread_xy<Tile>(static_cast<int>(threadIdx.x));
#pragma unroll
  for (int i = 0; i < 4; ++i) cm::dgrad_store_row(p, ph, dx, m0 + 4 * t.tx + i, n0 + 4 * t.ty, acc[i]);
}

/// Split `blockIdx.z` of dw^T = im2col(x)^T dy^T into scratch [splits, K, C*T*R*S].
/// Grid: (tiles of the C*T*R*S taps, K tiles, splits).
template <class Tile, class T>
__global__ void __launch_bounds__(cm::kThreads, kMinBlocks<T>)
    conv3d_wgrad_kernel(const Conv3dProblem p, const cm::SplitPlan plan, const T* __restrict__ x,
                        const T* __restrict__ dy, acc_t<T>* __restrict__ scratch) {
  using Acc = acc_t<T>;
  const int m0 = static_cast<int>(blockIdx.x) * Tile::BM, n0 = static_cast<int>(blockIdx.y) * Tile::BN;
  const int split = static_cast<int>(blockIdx.z);
  const int length = cm::output_positions(p);
  const int k_begin = split * plan.chunk;
  const int k_end = length - k_begin < plan.chunk ? length : k_begin + plan.chunk;
  cm::WgradLoader<Tile, Acc, T> loader(p, x, dy, m0, n0, static_cast<int>(threadIdx.x), k_begin);
  Acc acc[4][4] = {};
  gemm_mainloop<Tile, false>(loader, k_begin, k_end, acc);
  const cm::ThreadXY t = cm::thread_xy<Tile>(static_cast<int>(threadIdx.x));
#pragma unroll
  for (int i = 0; i < 4; ++i) cm::wgrad_store_row(p, scratch, split, m0 + 4 * t.tx + i, n0 + 4 * t.ty, acc[i]);
}

/// dw[i] = sum over splits of scratch[split][i], in split order.
template <class T>
__global__ void conv3d_wgrad_reduce_kernel(const acc_t<T>* __restrict__ scratch, std::int64_t count, int splits,
                                           T* __restrict__ dw) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride)
    dw[i] = static_cast<T>(cm::wgrad_reduce(scratch, count, splits, i));
}

/// partial[k][split] = sum of dy[:, k] over chunk `split` of the N*Z*P*Q
/// terms. Grid: (K, splits).
template <class T>
__global__ void __launch_bounds__(cm::kThreads)
    conv3d_bgrad_partial_kernel(const T* __restrict__ dy, int K, int plane, int length, const cm::SplitPlan plan,
                                acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  using Reduce = cub::BlockReduce<Acc, cm::kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const int k = static_cast<int>(blockIdx.x), split = static_cast<int>(blockIdx.y);
  Acc s = cm::bgrad_thread_sum<Acc>(dy, K, plane, length, plan, k, split, static_cast<int>(threadIdx.x));
  s = Reduce(temp).Sum(s);
  if (threadIdx.x == 0) partial[static_cast<std::int64_t>(k) * plan.splits + split] = s;
}

/// db[k] = sum of partial[k][:] in split order.
template <class T>
__global__ void conv3d_bgrad_final_kernel(const acc_t<T>* __restrict__ partial, int K, int splits,
                                          T* __restrict__ db) {
  const int k = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (k < K) db[k] = static_cast<T>(cm::wgrad_reduce(partial + static_cast<std::int64_t>(k) * splits, 1, splits, 0));
}

/// "N=2 C=32 D,H,W=128x128x128 K=64 T,R,S=3x3x3 pad=(1,1,1) stride=(2,2,2)": for error messages.
inline std::string describe(const Conv3dProblem& p) {
  return fmt::format("N={} C={} D,H,W={}x{}x{} K={} T,R,S={}x{}x{} pad=({},{},{}) stride=({},{},{})", p.N, p.C, p.D,
                     p.H, p.W, p.K, p.T, p.R, p.S, p.pad_d, p.pad_h, p.pad_w, p.stride_d, p.stride_h, p.stride_w);
}

/// The checks every entry makes before touching the device: a valid problem,
/// GEMM index spaces within int (the kernels index positions and taps in 32
/// bits; element offsets are 64-bit), grid extents within CUDA's limits.
inline void check_problem(const Conv3dProblem& p, const char* op) {
  STUNET_CHECK(p.valid(), "{}: invalid problem {} (every extent, channel count and stride >= 1, padding >= 0, and "
               "the kernel must fit the padded input)", op, describe(p));
  constexpr std::int64_t kIntMax = 2147483647;
  const std::int64_t in_positions = static_cast<std::int64_t>(p.N) * p.input_spatial();
  const std::int64_t out_positions = static_cast<std::int64_t>(p.N) * p.output_spatial();
  STUNET_CHECK(in_positions <= kIntMax && out_positions <= kIntMax && p.gemm_k() <= kIntMax &&
                   static_cast<std::int64_t>(p.K) * p.kernel_volume() <= kIntMax,
               "{}: problem {} has more than 2^31-1 positions or taps per GEMM dimension", op, describe(p));
  STUNET_CHECK(p.K <= 65535 * 32 && p.C <= 65535 * 32 &&
                   static_cast<std::int64_t>(p.stride_d) * p.stride_h * p.stride_w <= 65535,
               "{}: problem {} exceeds the CUDA grid limits of the conv3d kernels", op, describe(p));
}

/// ceil(a / b) as a grid extent.
inline unsigned ceil_div(std::int64_t a, int b) { return static_cast<unsigned>((a + b - 1) / b); }

/// Queues y [N, K, Z, P, Q] = conv3d(x [N, C, D, H, W], w [K, C, T, R, S]) +
/// bias [K] (or none) on s; the tile by K (TallTile for K <= 32).
template <class T>
void fprop(const Conv3dProblem& p, const T* x, const T* w, const T* bias, T* y, cudaStream_t s) {
  auto launch = [&]<class Tile>() {
    const dim3 grid(ceil_div(cm::output_positions(p), Tile::BM), ceil_div(p.K, Tile::BN));
    conv3d_fprop_kernel<Tile, T><<<grid, cm::kThreads, 0, s>>>(p, x, w, bias, y);
    STUNET_CUDA_CHECK_LAUNCH(fmt::format("conv3d_fprop_kernel ({})", describe(p)).c_str());
  };
  if (cm::use_tall_tile(p.K)) launch.template operator()<cm::TallTile>();
  else launch.template operator()<cm::WideTile>();
}

/// Queues dx [N, C, D, H, W] from dy [N, K, Z, P, Q] and w on s: one launch,
/// blockIdx.z the stride phase; the tile by C.
template <class T> void dgrad(const Conv3dProblem& p, const T* dy, const T* w, T* dx, cudaStream_t s) {
  auto launch = [&]<class Tile>() {
    const int phases = cm::dgrad_phase_count(p);
    int max_m = 0;
    for (int i = 0; i < phases; ++i) max_m = std::max(max_m, cm::dgrad_phase(p, i).gemm_m);
    const dim3 grid(ceil_div(max_m, Tile::BM), ceil_div(p.C, Tile::BN), static_cast<unsigned>(phases));
    conv3d_dgrad_kernel<Tile, T><<<grid, cm::kThreads, 0, s>>>(p, dy, w, dx);
    STUNET_CUDA_CHECK_LAUNCH(fmt::format("conv3d_dgrad_kernel ({})", describe(p)).c_str());
  };
  if (cm::use_tall_tile(p.C)) launch.template operator()<cm::TallTile>();
  else launch.template operator()<cm::WideTile>();
}

/// Frees a scratch block when the launcher leaves, also by an exception.
/// The caching allocator is stream-ordered, so freeing right after queuing
/// the kernels that use the block is safe.
class ScratchBlock {
 public:
  ScratchBlock(std::size_t bytes, int device) : device_(device), ptr_(device_allocate(bytes, device)) {}
  ~ScratchBlock() { device_deallocate(ptr_, device_); }
  ScratchBlock(const ScratchBlock&) = delete;
  ScratchBlock& operator=(const ScratchBlock&) = delete;
  template <class U> U* as() const { return static_cast<U*>(ptr_); }

 private:
  int device_;
  void* ptr_;
};

/// Queues dw [K, C, T, R, S] from x and dy on the context stream of `device`:
/// the split-K GEMM into a float (double) scratch [splits, K, C*T*R*S] from
/// the caching allocator, then the ordered sum over splits into dw.
template <class T> void wgrad(const Conv3dProblem& p, const T* x, const T* dy, T* dw, int device) {
  using Acc = acc_t<T>;
  const cudaStream_t s = stream(device);
  const cm::SplitPlan plan = cm::wgrad_plan(p);
  const std::int64_t count = p.weight_numel();
  ScratchBlock scratch(static_cast<std::size_t>(plan.splits) * static_cast<std::size_t>(count) * sizeof(Acc), device);
  auto launch = [&]<class Tile>() {
    const dim3 grid(ceil_div(cm::filter_taps(p), Tile::BM), ceil_div(p.K, Tile::BN), static_cast<unsigned>(plan.splits));
    conv3d_wgrad_kernel<Tile, T><<<grid, cm::kThreads, 0, s>>>(p, plan, x, dy, scratch.as<Acc>());
    STUNET_CUDA_CHECK_LAUNCH(
        fmt::format("conv3d_wgrad_kernel ({}, {} splits of {})", describe(p), plan.splits, plan.chunk).c_str());
  };
  if (cm::use_tall_tile(p.K)) launch.template operator()<cm::TallTile>();
  else launch.template operator()<cm::WideTile>();
  conv3d_wgrad_reduce_kernel<T><<<grid_for(count), kBlock, 0, s>>>(scratch.as<Acc>(), count, plan.splits, dw);
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("conv3d_wgrad_reduce_kernel ({})", describe(p)).c_str());
}

/// Queues db [K] = sum of dy [N, K, Z, P, Q] over n and positions: per-chunk
/// block sums into a scratch [K, splits], then the ordered sum over chunks.
template <class T> void bgrad(const Conv3dProblem& p, const T* dy, T* db, int device) {
  using Acc = acc_t<T>;
  const cudaStream_t s = stream(device);
  const int length = cm::output_positions(p);
  const cm::SplitPlan plan = cm::bgrad_plan(p.K, length);
  ScratchBlock partial(static_cast<std::size_t>(plan.splits) * static_cast<std::size_t>(p.K) * sizeof(Acc), device);
  conv3d_bgrad_partial_kernel<T><<<dim3(static_cast<unsigned>(p.K), static_cast<unsigned>(plan.splits)),
                                   cm::kThreads, 0, s>>>(dy, p.K, static_cast<int>(p.output_spatial()), length, plan,
                                                         partial.as<Acc>());
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("conv3d_bgrad_partial_kernel ({})", describe(p)).c_str());
  conv3d_bgrad_final_kernel<T><<<ceil_div(p.K, kBlock), kBlock, 0, s>>>(partial.as<Acc>(), p.K, plan.splits, db);
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("conv3d_bgrad_final_kernel ({})", describe(p)).c_str());
}

// ---- table entries ----------------------------------------------------------------

/// CudaKernels::conv3d_fprop (see core/cuda_kernels.hpp); b may be null.
inline void fprop_entry(const Conv3dProblem& p, DType dtype, const void* x, const void* w, const void* b, void* y,
                        int device) {
  check_problem(p, "conv3d_fprop");
  STUNET_CHECK(x != nullptr && w != nullptr && y != nullptr, "conv3d_fprop: null input, weight or output ({})",
               describe(p));
  DeviceGuard guard(device);
  dispatch_cuda_float(dtype, "conv3d_fprop", [&]<class T>() {
    fprop<T>(p, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(b), static_cast<T*>(y),
             stream(device));
  });
}

/// CudaKernels::conv3d_dgrad.
inline void dgrad_entry(const Conv3dProblem& p, DType dtype, const void* dy, const void* w, void* dx, int device) {
  check_problem(p, "conv3d_dgrad");
  STUNET_CHECK(dy != nullptr && w != nullptr && dx != nullptr,
               "conv3d_dgrad: null output gradient, weight or input gradient ({})", describe(p));
  DeviceGuard guard(device);
  dispatch_cuda_float(dtype, "conv3d_dgrad", [&]<class T>() {
    dgrad<T>(p, static_cast<const T*>(dy), static_cast<const T*>(w), static_cast<T*>(dx), stream(device));
  });
}

/// CudaKernels::conv3d_wgrad (dw overwritten).
inline void wgrad_entry(const Conv3dProblem& p, DType dtype, const void* x, const void* dy, void* dw, int device) {
  check_problem(p, "conv3d_wgrad");
  STUNET_CHECK(x != nullptr && dy != nullptr && dw != nullptr,
               "conv3d_wgrad: null input, output gradient or weight gradient ({})", describe(p));
  DeviceGuard guard(device);
  dispatch_cuda_float(dtype, "conv3d_wgrad", [&]<class T>() {
    wgrad<T>(p, static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dw), device);
  });
}

/// CudaKernels::conv3d_bgrad.
inline void bgrad_entry(const Conv3dProblem& p, DType dtype, const void* dy, void* db, int device) {
  check_problem(p, "conv3d_bgrad");
  STUNET_CHECK(dy != nullptr && db != nullptr, "conv3d_bgrad: null output gradient or bias gradient ({})",
               describe(p));
  DeviceGuard guard(device);
  dispatch_cuda_float(dtype, "conv3d_bgrad",
                      [&]<class T>() { bgrad<T>(p, static_cast<const T*>(dy), static_cast<T*>(db), device); });
}

}  // namespace conv3d_detail

/// Installs this family's entries in the kernel table.
inline void register_conv3d(CudaKernels& t) {
  t.conv3d_fprop = &conv3d_detail::fprop_entry;
  t.conv3d_dgrad = &conv3d_detail::dgrad_entry;
  t.conv3d_wgrad = &conv3d_detail::wgrad_entry;
  t.conv3d_bgrad = &conv3d_detail::bgrad_entry;
}

}  // namespace stunet::cuda
