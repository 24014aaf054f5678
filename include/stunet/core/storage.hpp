#pragma once
/// \file
/// Storage: one contiguous allocation on one device, shared by every tensor
/// (and view) that refers to it.
///
/// CPU memory is allocated here. CUDA memory comes from a backend that the
/// CUDA headers register (include <stunet/cuda/...> from a .cu file built with
/// stunet::cuda); without it, asking for a CUDA tensor throws instead of
/// failing later in a kernel.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "stunet/core/device.hpp"
#include "stunet/core/error.hpp"

namespace stunet {

/// What a device backend provides to Storage and to cross-device copies.
struct DeviceBackend {
  void* (*allocate)(std::size_t bytes, int device_index) = nullptr;
  void (*deallocate)(void* ptr, int device_index) = nullptr;
  /// Copies `bytes` between any two of {host, this device}.
  void (*copy)(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes) = nullptr;
  void (*memset_zero)(void* ptr, std::size_t bytes, int device_index) = nullptr;
};

/// The registered CUDA backend (all members null until the CUDA headers set it).
inline DeviceBackend& cuda_backend() {
  static DeviceBackend backend;
  return backend;
}

inline const DeviceBackend& require_cuda_backend(const char* what) {
  const DeviceBackend& b = cuda_backend();
  STUNET_CHECK(b.allocate != nullptr,
               "{}: CUDA tensors need the CUDA backend (link stunet::cuda and include <stunet/cuda/backend.cuh> "
               "in a .cu file); this program was built without it",
               what);
  return b;
}

/// One allocation. `version` counts in-place writes so that autograd can tell
/// when a tensor saved for backward was modified afterwards.
class Storage {
 public:
  /// CPU allocations are 64-byte aligned for AVX-512 loads.
  static constexpr std::size_t kAlignment = 64;

  Storage(std::size_t bytes, Device device) : bytes_(bytes), device_(device) {
    if (device.is_cpu()) {
      std::size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
      data_ = rounded ? std::aligned_alloc(kAlignment, rounded) : nullptr;
      if (rounded && !data_) throw Error(fmt::format("out of host memory allocating {} bytes", bytes));
    } else {
      data_ = require_cuda_backend("Storage").allocate(bytes, device.index);
    }
  }
  ~Storage() {
    if (!data_) return;
    if (device_.is_cpu()) std::free(data_);
    else cuda_backend().deallocate(data_, device_.index);
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }
  Device device() const { return device_; }
  std::uint64_t version() const { return version_.load(std::memory_order_relaxed); }
  void bump_version() { version_.fetch_add(1, std::memory_order_relaxed); }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  Device device_;
  std::atomic<std::uint64_t> version_{0};
};

}  // namespace stunet
