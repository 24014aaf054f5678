#pragma once
/// \file
/// OpenMP without warnings when it is absent: STUNET_OMP(parallel for) expands
/// to the pragma only when the compiler was given -fopenmp.

#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#define STUNET_PRAGMA(x) _Pragma(#x)
#define STUNET_OMP(x) STUNET_PRAGMA(omp x)
#else
#define STUNET_OMP(x)
#endif

namespace stunet {

/// Number of threads a parallel region will use (1 without OpenMP).
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// Index of the calling thread inside a parallel region (0 without OpenMP).
inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace stunet
