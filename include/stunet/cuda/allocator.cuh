#pragma once
/// \file
/// The process-wide caching device allocator behind every CUDA tensor.
///
/// cub::CachingDeviceAllocator keeps freed blocks in power-of-`bin_growth`
/// bins and hands them out again without cudaMalloc/cudaFree (which
/// synchronise the device). CUB's defaults (bin_growth 8, largest bin 2 MB)
/// free every activation-sized block; here the bins grow by 2 from 4 KiB to
/// 16 GiB, so a 100 MB activation is served from a 128 MiB bin and cached
/// when freed. Requests above the largest bin are allocated exactly and freed
/// on release. On out-of-memory CUB first frees the cached blocks of that
/// device and retries; if that fails too, stunet::Error reports the bytes
/// asked, cudaMemGetInfo's free/total and what the cache holds.
///
/// All allocations are associated with the context's stream of their device
/// (launch.cuh): a freed block is handed out again only to work queued after
/// the free on that same stream, so no synchronisation is needed.
///
/// allocator_stats().device_mallocs counts the allocations the cache could
/// not serve (each one a cudaMalloc): a steady-state training step must not
/// add to it (a test counts them).
/// Include only from .cu files (code compiled by nvcc).

#include <cstddef>
#include <mutex>

#include <cub/util_allocator.cuh>
#include <cuda_runtime.h>

#include "stunet/core/error.hpp"
#include "stunet/cuda/check.cuh"
#include "stunet/cuda/launch.cuh"

namespace stunet::cuda {

/// Bin geometry of the caching allocator (see the file comment).
inline constexpr unsigned kAllocatorBinGrowth = 2;
inline constexpr unsigned kAllocatorMinBin = 12;  // 4 KiB
inline constexpr unsigned kAllocatorMaxBin = 34;  // 16 GiB

/// The allocator. Never destroyed before the CUDA runtime: skip_cleanup is
/// set because a static allocator may outlive the runtime at exit, and the
/// driver releases the process's memory anyway.
inline cub::CachingDeviceAllocator& caching_allocator() {
  static cub::CachingDeviceAllocator allocator(kAllocatorBinGrowth, kAllocatorMinBin, kAllocatorMaxBin,
                                               cub::CachingDeviceAllocator::INVALID_SIZE,
                                               /*skip_cleanup=*/true);
  return allocator;
}

/// Bytes held by the caching allocator on one device.
struct AllocatorStats {
  std::size_t live_bytes = 0;    ///< handed out and not yet freed (bin-rounded)
  std::size_t cached_bytes = 0;  ///< freed and kept for reuse
  std::size_t device_mallocs = 0;  ///< allocations that reached cudaMalloc (cache misses), all devices
  std::size_t allocations = 0;     ///< every allocation request served, all devices
};

namespace detail {
inline std::size_t& device_malloc_count() {
  static std::size_t n = 0;
  return n;
}
inline std::size_t& allocation_count() {
  static std::size_t n = 0;
  return n;
}
}  // namespace detail

inline AllocatorStats allocator_stats(int device) {
  auto& a = caching_allocator();
  std::lock_guard<std::mutex> lock(a.mutex);
  AllocatorStats s;
  auto it = a.cached_bytes.find(device);
  if (it != a.cached_bytes.end()) {
    s.live_bytes = it->second.live;
    s.cached_bytes = it->second.free;
  }
  s.device_mallocs = detail::device_malloc_count();
  s.allocations = detail::allocation_count();
  return s;
}

/// Returns every cached (free) block to the driver, as torch.cuda.empty_cache().
inline void empty_cache() { STUNET_CUDA_CHECK(caching_allocator().FreeAllCached()); }

namespace detail {

inline std::string format_bytes(std::size_t bytes) {
  constexpr double kMiB = 1024.0 * 1024.0;
  if (bytes >= (std::size_t{1} << 30)) return fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (kMiB * 1024.0));
  return fmt::format("{:.1f} MiB", static_cast<double>(bytes) / kMiB);
}

[[noreturn]] inline void throw_allocation_error(cudaError_t err, std::size_t bytes, int device) {
  (void)cudaGetLastError();  // an OOM is not sticky: clear it for the next launch check
  std::size_t free_bytes = 0, total_bytes = 0;
  int previous = -1;
  std::string mem_info;
  if (cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(device) == cudaSuccess &&
      cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
    mem_info = fmt::format("{} free of {} total ({} / {} bytes)", format_bytes(free_bytes), format_bytes(total_bytes),
                           free_bytes, total_bytes);
  } else {
    mem_info = "cudaMemGetInfo unavailable";
  }
  if (previous >= 0) (void)cudaSetDevice(previous);
  (void)cudaGetLastError();
  AllocatorStats s = allocator_stats(device);
  if (err == cudaErrorMemoryAllocation) {
    throw Error(fmt::format("CUDA out of memory: tried to allocate {} ({} bytes) on cuda:{}; device has {}; "
                            "stunet's caching allocator holds {} live and {} cached",
                            format_bytes(bytes), bytes, device, mem_info, format_bytes(s.live_bytes),
                            format_bytes(s.cached_bytes)));
  }
  throw Error(fmt::format("CUDA error {} ({}) allocating {} bytes on cuda:{}; device has {}", cudaGetErrorName(err),
                          cudaGetErrorString(err), bytes, device, mem_info));
}

}  // namespace detail

/// Device memory of at least `bytes` on `device` (nullptr for 0 bytes).
/// Throws stunet::Error on failure.
inline void* device_allocate(std::size_t bytes, int device) {
  if (bytes == 0) return nullptr;
  void* ptr = nullptr;
  auto& a = caching_allocator();
  cudaStream_t s = stream(device);
  // The cache grows (live + free) only when it had no block to hand out and
  // called cudaMalloc: that is what a steady-state step must never do.
  const AllocatorStats before = allocator_stats(device);
  cudaError_t err = a.DeviceAllocate(device, &ptr, bytes, s);
  if (err != cudaSuccess) [[unlikely]]
    detail::throw_allocation_error(err, bytes, device);
  const AllocatorStats after = allocator_stats(device);
  std::lock_guard<std::mutex> lock(a.mutex);
  ++detail::allocation_count();
  if (after.live_bytes + after.cached_bytes > before.live_bytes + before.cached_bytes) ++detail::device_malloc_count();
  return ptr;
}

/// Returns a block to the cache. Never throws (it runs in destructors): an
/// error, such as the runtime already unloading at exit, is cleared and ignored.
inline void device_deallocate(void* ptr, int device) noexcept {
  if (ptr == nullptr) return;
  if (caching_allocator().DeviceFree(device, ptr) != cudaSuccess) (void)cudaGetLastError();
}

}  // namespace stunet::cuda
