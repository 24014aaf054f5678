#pragma once
/// \file
/// CUDA kernels of instance normalisation over dense [planes, S] buffers
/// (plane = one (n, c) pair, S = D*H*W voxels), mirroring
/// cpu/norm.hpp: two-pass statistics (mean, then the centred variance),
/// the affine forward, the backward's per-plane sums (sum_gx already
/// multiplied by rstd) and the input gradient, and the reduction of per-plane
/// sums over the batch for the weight and bias gradients.
///
/// Statistics and sums are in acc_t<T> (float; double for double) and stored
/// as such: float arrays, double arrays for f64. Reductions use the split of
/// norm_math.hpp: partial[plane, chunk] per block (CUB's fixed block tree),
/// then one block per plane combining its partials in a fixed order. No
/// atomics: every result is bit-reproducible, and both a few 2M-voxel planes
/// (batch 1 at 128^3: 32 planes x 256 chunks) and many 64-voxel planes
/// (1024 planes x 1 chunk) fill the GPU.

#include <cub/block/block_reduce.cuh>

#include <cstdint>

#include <fmt/format.h>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/cuda/check.cuh"
#include "stunet/cuda/launch.cuh"
#include "stunet/cuda/norm_math.hpp"
#include "stunet/cuda/tensor_ops.cuh"

namespace stunet::cuda {

namespace norm_detail {

using tensor_ops_detail::aligned16;
using tensor_ops_detail::Pack;

/// Loads the group of n <= V elements at row[i0]: one 16-byte load when the
/// row is aligned and the group full, else element by element (same values,
/// same order for the caller).
template <class T, int V> __device__ inline void load_group(const T* row, std::int64_t i0, int n, bool vec, T (&v)[V]) {
  if (vec && n == V) {
    const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(row + i0);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = p.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < n) v[k] = row[i0 + k];
  }
}

/// Stores the group of n <= V elements at row[i0] (see load_group).
template <class T, int V> __device__ inline void store_group(T* row, std::int64_t i0, int n, bool vec, const T (&v)[V]) {
  if (vec && n == V) {
    Pack<T, V> p;
#pragma unroll
    for (int k = 0; k < V; ++k) p.v[k] = v[k];
    *reinterpret_cast<Pack<T, V>*>(row + i0) = p;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < n) row[i0 + k] = v[k];
  }
}

/// partial[block] over chunk (p, k) = blockIdx.x = p * nch + k: the plane's
/// sum (Centred = false) or its sum of (x - mean[p])^2 (Centred = true).
template <bool Centred, class T>
__global__ void __launch_bounds__(kNormThreads)
    stats_partials_kernel(const T* __restrict__ x, std::int64_t S, std::int64_t nch, const acc_t<T>* mean,
                          acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  constexpr int V = kNormVec<T>;
  const std::int64_t p = blockIdx.x / nch, k = blockIdx.x - p * nch;
  const T* row = x + p * S;
  const std::int64_t end = norm_chunk_end(S, k);
  const bool vec = aligned16(row);
  A m = A(0);
  if constexpr (Centred) m = mean[p];
  A acc = A(0);
  for (std::int64_t j = norm_chunk_begin(k) / V + threadIdx.x; j * V < end; j += kNormThreads) {
    const std::int64_t i0 = j * V;
    const int n = norm_group_size(i0, end, V);
    T v[V];
    load_group(row, i0, n, vec, v);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e < n) {
        if constexpr (Centred) acc += norm_centred_square<A>(load_as<A>(v[e]), m);
        else acc += load_as<A>(v[e]);
      }
    }
  }
  using Reduce = cub::BlockReduce<A, kNormThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const A s = Reduce(tmp).Sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/// The fixed per-plane combination of partial[p, 0 .. nch): thread t adds
/// chunks t, t + kNormThreads, ... in order, then CUB's tree. Returns the
/// total in thread 0 (undefined elsewhere).
template <class A> __device__ inline A plane_total(const A* partial, std::int64_t p, std::int64_t nch) {
  A acc = A(0);
  for (std::int64_t k = threadIdx.x; k < nch; k += kNormThreads) acc += partial[p * nch + k];
  using Reduce = cub::BlockReduce<A, kNormThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  return Reduce(tmp).Sum(acc);
}

/// One block per plane: mean[p] (Centred = false) or rstd[p] (Centred = true).
template <bool Centred, class A>
__global__ void __launch_bounds__(kNormThreads)
    stats_finalize_kernel(const A* partial, std::int64_t S, std::int64_t nch, double eps, A* out) {
  const std::int64_t p = blockIdx.x;
  const A total = plane_total(partial, p, nch);
  if (threadIdx.x == 0) out[p] = Centred ? norm_rstd<A>(total, S, eps) : norm_mean<A>(total, S);
}

/// y = (x - mean[p]) * rstd[p] * weight[c] + bias[c] over chunk (p, k) = blockIdx.x.
template <class T>
__global__ void __launch_bounds__(kNormThreads)
    forward_kernel(const T* __restrict__ x, const acc_t<T>* mean, const acc_t<T>* rstd, const T* weight,
                   const T* bias, T* __restrict__ y, std::int64_t C, std::int64_t S, std::int64_t nch) {
  using A = acc_t<T>;
  constexpr int V = kNormVec<T>;
  const std::int64_t p = blockIdx.x / nch, k = blockIdx.x - p * nch, c = p % C;
  const A m = mean[p];
  const A scale = rstd[p] * (weight ? load_as<A>(weight[c]) : A(1));
  const A shift = bias ? load_as<A>(bias[c]) : A(0);
  const T* xr = x + p * S;
  T* yr = y + p * S;
  const std::int64_t end = norm_chunk_end(S, k);
  const bool vec = aligned16(xr) && aligned16(yr);
  for (std::int64_t j = norm_chunk_begin(k) / V + threadIdx.x; j * V < end; j += kNormThreads) {
    const std::int64_t i0 = j * V;
    const int n = norm_group_size(i0, end, V);
    T v[V];
    load_group(xr, i0, n, vec, v);
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (e < n) v[e] = store_as<T>(norm_forward_value<A>(load_as<A>(v[e]), m, scale, shift));
    store_group(yr, i0, n, vec, v);
  }
}

/// pg[block] = sum of g, pgx[block] = sum of g * (x - mean[p]) over chunk (p, k) = blockIdx.x.
template <class T>
__global__ void __launch_bounds__(kNormThreads)
    backward_partials_kernel(const T* __restrict__ x, const T* __restrict__ g, const acc_t<T>* mean, std::int64_t S,
                             std::int64_t nch, acc_t<T>* __restrict__ pg, acc_t<T>* __restrict__ pgx) {
  using A = acc_t<T>;
  constexpr int V = kNormVec<T>;
  const std::int64_t p = blockIdx.x / nch, k = blockIdx.x - p * nch;
  const T* xr = x + p * S;
  const T* gr = g + p * S;
  const std::int64_t end = norm_chunk_end(S, k);
  const bool vec = aligned16(xr) && aligned16(gr);
  const A m = mean[p];
  A sg = A(0), sgx = A(0);
  for (std::int64_t j = norm_chunk_begin(k) / V + threadIdx.x; j * V < end; j += kNormThreads) {
    const std::int64_t i0 = j * V;
    const int n = norm_group_size(i0, end, V);
    T xv[V], gv[V];
    load_group(xr, i0, n, vec, xv);
    load_group(gr, i0, n, vec, gv);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e < n) {
        const A gi = load_as<A>(gv[e]);
        sg += gi;
        sgx += norm_gx_term<A>(gi, load_as<A>(xv[e]), m);
      }
    }
  }
  using Reduce = cub::BlockReduce<A, kNormThreads>;
  __shared__ typename Reduce::TempStorage tmp_g, tmp_gx;
  const A tg = Reduce(tmp_g).Sum(sg);
  const A tgx = Reduce(tmp_gx).Sum(sgx);
  if (threadIdx.x == 0) {
    pg[blockIdx.x] = tg;
    pgx[blockIdx.x] = tgx;
  }
}

/// One block per plane: sum_g[p], and sum_gx[p] times rstd[p] (as the CPU).
template <class A>
__global__ void __launch_bounds__(kNormThreads)
    backward_finalize_kernel(const A* pg, const A* pgx, const A* rstd, std::int64_t nch, A* sum_g, A* sum_gx) {
  const std::int64_t p = blockIdx.x;
  const A tg = plane_total(pg, p, nch);
  __syncthreads();  // plane_total's shared storage is reused by the second call
  const A tgx = plane_total(pgx, p, nch);
  if (threadIdx.x == 0) {
    sum_g[p] = tg;
    sum_gx[p] = tgx * rstd[p];
  }
}

/// dx = a * (g - mg - (x - mean) * cx) over chunk (p, k) = blockIdx.x (see NormBackwardCoef).
template <class T>
__global__ void __launch_bounds__(kNormThreads)
    backward_input_kernel(const T* __restrict__ x, const T* __restrict__ g, const acc_t<T>* mean,
                          const acc_t<T>* rstd, const T* weight, const acc_t<T>* sum_g, const acc_t<T>* sum_gx,
                          T* __restrict__ dx, std::int64_t C, std::int64_t S, std::int64_t nch) {
  using A = acc_t<T>;
  constexpr int V = kNormVec<T>;
  const std::int64_t p = blockIdx.x / nch, k = blockIdx.x - p * nch, c = p % C;
  const A m = mean[p];
  const NormBackwardCoef<A> coef =
      norm_backward_coef<A>(rstd[p], weight ? load_as<A>(weight[c]) : A(1), sum_g[p], sum_gx[p], S);
  const T* xr = x + p * S;
  const T* gr = g + p * S;
  T* dr = dx + p * S;
  const std::int64_t end = norm_chunk_end(S, k);
  const bool vec = aligned16(xr) && aligned16(gr) && aligned16(dr);
  for (std::int64_t j = norm_chunk_begin(k) / V + threadIdx.x; j * V < end; j += kNormThreads) {
    const std::int64_t i0 = j * V;
    const int n = norm_group_size(i0, end, V);
    T xv[V], gv[V];
    load_group(xr, i0, n, vec, xv);
    load_group(gr, i0, n, vec, gv);
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (e < n) xv[e] = store_as<T>(norm_backward_value<A>(load_as<A>(xv[e]), load_as<A>(gv[e]), m, coef));
    store_group(dr, i0, n, vec, xv);
  }
}

/// out[c] = sum_n per_plane[n * C + c] in order n = 0, 1, ...
template <class T>
__global__ void __launch_bounds__(kBlock)
    sum_planes_kernel(const acc_t<T>* per_plane, T* out, std::int64_t N, std::int64_t C) {
  using A = acc_t<T>;
  for (std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    A acc = A(0);
    for (std::int64_t n = 0; n < N; ++n) acc += per_plane[n * C + c];
    out[c] = store_as<T>(acc);
  }
}

/// Blocks of the (plane, chunk) kernels: planes * chunks, which must fit a grid.
inline unsigned chunk_grid(std::int64_t planes, std::int64_t S, const char* name) {
  const std::int64_t blocks = planes * norm_chunks(S);
  STUNET_CHECK(blocks <= 0x7fffffffLL, "{}: {} planes of {} voxels need {} blocks, more than a CUDA grid holds", name,
               planes, S, blocks);
  return static_cast<unsigned>(blocks);
}

/// Plane count as a grid of one block per plane.
inline unsigned plane_grid(std::int64_t planes, const char* name) {
  STUNET_CHECK(planes <= 0x7fffffffLL, "{}: {} planes exceed a CUDA grid", name, planes);
  return static_cast<unsigned>(planes);
}

}  // namespace norm_detail

/// mean[p], rstd[p] = 1 / sqrt(biased var + eps) of each plane of x
/// [planes, S] (dense), two passes in acc_t<T>; mean, rstd: device arrays
/// [planes] of float (double for f64). An empty plane gives NaN, as the CPU.
inline void instance_norm_stats(DType dtype, const void* x, std::int64_t planes, std::int64_t S, double eps,
                                void* mean, void* rstd, int device) {
  using namespace norm_detail;
  if (planes <= 0) return;
  DeviceGuard guard(device);
  const cudaStream_t s = stream(device);
  const std::int64_t nch = norm_chunks(S);
  const unsigned chunks = chunk_grid(planes, S, "instance_norm_stats");
  const unsigned grid = plane_grid(planes, "instance_norm_stats");
  dispatch_cuda_float(dtype, "instance_norm_stats", [&]<class T>() {
    using A = acc_t<T>;
    const T* xp = static_cast<const T*>(x);
    A* m = static_cast<A*>(mean);
    A* r = static_cast<A*>(rstd);
    // One scratch array for both passes: the second partial pass is queued after the mean's finalize.
    const tensor_ops_detail::DeviceScratch scratch(sizeof(A) * static_cast<std::size_t>(chunks), device);
    A* partial = scratch.as<A>();
    const std::string what = fmt::format("instance_norm_stats {} [{} planes, {} voxels, {} chunks]", dtype, planes,
                                         S, nch);
    if (chunks > 0) stats_partials_kernel<false><<<chunks, kNormThreads, 0, s>>>(xp, S, nch, m, partial);
    STUNET_CUDA_CHECK_LAUNCH(what.c_str());
    stats_finalize_kernel<false><<<grid, kNormThreads, 0, s>>>(partial, S, nch, eps, m);
    STUNET_CUDA_CHECK_LAUNCH(what.c_str());
    if (chunks > 0) stats_partials_kernel<true><<<chunks, kNormThreads, 0, s>>>(xp, S, nch, m, partial);
    STUNET_CUDA_CHECK_LAUNCH(what.c_str());
    stats_finalize_kernel<true><<<grid, kNormThreads, 0, s>>>(partial, S, nch, eps, r);
    STUNET_CUDA_CHECK_LAUNCH(what.c_str());
  });
}

/// y = (x - mean[p]) * rstd[p] * weight[c] + bias[c], p = n * C + c; x, y:
/// [planes, S] dense; weight, bias: [C] of dtype or null (1 / 0).
inline void instance_norm_forward(DType dtype, const void* x, const void* mean, const void* rstd, const void* weight,
                                  const void* bias, void* y, std::int64_t planes, std::int64_t C, std::int64_t S,
                                  int device) {
  using namespace norm_detail;
  if (planes <= 0 || S <= 0) return;
  DeviceGuard guard(device);
  const cudaStream_t s = stream(device);
  const unsigned chunks = chunk_grid(planes, S, "instance_norm_forward");
  dispatch_cuda_float(dtype, "instance_norm_forward", [&]<class T>() {
    using A = acc_t<T>;
    forward_kernel<<<chunks, kNormThreads, 0, s>>>(static_cast<const T*>(x), static_cast<const A*>(mean),
                                                   static_cast<const A*>(rstd), static_cast<const T*>(weight),
                                                   static_cast<const T*>(bias), static_cast<T*>(y), C, S,
                                                   norm_chunks(S));
  });
  STUNET_CUDA_CHECK_LAUNCH(
      fmt::format("instance_norm_forward {} [{} planes, C = {}, {} voxels]", dtype, planes, C, S).c_str());
}

/// sum_g[p] = sum g, sum_gx[p] = rstd[p] * sum g * (x - mean[p]) over each
/// plane (acc_t arrays [planes]); x, g: [planes, S] dense.
inline void instance_norm_backward_sums(DType dtype, const void* x, const void* g, const void* mean, const void* rstd,
                                        std::int64_t planes, std::int64_t S, void* sum_g, void* sum_gx, int device) {
  using namespace norm_detail;
  if (planes <= 0) return;
  DeviceGuard guard(device);
  const cudaStream_t s = stream(device);
  const std::int64_t nch = norm_chunks(S);
  const unsigned chunks = chunk_grid(planes, S, "instance_norm_backward_sums");
  const unsigned grid = plane_grid(planes, "instance_norm_backward_sums");
  dispatch_cuda_float(dtype, "instance_norm_backward_sums", [&]<class T>() {
    using A = acc_t<T>;
    const tensor_ops_detail::DeviceScratch scratch(2 * sizeof(A) * static_cast<std::size_t>(chunks), device);
    A* pg = scratch.as<A>();
    A* pgx = pg + chunks;
    const std::string what = fmt::format("instance_norm_backward_sums {} [{} planes, {} voxels, {} chunks]", dtype,
                                         planes, S, nch);
    if (chunks > 0)
      backward_partials_kernel<<<chunks, kNormThreads, 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(g),
                                                               static_cast<const A*>(mean), S, nch, pg, pgx);
    STUNET_CUDA_CHECK_LAUNCH(what.c_str());
    backward_finalize_kernel<<<grid, kNormThreads, 0, s>>>(pg, pgx, static_cast<const A*>(rstd), nch,
                                                           static_cast<A*>(sum_g), static_cast<A*>(sum_gx));
    STUNET_CUDA_CHECK_LAUNCH(what.c_str());
  });
}

/// dx = w[c] * rstd * (g - sum_g / S - xhat * sum_gx / S) with xhat = (x - mean) * rstd,
/// as cpu::instance_norm_backward_input; weight may be null (1). x, g, dx: [planes, S] dense.
inline void instance_norm_backward_input(DType dtype, const void* x, const void* g, const void* mean,
                                         const void* rstd, const void* weight, const void* sum_g, const void* sum_gx,
                                         void* dx, std::int64_t planes, std::int64_t C, std::int64_t S, int device) {
  using namespace norm_detail;
  if (planes <= 0 || S <= 0) return;
  DeviceGuard guard(device);
  const cudaStream_t s = stream(device);
  const unsigned chunks = chunk_grid(planes, S, "instance_norm_backward_input");
  dispatch_cuda_float(dtype, "instance_norm_backward_input", [&]<class T>() {
    using A = acc_t<T>;
    backward_input_kernel<<<chunks, kNormThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(g), static_cast<const A*>(mean), static_cast<const A*>(rstd),
        static_cast<const T*>(weight), static_cast<const A*>(sum_g), static_cast<const A*>(sum_gx),
        static_cast<T*>(dx), C, S, norm_chunks(S));
  });
  STUNET_CUDA_CHECK_LAUNCH(
      fmt::format("instance_norm_backward_input {} [{} planes, C = {}, {} voxels]", dtype, planes, C, S).c_str());
}

/// out[c] (dtype, [C]) = sum over n of per_plane[n * C + c] (acc_t array
/// [N * C]): the weight and bias gradients from the per-plane sums.
inline void sum_planes_over_batch(DType dtype, const void* per_plane, void* out, std::int64_t N, std::int64_t C,
                                  int device) {
  if (C <= 0) return;
  DeviceGuard guard(device);
  const cudaStream_t s = stream(device);
  dispatch_cuda_float(dtype, "sum_planes_over_batch", [&]<class T>() {
    using A = acc_t<T>;
    norm_detail::sum_planes_kernel<<<grid_for(C), kBlock, 0, s>>>(static_cast<const A*>(per_plane),
                                                                  static_cast<T*>(out), N, C);
  });
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("sum_planes_over_batch {} [N = {}, C = {}]", dtype, N, C).c_str());
}

/// Installs this family's entries in the kernel table.
inline void register_norm(CudaKernels& t) {
  t.instance_norm_stats = &instance_norm_stats;
  t.instance_norm_forward = &instance_norm_forward;
  t.instance_norm_backward_sums = &instance_norm_backward_sums;
  t.instance_norm_backward_input = &instance_norm_backward_input;
  t.sum_planes_over_batch = &sum_planes_over_batch;
}

}  // namespace stunet::cuda
