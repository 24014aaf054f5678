#pragma once
// --device and --precision of the example programs.

#include <exception>
#include <string>

#include <stunet/core/cuda_kernels.hpp>
#include <stunet/core/device.hpp>
#include <stunet/core/dtype.hpp>
#include <stunet/core/error.hpp>

namespace stunet::programs {

/// "cpu", "cuda" or "cuda:N".
inline Device parse_device(const std::string& s) {
  if (s == "cpu") return Device::cpu();
  if (s == "cuda") return Device::cuda(0);
  if (s.rfind("cuda:", 0) == 0) {
    std::size_t used = 0;
    int i = -1;
    try {
      i = std::stoi(s.substr(5), &used);
    } catch (const std::exception&) {
      used = 0;
    }
    STUNET_CHECK(used == s.size() - 5 && i >= 0, "--device '{}': expected cpu, cuda or cuda:N", s);
    return Device::cuda(i);
  }
  STUNET_FAIL("--device '{}': expected cpu, cuda or cuda:N", s);
}

/// "fp32", "fp16" or "bf16" (the activations' dtype; weights stay float32).
inline DType parse_precision(const std::string& s) {
  if (s == "fp32") return DType::f32;
  if (s == "fp16") return DType::f16;
  if (s == "bf16") return DType::bf16;
  STUNET_FAIL("--precision '{}': expected fp32, fp16 or bf16", s);
}

/// Checks, before any work, that the program can run on `device` with `precision`.
inline void check_device_and_precision(Device device, DType precision) {
  if (device.is_cuda()) {
    STUNET_CHECK(cuda_kernels().device_count != nullptr,
                 "--device {}: this program was built without CUDA (no nvcc at build time); use --device cpu",
                 device);
    const int n = cuda_kernels().device_count();
    STUNET_CHECK(device.index < n, "--device {}: {} CUDA device(s) visible on this machine; use --device cpu{}",
                 device, n, n > 0 ? " or a smaller index" : "");
  }
  STUNET_CHECK(precision == DType::f32 || device.is_cuda(),
               "--precision {}: mixed precision runs on CUDA only; use fp32 with --device cpu",
               precision == DType::f16 ? "fp16" : "bf16");
}

}  // namespace stunet::programs
