#pragma once
/// \file
/// CUDA kernels of the tensor plumbing: strided (converting) copies, fills,
/// axpy and scaling, deterministic sums, and the channel argmax.
///
/// Index math and reduction structure live in tensor_ops_math.hpp so that the
/// host tests can run them; this file holds the kernels, their launchers and
/// the registration in the kernel table (core/cuda_kernels.hpp).
///
/// Every launch goes to stream(device) under a DeviceGuard. The elementwise
/// helpers in tensor_ops_detail (16-byte packs, map kernels, int32 index
/// selection) are shared with elementwise.cuh.

#include <cub/block/block_reduce.cuh>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <fmt/format.h>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cuda/allocator.cuh"
#include "stunet/cuda/check.cuh"
#include "stunet/cuda/launch.cuh"
#include "stunet/cuda/tensor_ops_math.hpp"

namespace stunet::cuda {

namespace tensor_ops_detail {

/// V elements of T moved as one 16-byte (or smaller) access.
template <class T, int V> struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

/// Elements per 16-byte access: 4 floats, 2 doubles, 8 halves.
template <class T> inline constexpr int kVec = static_cast<int>(16 / sizeof(T));

__host__ __device__ inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

/// Most threads any grid_for() grid runs: a grid-stride loop's index never
/// exceeds total + this.
inline constexpr std::int64_t kMaxGridThreads = 65535LL * 32 * kBlock;

/// Whether a grid-stride loop over `total` elements can count in int32
/// (including the last stride step past the end).
inline bool index_fits_int32(std::int64_t total) {
  return total + kMaxGridThreads <= static_cast<std::int64_t>(std::numeric_limits<std::int32_t>::max());
}

/// Calls f.template operator()<B>() with B the unsigned integer of
/// dtype_size(t) bytes: same-dtype copies and fills move bit patterns (NaN
/// payloads and negative zeros survive), one kernel per element size instead
/// of one per dtype.
template <class F> void dispatch_bits(DType t, F&& f) {
  switch (dtype_size(t)) {
    case 1: f.template operator()<std::uint8_t>(); return;
    case 2: f.template operator()<std::uint16_t>(); return;
    case 4: f.template operator()<std::uint32_t>(); return;
    case 8: f.template operator()<std::uint64_t>(); return;
    default: break;
  }
  STUNET_FAIL("CUDA copy: dtype {} has no bit-pattern type", t);
}

/// Scratch device memory from the caching allocator, returned when it goes
/// out of scope (also when a launch check throws). The allocator is
/// stream-ordered, so freeing right after queueing the kernels that use it is safe.
class DeviceScratch {
 public:
  DeviceScratch(std::size_t bytes, int device) : ptr_(device_allocate(bytes, device)), device_(device) {}
  ~DeviceScratch() { device_deallocate(ptr_, device_); }
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  template <class T> T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_;
  int device_;
};

/// y[i] = op(x[i]) for i < n. x and y may be the same buffer (in-place
/// ops): each element is read and written by one thread. V > 1 needs both
/// pointers 16-byte aligned; the last n % V elements go one by one.
template <int V, class T, class Op>
__global__ void __launch_bounds__(kBlock) map1_kernel(const T* x, T* y, std::int64_t n, Op op) {
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t groups = n / V;
  for (std::int64_t j = first; j < groups; j += stride) {
    const Pack<T, V> a = reinterpret_cast<const Pack<T, V>*>(x)[j];
    Pack<T, V> r;
#pragma unroll
    for (int k = 0; k < V; ++k) r.v[k] = op(a.v[k]);
    reinterpret_cast<Pack<T, V>*>(y)[j] = r;
  }
  for (std::int64_t i = groups * V + first; i < n; i += stride) y[i] = op(x[i]);
}

/// out[i] = op(a[i], b[i]) for i < n; out may alias a or b (see map1_kernel).
template <int V, class T, class Op>
__global__ void __launch_bounds__(kBlock) map2_kernel(const T* a, const T* b, T* out, std::int64_t n, Op op) {
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t groups = n / V;
  for (std::int64_t j = first; j < groups; j += stride) {
    const Pack<T, V> pa = reinterpret_cast<const Pack<T, V>*>(a)[j];
    const Pack<T, V> pb = reinterpret_cast<const Pack<T, V>*>(b)[j];
    Pack<T, V> r;
#pragma unroll
    for (int k = 0; k < V; ++k) r.v[k] = op(pa.v[k], pb.v[k]);
    reinterpret_cast<Pack<T, V>*>(out)[j] = r;
  }
  for (std::int64_t i = groups * V + first; i < n; i += stride) out[i] = op(a[i], b[i]);
}

/// Launches map1_kernel on the current device's stream(device): 16-byte packs
/// when both buffers allow it (the caching allocator's blocks always do).
template <class T, class Op>
void launch_map1(const T* x, T* y, std::int64_t n, Op op, int device, const char* name) {
  if (n <= 0) return;
  constexpr int V = kVec<T>;
  const cudaStream_t s = stream(device);
  if (aligned16(x) && aligned16(y)) map1_kernel<V><<<grid_for((n + V - 1) / V), kBlock, 0, s>>>(x, y, n, op);
  else map1_kernel<1><<<grid_for(n), kBlock, 0, s>>>(x, y, n, op);
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("{} (n = {})", name, n).c_str());
}

/// Launches map2_kernel (see launch_map1).
template <class T, class Op>
void launch_map2(const T* a, const T* b, T* out, std::int64_t n, Op op, int device, const char* name) {
  if (n <= 0) return;
  constexpr int V = kVec<T>;
  const cudaStream_t s = stream(device);
  if (aligned16(a) && aligned16(b) && aligned16(out))
    map2_kernel<V><<<grid_for((n + V - 1) / V), kBlock, 0, s>>>(a, b, out, n, op);
  else map2_kernel<1><<<grid_for(n), kBlock, 0, s>>>(a, b, out, n, op);
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("{} (n = {})", name, n).c_str());
}

/// One element converted between storage types exactly as the host's
/// from_double<TD>(to_double(v)) (core/dtype.hpp): through double, then to
/// float first for the 16-bit types, truncation toward zero for integers.
template <class TD, class TS> __device__ inline TD convert_element(TS v) {
  if constexpr (std::is_same_v<TD, TS>) return v;
  else return store_as<TD>(load_as<double>(v));
}

/// dst[view 0 offset] = convert(src[view 1 offset]) for every linear index.
template <class TD, class TS, class I>
__global__ void __launch_bounds__(kBlock)
    strided_copy_kernel(TD* dst, const TS* src, StridedIndex<2> ix, I total) {
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I i = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); i < total;
       i += stride) {
    std::int64_t off[2];
    strided_offsets<I, 2>(ix, i, off);
    dst[off[0]] = convert_element<TD>(src[off[1]]);
  }
}

/// Every element of the strided view = value (a bit pattern of the dtype).
template <class B, class I>
__global__ void __launch_bounds__(kBlock) fill_kernel(B* dst, StridedIndex<1> ix, I total, B value) {
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I i = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); i < total;
       i += stride) {
    std::int64_t off[1];
    strided_offsets<I, 1>(ix, i, off);
    dst[off[0]] = value;
  }
}

/// Per block: the sum (or sum of squares) in double of the elements
/// i = block * kSumThreads + thread + k * (grid * kSumThreads), each thread's
/// share added in increasing i, then CUB's fixed tree over the block.
template <bool Squares, class T>
__global__ void __launch_bounds__(kSumThreads) sum_partials_kernel(const T* x, std::int64_t n, double* partial) {
  double acc = 0.0;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kSumThreads;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kSumThreads + threadIdx.x; i < n; i += stride)
    acc += sum_term<Squares>(load_as<double>(x[i]));
  using Reduce = cub::BlockReduce<double, kSumThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const double s = Reduce(tmp).Sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/// out[0] = the sum of partial[0 .. count) (count <= Threads), one block:
/// thread t holds partial t (or 0), then CUB's fixed tree. (A template, as
/// every kernel here: header definitions must be inline for the ODR.)
template <int Threads>
__global__ void __launch_bounds__(Threads) sum_final_kernel(const double* partial, int count, double* out) {
  const int t = static_cast<int>(threadIdx.x);
  const double v = t < count ? partial[t] : 0.0;
  using Reduce = cub::BlockReduce<double, Threads>;
  __shared__ typename Reduce::TempStorage tmp;
  const double s = Reduce(tmp).Sum(v);
  if (t == 0) out[0] = s;
}

/// out[n * V + v] = argmax_c x[(n * C + c) * V + v]: one thread per voxel,
/// the channel loop reads one plane after another (coalesced along v).
template <class T>
__global__ void __launch_bounds__(kBlock)
    argmax_channels_kernel(const T* x, std::int32_t* out, std::int64_t N, std::int64_t C, std::int64_t V) {
  using A = acc_t<T>;
  const std::int64_t total = N * V;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const std::int64_t n = i / V, v = i - n * V;
    const T* p = x + n * C * V + v;
    A best = load_as<A>(p[0]);
    std::int32_t arg = 0;
    for (std::int64_t c = 1; c < C; ++c) {
      const A cand = load_as<A>(p[c * V]);
      if (argmax_takes(cand, best)) {
        best = cand;
        arg = static_cast<std::int32_t>(c);
      }
    }
    out[i] = arg;
  }
}

/// out = a + alpha * b in acc_t<T>.
template <class T> struct AxpyOp {
  acc_t<T> alpha;
  __device__ T operator()(T a, T b) const {
    using A = acc_t<T>;
    return store_as<T>(axpy_value<A>(load_as<A>(a), load_as<A>(b), alpha));
  }
};

/// out = s * x in acc_t<T>.
template <class T> struct ScaleOp {
  acc_t<T> s;
  __device__ T operator()(T x) const {
    using A = acc_t<T>;
    return store_as<T>(s * load_as<A>(x));
  }
};

/// sum / sum_squares: the partial pass, the one-block final pass, the result
/// copied to the host (which waits for it).
template <bool Squares> double sum_impl(DType dtype, const void* x, std::int64_t n, int device, const char* name) {
  if (n <= 0) return 0.0;
  DeviceGuard guard(device);
  const cudaStream_t s = stream(device);
  const int blocks = sum_blocks(n);
  const DeviceScratch buffer(sizeof(double) * static_cast<std::size_t>(blocks + 1), device);
  double* scratch = buffer.as<double>();
  dispatch_cuda_float(dtype, name, [&]<class T>() {
    sum_partials_kernel<Squares><<<blocks, kSumThreads, 0, s>>>(static_cast<const T*>(x), n, scratch);
  });
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("{} partials ({} elements of {}, {} blocks)", name, n, dtype, blocks).c_str());
  sum_final_kernel<kSumMaxBlocks><<<1, kSumMaxBlocks, 0, s>>>(scratch, blocks, scratch + blocks);
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("{} final pass ({} partials)", name, blocks).c_str());
  double result = 0.0;
  STUNET_CUDA_CHECK(cudaMemcpyAsync(&result, scratch + blocks, sizeof(double), cudaMemcpyDeviceToHost, s));
  synchronize(device);
  return result;
}

}  // namespace tensor_ops_detail

/// dst = convert(src) over two strided views of one shape (the Loop5 of
/// detail::pad_to_5: extents ld.n == ls.n, strides in elements, possibly
/// negative or zero on the source). Both pointers include their storage
/// offsets; dtypes are any of f32/f64/f16/bf16/i64/i32/u8. Dense views of one
/// dtype become one cudaMemcpyAsync; otherwise one kernel over the collapsed
/// index space (see StridedIndex).
inline void strided_copy(void* dst, DType dst_dtype, const stunet::detail::Loop5& ld, const void* src, DType src_dtype,
                         const stunet::detail::Loop5& ls, int device) {
  using namespace tensor_ops_detail;
  std::int64_t total = 1;
  for (int d = 0; d < 5; ++d) total *= ld.n[d];
  if (total <= 0) return;
  const std::int64_t* strides[2] = {ld.s, ls.s};
  const StridedIndex<2> ix = collapse_strided<2>(ld.n, strides);
  DeviceGuard guard(device);
  const cudaStream_t s = stream(device);
  const unsigned grid = grid_for(total);
  if (dst_dtype == src_dtype) {
    if (strided_is_dense(ix)) {
      STUNET_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(total) * dtype_size(dst_dtype),
                                        cudaMemcpyDeviceToDevice, s));
      return;
    }
    dispatch_bits(dst_dtype, [&]<class B>() {
      if (index_fits_int32(total))
        strided_copy_kernel<B, B, std::int32_t>
            <<<grid, kBlock, 0, s>>>(static_cast<B*>(dst), static_cast<const B*>(src), ix,
                                     static_cast<std::int32_t>(total));
      else
        strided_copy_kernel<B, B, std::int64_t>
            <<<grid, kBlock, 0, s>>>(static_cast<B*>(dst), static_cast<const B*>(src), ix, total);
    });
  } else {
    // Conversions are mostly dense (to(dtype)): rank 1 decodes without a
    // division, so one int64 kernel per dtype pair is enough.
    dispatch_cuda_all(dst_dtype, "strided_copy", [&]<class TD>() {
      dispatch_cuda_all(src_dtype, "strided_copy", [&]<class TS>() {
        if constexpr (!std::is_same_v<TD, TS>)
          strided_copy_kernel<TD, TS, std::int64_t>
              <<<grid, kBlock, 0, s>>>(static_cast<TD*>(dst), static_cast<const TS*>(src), ix, total);
      });
    });
  }
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("strided_copy {} -> {} ({} elements, collapsed rank {})", src_dtype,
                                       dst_dtype, total, ix.rank)
                               .c_str());
}

/// Every element of the strided view (dst includes its offset) = value,
/// converted to dtype as the host's from_double.
inline void fill(void* dst, DType dtype, const stunet::detail::Loop5& loop, double value, int device) {
  using namespace tensor_ops_detail;
  std::int64_t total = 1;
  for (int d = 0; d < 5; ++d) total *= loop.n[d];
  if (total <= 0) return;
  const std::int64_t* strides[1] = {loop.s};
  const StridedIndex<1> ix = collapse_strided<1>(loop.n, strides);
  // The value's bit pattern, converted once on the host.
  std::uint64_t pattern = 0;
  dispatch_cuda_all(dtype, "fill", [&]<class T>() {
    const T v = store_as<T>(value);
    std::memcpy(&pattern, &v, sizeof(T));
  });
  DeviceGuard guard(device);
  const cudaStream_t s = stream(device);
  if (pattern == 0 && strided_is_dense(ix)) {
    STUNET_CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<std::size_t>(total) * dtype_size(dtype), s));
    return;
  }
  dispatch_bits(dtype, [&]<class B>() {
    B bits;
    std::memcpy(&bits, &pattern, sizeof(B));  // little-endian: the low bytes hold the value
    if (index_fits_int32(total))
      fill_kernel<B, std::int32_t>
          <<<grid_for(total), kBlock, 0, s>>>(static_cast<B*>(dst), ix, static_cast<std::int32_t>(total), bits);
    else fill_kernel<B, std::int64_t><<<grid_for(total), kBlock, 0, s>>>(static_cast<B*>(dst), ix, total, bits);
  });
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("fill {} ({} elements, collapsed rank {})", dtype, total, ix.rank).c_str());
}

/// out[i] = a[i] + alpha * b[i], i < n, in acc_t (float; double for f64).
/// out may be a (gradient accumulation).
inline void add(DType dtype, const void* a, const void* b, double alpha, void* out, std::int64_t n, int device) {
  DeviceGuard guard(device);
  dispatch_cuda_float(dtype, "add", [&]<class T>() {
    tensor_ops_detail::launch_map2(static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(out), n,
                                   tensor_ops_detail::AxpyOp<T>{static_cast<acc_t<T>>(alpha)}, device, "add");
  });
}

/// out[i] = s * x[i], i < n; out may be x.
inline void scale(DType dtype, const void* x, double s, void* out, std::int64_t n, int device) {
  DeviceGuard guard(device);
  dispatch_cuda_float(dtype, "scale", [&]<class T>() {
    tensor_ops_detail::launch_map1(static_cast<const T*>(x), static_cast<T*>(out), n,
                                   tensor_ops_detail::ScaleOp<T>{static_cast<acc_t<T>>(s)}, device, "scale");
  });
}

/// sum_i x[i] over a dense [n] buffer, in double, with a reduction tree that
/// depends on n only (bit-identical across calls and GPUs). Synchronises.
inline double sum(DType dtype, const void* x, std::int64_t n, int device) {
  return tensor_ops_detail::sum_impl<false>(dtype, x, n, device, "sum");
}

/// sum_i x[i]^2 in double (NaN/Inf when an element is), deterministic as sum(). Synchronises.
inline double sum_squares(DType dtype, const void* x, std::int64_t n, int device) {
  return tensor_ops_detail::sum_impl<true>(dtype, x, n, device, "sum_squares");
}

/// out [N, V] (int32) = argmax over c of x [N, C, V]; the first maximum wins
/// and NaN counts as the maximum (torch.argmax). C must be positive.
inline void argmax_channels(DType dtype, const void* x, std::int32_t* out, std::int64_t N, std::int64_t C,
                            std::int64_t V, int device) {
  if (N * V <= 0) return;
  STUNET_CHECK(C > 0, "argmax_channels: no channels to choose from (x [{}, {}, {}])", N, C, V);
  DeviceGuard guard(device);
  const cudaStream_t s = stream(device);
  dispatch_cuda_float(dtype, "argmax_channels", [&]<class T>() {
    tensor_ops_detail::argmax_channels_kernel<<<grid_for(N * V), kBlock, 0, s>>>(static_cast<const T*>(x), out, N,
                                                                                  C, V);
  });
  STUNET_CUDA_CHECK_LAUNCH(fmt::format("argmax_channels {} [{}, {}, {}]", dtype, N, C, V).c_str());
}

/// Installs this family's entries in the kernel table.
inline void register_tensor_ops(CudaKernels& t) {
  t.strided_copy = &strided_copy;
  t.fill = &fill;
  t.add = &add;
  t.scale = &scale;
  t.sum = &sum;
  t.sum_squares = &sum_squares;
  t.argmax_channels = &argmax_channels;
}

}  // namespace stunet::cuda
