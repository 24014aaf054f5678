#pragma once
/// \file
/// Where a tensor's storage lives.

#include <cstdint>
#include <string_view>

#include <fmt/format.h>

namespace stunet {

enum class DeviceType : std::uint8_t { cpu, cuda };

/// A device: the host, or one CUDA GPU by index.
struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
  static constexpr Device cpu() { return {DeviceType::cpu, 0}; }
  static constexpr Device cuda(int i = 0) { return {DeviceType::cuda, i}; }
  constexpr bool is_cpu() const { return type == DeviceType::cpu; }
  constexpr bool is_cuda() const { return type == DeviceType::cuda; }
  friend constexpr bool operator==(Device, Device) = default;
};

}  // namespace stunet

template <> struct fmt::formatter<stunet::Device> : fmt::formatter<std::string_view> {
  auto format(stunet::Device d, format_context& ctx) const {
    if (d.is_cpu()) return fmt::format_to(ctx.out(), "cpu");
    return fmt::format_to(ctx.out(), "cuda:{}", d.index);
  }
};
