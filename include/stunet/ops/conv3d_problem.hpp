#pragma once
/// \file
/// Conv3dProblem: the size of one 3D convolution, in the naming of CUTLASS's
/// Conv3dProblemSize (N, C, D, H, W in; K out channels; T, R, S kernel; Z, P, Q
/// out extents), so that CPU kernels, CUDA kernels and benchmarks describe a
/// problem with one plain struct usable on host and device.

#include <cstdint>

#include "stunet/core/host_device.hpp"

namespace stunet {

/// Geometry of y = conv3d(x, w) with zero padding, no dilation, no groups.
/// x: [N, C, D, H, W]; w: [K, C, T, R, S]; y: [N, K, Z, P, Q] with
/// Z = out_d(), P = out_h(), Q = out_w().
struct Conv3dProblem {
  int N = 1;  ///< batch
  int C = 1;  ///< input channels
  int D = 1, H = 1, W = 1;  ///< input extents
  int K = 1;  ///< output channels
  int T = 1, R = 1, S = 1;  ///< kernel extents along d, h, w
  int pad_d = 0, pad_h = 0, pad_w = 0;  ///< zero padding on both sides of each axis
  int stride_d = 1, stride_h = 1, stride_w = 1;  ///< step between output positions, in input positions

  /// PyTorch's output extent: (in + 2*pad - kernel) / stride + 1, floored;
  /// zero or negative when the (padded) input is shorter than the kernel.
  STUNET_HOST_DEVICE static constexpr int out_extent(int in, int kernel, int pad, int stride) {
    const int span = in + 2 * pad - kernel;
    return span < 0 ? 0 : span / stride + 1;
  }
  /// Output depth Z.
  STUNET_HOST_DEVICE constexpr int out_d() const { return out_extent(D, T, pad_d, stride_d); }
  /// Output height P.
  STUNET_HOST_DEVICE constexpr int out_h() const { return out_extent(H, R, pad_h, stride_h); }
  /// Output width Q.
  STUNET_HOST_DEVICE constexpr int out_w() const { return out_extent(W, S, pad_w, stride_w); }

  /// D*H*W: input positions per channel.
  STUNET_HOST_DEVICE constexpr std::int64_t input_spatial() const {
    return static_cast<std::int64_t>(D) * H * W;
  }
  /// Z*P*Q: output positions per channel.
  STUNET_HOST_DEVICE constexpr std::int64_t output_spatial() const {
    return static_cast<std::int64_t>(out_d()) * out_h() * out_w();
  }
  /// T*R*S: taps per (output channel, input channel) pair.
  STUNET_HOST_DEVICE constexpr std::int64_t kernel_volume() const { return static_cast<std::int64_t>(T) * R * S; }
  /// C*T*R*S: the reduction length of the implicit GEMM (rows of an im2col matrix).
  STUNET_HOST_DEVICE constexpr std::int64_t gemm_k() const { return C * kernel_volume(); }

  /// Elements of x, w and y.
  STUNET_HOST_DEVICE constexpr std::int64_t input_numel() const {
    return static_cast<std::int64_t>(N) * C * input_spatial();
  }
  STUNET_HOST_DEVICE constexpr std::int64_t weight_numel() const { return K * gemm_k(); }
  STUNET_HOST_DEVICE constexpr std::int64_t output_numel() const {
    return static_cast<std::int64_t>(N) * K * output_spatial();
  }

  /// Multiply-accumulates of the forward pass (each of dX and dW costs the same).
  STUNET_HOST_DEVICE constexpr std::int64_t macs() const {
    return static_cast<std::int64_t>(N) * K * output_spatial() * gemm_k();
  }
  /// 2 * macs(): the FLOP count benchmarks report, as PyTorch's profiler does.
  STUNET_HOST_DEVICE constexpr std::int64_t flops() const { return 2 * macs(); }

  /// True for a 1x1x1 kernel with stride 1 and no padding: the im2col matrix
  /// of a sample is then the input itself, [C, D*H*W].
  STUNET_HOST_DEVICE constexpr bool is_pointwise() const {
    return T == 1 && R == 1 && S == 1 && stride_d == 1 && stride_h == 1 && stride_w == 1 && pad_d == 0 &&
           pad_h == 0 && pad_w == 0;
  }
  /// True when every extent, stride and padding is in range and the output
  /// has at least one position per axis.
  STUNET_HOST_DEVICE constexpr bool valid() const {
    return N >= 1 && C >= 1 && D >= 1 && H >= 1 && W >= 1 && K >= 1 && T >= 1 && R >= 1 && S >= 1 &&
           pad_d >= 0 && pad_h >= 0 && pad_w >= 0 && stride_d >= 1 && stride_h >= 1 && stride_w >= 1 &&
           out_d() >= 1 && out_h() >= 1 && out_w() >= 1;
  }
};

}  // namespace stunet
