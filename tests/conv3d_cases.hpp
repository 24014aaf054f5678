#pragma once
// The conv3d problems both kernel test suites use: the host emulation
// (kernel_math/test_conv3d_math.cpp) and the GPU test
// (cuda/test_conv3d_cuda.cpp) run the same list, so a problem that the
// emulation passes is the one the GPU is asked about.

#include <array>
#include <vector>

#include "stunet/ops/conv3d_problem.hpp"

namespace stunet::testing {

struct Conv3dCase {
  const char* name;
  Conv3dProblem p;
};

/// A problem from input extents, kernel, padding and stride per axis (d, h, w).
inline Conv3dProblem make_conv3d_problem(int N, int C, std::array<int, 3> in, int K, std::array<int, 3> kernel,
                                         std::array<int, 3> pad, std::array<int, 3> stride) {
  Conv3dProblem p;
  p.N = N;
  p.C = C;
  p.D = in[0];
  p.H = in[1];
  p.W = in[2];
  p.K = K;
  p.T = kernel[0];
  p.R = kernel[1];
  p.S = kernel[2];
  p.pad_d = pad[0];
  p.pad_h = pad[1];
  p.pad_w = pad[2];
  p.stride_d = stride[0];
  p.stride_h = stride[1];
  p.stride_w = stride[2];
  return p;
}

/// The geometries of STU-Net (3x3x3 pad 1 stride 1 / 2 / (1,2,2); the
/// 1-channel stem; 1x1x1 stride 1 / 2 / (1,2,2); the 105-class head) at odd
/// extents, plus edge cases: no padding, padding as large as the kernel, an
/// anisotropic kernel and stride, channel counts over 32 (the wide tile) and
/// over 64 (two N tiles), several M tiles and several wgrad splits.
inline std::vector<Conv3dCase> conv3d_cases() {
  const std::array<int, 3> odd{3, 5, 7}, k3{3, 3, 3}, k1{1, 1, 1}, p0{0, 0, 0}, p1{1, 1, 1}, s1{1, 1, 1},
      s2{2, 2, 2}, s122{1, 2, 2};
  auto make = make_conv3d_problem;
  return {
      {"3x3x3 pad 1 stride 1", make(2, 3, odd, 4, k3, p1, s1)},
      {"stem 3x3x3 from 1 channel to 32", make(2, 1, odd, 32, k3, p1, s1)},
      {"3x3x3 pad 1 stride 2", make(2, 3, odd, 4, k3, p1, s2)},
      {"3x3x3 pad 1 stride (1,2,2)", make(2, 3, odd, 4, k3, p1, s122)},
      {"1x1x1 stride 1", make(2, 3, odd, 4, k1, p0, s1)},
      {"1x1x1 stride 2", make(2, 3, odd, 4, k1, p0, s2)},
      {"1x1x1 stride (1,2,2)", make(2, 3, odd, 4, k1, p0, s122)},
      {"3x3x3 pad 0 stride 1", make(2, 3, odd, 4, k3, p0, s1)},
      {"3x3x3 pad 0 stride 2", make(2, 3, odd, 4, k3, p0, s2)},
      {"3x3x3 pad 3 stride 3", make(1, 2, {5, 4, 3}, 3, k3, {3, 3, 3}, {3, 3, 3})},
      {"kernel (3,2,3) pad (0,1,1) stride (1,3,2)", make(1, 2, {4, 7, 6}, 3, {3, 2, 3}, {0, 1, 1}, {1, 3, 2})},
      {"wide tile C=33 K=37", make(1, 33, {3, 4, 5}, 37, k3, p1, s1)},
      {"two N tiles C=70 K=70 stride 2", make(1, 70, {4, 5, 3}, 70, k3, p1, s2)},
      {"1x1x1 head to 105 classes", make(2, 8, {2, 3, 5}, 105, k1, p0, s1)},
      {"several M tiles and splits", make(2, 2, {6, 9, 11}, 5, k3, p1, s1)},
  };
}

}  // namespace stunet::testing
