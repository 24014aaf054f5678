#pragma once
/// \file
/// CPU kernels for LeakyReLU on dense buffers (OpenMP).

#include <cstdint>

#include "stunet/core/parallel.hpp"

namespace stunet::cpu {

/// y[i] = x[i] > 0 ? x[i] : slope * x[i], i < n. x and y may be the same
/// buffer (the in-place variant).
template <class T> void leaky_relu(const T* x, T* y, T slope, std::int64_t n) {
  STUNET_OMP(parallel for simd schedule(static) if (n > 65536))
  for (std::int64_t i = 0; i < n; ++i) y[i] = x[i] > T(0) ? x[i] : slope * x[i];
}

/// dx[i] = ref[i] > 0 ? g[i] : slope * g[i], i < n, where ref is the input or,
/// when slope >= 0, the output (both have the same sign then).
template <class T> void leaky_relu_backward(const T* ref, const T* g, T* dx, T slope, std::int64_t n) {
  STUNET_OMP(parallel for simd schedule(static) if (n > 65536))
  for (std::int64_t i = 0; i < n; ++i) dx[i] = ref[i] > T(0) ? g[i] : slope * g[i];
}

}  // namespace stunet::cpu
