#pragma once
/// \file
/// Storage types for 16-bit floats on the host. They only convert: CPU ops
/// compute in float/double, CUDA kernels use __half / __nv_bfloat16, whose bit
/// layouts these match so buffers can be copied between host and device as-is.

#include <bit>
#include <cstdint>
#include <cstring>

namespace stunet {

/// IEEE 754 binary16, round-to-nearest-even from float.
struct f16 {
  std::uint16_t bits = 0;
  f16() = default;
  explicit f16(float v) : bits(from_float(v)) {}
  explicit operator float() const { return to_float(bits); }

  static std::uint16_t from_float(float f) {
    std::uint32_t x = std::bit_cast<std::uint32_t>(f);
    std::uint32_t sign = (x >> 16) & 0x8000u;
    std::uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) {  // inf or nan
      return static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    }
    if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow -> inf
    if (abs < 0x38800000u) {  // result is subnormal or zero
      // Shift the full significand (with implicit bit) into subnormal position
      // and round to nearest even on the bits shifted out.
      if (abs < 0x33000000u) return static_cast<std::uint16_t>(sign);  // below half the smallest subnormal
      std::uint32_t exp = abs >> 23;
      std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
      // float value = mant * 2^(exp-150), half subnormal = r * 2^-24, so r = mant >> (126 - exp)
      std::uint32_t shift = 126u - exp;
      std::uint32_t result = mant >> (shift);
      std::uint32_t rem = mant & ((1u << shift) - 1u);
      std::uint32_t half = 1u << (shift - 1u);
      if (rem > half || (rem == half && (result & 1u))) ++result;
      return static_cast<std::uint16_t>(sign | result);
    }
    // normal: rebias exponent (127 -> 15) and round the 13 dropped bits
    std::uint32_t result = ((abs - 0x38000000u) >> 13);
    std::uint32_t rem = abs & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (result & 1u))) ++result;
    return static_cast<std::uint16_t>(sign | result);
  }
  static float to_float(std::uint16_t h) {
    std::uint32_t sign = (static_cast<std::uint32_t>(h) & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t mant = h & 0x3ffu;
    std::uint32_t out;
    if (exp == 0x1fu) {
      out = sign | 0x7f800000u | (mant << 13);
    } else if (exp == 0) {
      if (mant == 0) {
        out = sign;
      } else {  // subnormal: value = mant * 2^-24
        float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
        return sign ? -v : v;
      }
    } else {
      out = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    return std::bit_cast<float>(out);
  }
};

/// bfloat16: the top half of a float, round-to-nearest-even from float.
struct bf16 {
  std::uint16_t bits = 0;
  bf16() = default;
  explicit bf16(float v) : bits(from_float(v)) {}
  explicit operator float() const { return to_float(bits); }

  static std::uint16_t from_float(float f) {
    std::uint32_t x = std::bit_cast<std::uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);  // quiet nan
    std::uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
    return static_cast<std::uint16_t>((x + rounding) >> 16);
  }
  static float to_float(std::uint16_t b) {
    return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
  }
};

}  // namespace stunet
