#pragma once
/// \file
/// Element types a Tensor can hold and the compile-time mapping to C++ types.

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "stunet/core/error.hpp"
#include "stunet/core/half.hpp"

namespace stunet {

/// Element type of a tensor. f32 is the compute type of the CPU ops; f64 is
/// for references and gradient checks; f16/bf16 are storage types for mixed
/// precision; i64/i32/u8 hold label maps.
enum class DType : std::uint8_t { f32, f64, f16, bf16, i64, i32, u8 };

/// Bytes per element.
constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::i64: return 8;
    case DType::i32: return 4;
    case DType::u8: return 1;
  }
  return 0;
}

/// PyTorch-style name ("float32", "bfloat16", "int64", ...), used in errors.
constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::i64: return "int64";
    case DType::i32: return "int32";
    case DType::u8: return "uint8";
  }
  return "?";
}

constexpr bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::f16 || t == DType::bf16;
}

/// dtype_of<T>: the DType tag of a C++ element type.
template <class T> struct dtype_of_t;
template <> struct dtype_of_t<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of_t<double> { static constexpr DType value = DType::f64; };
template <> struct dtype_of_t<f16> { static constexpr DType value = DType::f16; };
template <> struct dtype_of_t<bf16> { static constexpr DType value = DType::bf16; };
template <> struct dtype_of_t<std::int64_t> { static constexpr DType value = DType::i64; };
template <> struct dtype_of_t<std::int32_t> { static constexpr DType value = DType::i32; };
template <> struct dtype_of_t<std::uint8_t> { static constexpr DType value = DType::u8; };
template <class T> inline constexpr DType dtype_of = dtype_of_t<std::remove_cv_t<T>>::value;

/// Convert any storage type to double / from double (with rounding for the
/// 16-bit floats and truncation toward zero for integers, as static_cast does).
template <class T> inline double to_double(T v) {
  if constexpr (std::is_same_v<T, f16> || std::is_same_v<T, bf16>) return static_cast<double>(static_cast<float>(v));
  else return static_cast<double>(v);
}
template <class T> inline T from_double(double v) {
  if constexpr (std::is_same_v<T, f16> || std::is_same_v<T, bf16>) return T(static_cast<float>(v));
  else return static_cast<T>(v);
}

/// Calls f.template operator()<T>() with T the C++ type of `t`, for every dtype.
template <class F> decltype(auto) dispatch_all(DType t, F&& f) {
  switch (t) {
    case DType::f32: return f.template operator()<float>();
    case DType::f64: return f.template operator()<double>();
    case DType::f16: return f.template operator()<f16>();
    case DType::bf16: return f.template operator()<bf16>();
    case DType::i64: return f.template operator()<std::int64_t>();
    case DType::i32: return f.template operator()<std::int32_t>();
    case DType::u8: return f.template operator()<std::uint8_t>();
  }
  STUNET_FAIL("invalid dtype {}", static_cast<int>(t));
}

/// Calls f.template operator()<T>() for the compute dtypes of the CPU ops
/// (float32, float64); any other dtype throws naming `op`.
template <class F> decltype(auto) dispatch_float(DType t, std::string_view op, F&& f) {
  switch (t) {
    case DType::f32: return f.template operator()<float>();
    case DType::f64: return f.template operator()<double>();
    default: break;
  }
  STUNET_FAIL("{}: unsupported dtype {} (CPU ops compute in float32 or float64; convert with .to(DType::f32))",
              op, dtype_name(t));
}

}  // namespace stunet

template <> struct fmt::formatter<stunet::DType> : fmt::formatter<std::string_view> {
  auto format(stunet::DType t, format_context& ctx) const {
    return fmt::formatter<std::string_view>::format(stunet::dtype_name(t), ctx);
  }
};
