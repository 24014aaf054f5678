// The one CUDA translation unit of the example programs, benchmarks and CUDA
// tests: including the kernels header registers the device backend and every
// kernel during static initialisation (see stunet/cuda/kernels.cuh). The
// programs themselves are plain C++; with this object linked in, their
// `--device cuda` runs the ops on the GPU.
#include "stunet/cuda/kernels.cuh"
