#pragma once
/// \file
/// Seeded random numbers that give the same sequence on every platform.
///
/// std::mt19937_64 is specified bit-exactly by the standard, but the
/// std::*_distribution classes are not (libstdc++ and libc++ differ), so the
/// distributions here are written out: a run with a seed is reproducible
/// wherever it is built.

#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>

namespace stunet {

/// A seeded generator with the distributions stunet needs (initialisation,
/// sampling, augmentation).
class Generator {
 public:
  explicit Generator(std::uint64_t seed = 0) : engine_(seed) {}

  /// Uniform double in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  /// Uniform double in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Uniform integer in [0, n) (n > 0), without modulo bias.
  std::uint64_t uniform_int(std::uint64_t n) {
    const std::uint64_t limit = ~std::uint64_t{0} - (~std::uint64_t{0} % n);
    std::uint64_t x;
    do x = engine_();
    while (x >= limit);
    return x % n;
  }
  /// Standard normal sample (Box-Muller; the second value is cached).
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1;
    do u1 = uniform();
    while (u1 <= 0.0);
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * std::numbers::pi * u2);
    has_spare_ = true;
    return r * std::cos(2.0 * std::numbers::pi * u2);
  }
  /// Normal sample with the given mean and standard deviation.
  double normal(double mean, double stddev) { return mean + stddev * normal(); }
  /// The raw 64-bit engine (for std::shuffle and friends).
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

}  // namespace stunet
