#pragma once
/// \file
/// CPU kernels for elementwise arithmetic on dense buffers (OpenMP).

#include <cstdint>

#include "stunet/core/parallel.hpp"

namespace stunet::cpu {

/// out[i] = a[i] + b[i], i < n.
template <class T> void add(const T* a, const T* b, T* out, std::int64_t n) {
  STUNET_OMP(parallel for simd schedule(static) if (n > 65536))
  for (std::int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

/// out[i] = s * x[i], i < n.
template <class T> void scale(const T* x, T s, T* out, std::int64_t n) {
  STUNET_OMP(parallel for simd schedule(static) if (n > 65536))
  for (std::int64_t i = 0; i < n; ++i) out[i] = s * x[i];
}

/// Sum of x[0..n) accumulated in double (per-thread partial sums).
template <class T> double sum(const T* x, std::int64_t n) {
  double total = 0.0;
  STUNET_OMP(parallel for reduction(+ : total) schedule(static) if (n > 65536))
  for (std::int64_t i = 0; i < n; ++i) total += static_cast<double>(x[i]);
  return total;
}

}  // namespace stunet::cpu
