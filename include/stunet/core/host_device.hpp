#pragma once
/// \file
/// STUNET_HOST_DEVICE marks small helpers (problem sizes, index arithmetic)
/// that CUDA kernels and host code share: `__host__ __device__` under nvcc,
/// nothing for a plain C++ compiler.

#if defined(__CUDACC__)
#define STUNET_HOST_DEVICE __host__ __device__
#else
#define STUNET_HOST_DEVICE
#endif
