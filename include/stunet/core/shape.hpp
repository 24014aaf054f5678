#pragma once
/// \file
/// Shape: up to five extents, the NCDHW convention for 5D activations.

#include <array>
#include <cstdint>
#include <initializer_list>
#include <span>

#include <fmt/format.h>

#include "stunet/core/error.hpp"

namespace stunet {

/// Maximum tensor rank: 5 covers [N, C, D, H, W].
inline constexpr int kMaxRank = 5;

/// Extents (or strides) of a tensor, rank 0..5, stored inline.
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) { assign(std::span<const std::int64_t>(dims.begin(), dims.size())); }
  explicit Shape(std::span<const std::int64_t> dims) { assign(dims); }

  int rank() const { return rank_; }
  std::int64_t operator[](int i) const { return d_[check_index(i)]; }
  std::int64_t& operator[](int i) { return d_[check_index(i)]; }
  const std::int64_t* begin() const { return d_.data(); }
  const std::int64_t* end() const { return d_.data() + rank_; }
  std::span<const std::int64_t> span() const { return {d_.data(), static_cast<std::size_t>(rank_)}; }

  /// Product of the extents (1 for rank 0).
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= d_[i];
    return n;
  }
  /// Row-major (C order) strides of a contiguous tensor of this shape.
  Shape contiguous_strides() const {
    Shape s;
    s.rank_ = rank_;
    std::int64_t acc = 1;
    for (int i = rank_ - 1; i >= 0; --i) {
      s.d_[i] = acc;
      acc *= d_[i];
    }
    return s;
  }
  friend bool operator==(const Shape& a, const Shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.d_[i] != b.d_[i]) return false;
    return true;
  }

 private:
  void assign(std::span<const std::int64_t> dims) {
    STUNET_CHECK(dims.size() <= static_cast<std::size_t>(kMaxRank), "shape of rank {} exceeds the maximum rank {}",
                 dims.size(), kMaxRank);
    rank_ = static_cast<int>(dims.size());
    for (int i = 0; i < rank_; ++i) d_[i] = dims[i];
  }
  int check_index(int i) const {
    STUNET_CHECK(i >= 0 && i < rank_, "dimension index {} out of range for rank {}", i, rank_);
    return i;
  }
  std::array<std::int64_t, kMaxRank> d_{};
  int rank_ = 0;
};

}  // namespace stunet

/// Formats as [2, 16, 64, 64, 64], the way PyTorch prints sizes.
template <> struct fmt::formatter<stunet::Shape> {
  constexpr auto parse(format_parse_context& ctx) { return ctx.begin(); }
  auto format(const stunet::Shape& s, format_context& ctx) const {
    auto out = fmt::format_to(ctx.out(), "[");
    for (int i = 0; i < s.rank(); ++i) out = i ? fmt::format_to(out, ", {}", s[i]) : fmt::format_to(out, "{}", s[i]);
    return fmt::format_to(out, "]");
  }
};
