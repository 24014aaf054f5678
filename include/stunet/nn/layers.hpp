#pragma once
/// \file
/// The layers STU-Net is made of, as Modules with PyTorch's parameter names:
/// Conv3d (weight, bias), InstanceNorm3d (weight, bias), BasicResBlock
/// (conv1/norm1/conv2/norm2/conv3) and the nearest-upsample + 1x1 conv layer.

#include <array>
#include <cmath>
#include <memory>

#include "stunet/core/rng.hpp"
#include "stunet/nn/module.hpp"
#include "stunet/ops/activation.hpp"
#include "stunet/ops/conv3d.hpp"
#include "stunet/ops/elementwise.hpp"
#include "stunet/ops/interp.hpp"
#include "stunet/ops/norm.hpp"

namespace stunet::nn {

using Int3 = std::array<int, 3>;

/// nn.Conv3d with bias. weight: [Cout, Cin, k0, k1, k2], bias: [Cout].
class Conv3d : public Module {
 public:
  Conv3d(int in_channels, int out_channels, Int3 kernel, Int3 stride = {1, 1, 1}, Int3 padding = {0, 0, 0},
         DType dtype = DType::f32)
      : options_{stride, padding} {
    STUNET_CHECK(in_channels > 0 && out_channels > 0, "Conv3d: channels {} -> {} must be positive", in_channels,
                 out_channels);
    weight = register_parameter(
        "weight", Tensor::zeros({out_channels, in_channels, kernel[0], kernel[1], kernel[2]}, dtype));
    bias = register_parameter("bias", Tensor::zeros({out_channels}, dtype));
  }
  /// x: [N, Cin, D, H, W] -> [N, Cout, D', H', W']. Computes in x's dtype:
  /// with float16/bfloat16 activations (mixed precision) the float32 master
  /// weights are cast for this call, differentiably, so their gradients
  /// arrive in float32.
  Tensor forward(const Tensor& x) const {
    if (x.dtype() != weight.dtype()) return conv3d(x, weight.to(x.dtype()), bias.to(x.dtype()), options_);
    return conv3d(x, weight, bias, options_);
  }
  /// He (Kaiming normal, fan in) initialisation with leaky-ReLU slope `a` for
  /// the weight, zeros for the bias: nnU-Net v1's InitWeights_He(1e-2).
  void init_he(Generator& gen, double a = 1e-2) {
    const double fan_in = static_cast<double>(weight.numel() / weight.size(0));
    const double stddev = std::sqrt(2.0 / (1.0 + a * a)) / std::sqrt(fan_in);
    Tensor w = Tensor::empty(weight.shape(), DType::f64);
    for (std::int64_t i = 0; i < w.numel(); ++i) w.data<double>()[i] = gen.normal(0.0, stddev);
    assign(weight, w);
    assign(bias, Tensor::zeros(bias.shape(), DType::f64));
  }
  const Conv3dOptions& options() const { return options_; }

  Tensor weight, bias;

 private:
  Conv3dOptions options_;
};

/// nn.InstanceNorm3d(C, affine=True, eps=1e-5): weight ones, bias zeros.
class InstanceNorm3d : public Module {
 public:
  explicit InstanceNorm3d(int channels, DType dtype = DType::f32) {
    weight = register_parameter("weight", Tensor::ones({channels}, dtype));
    bias = register_parameter("bias", Tensor::zeros({channels}, dtype));
  }
  /// x: [N, C, D, H, W] -> same shape, in x's dtype (weights cast as in Conv3d).
  Tensor forward(const Tensor& x) const {
    if (x.dtype() != weight.dtype()) return instance_norm(x, weight.to(x.dtype()), bias.to(x.dtype()), 1e-5);
    return instance_norm(x, weight, bias, 1e-5);
  }
  Tensor weight, bias;
};

/// STU-Net's residual block: conv(stride) -> IN -> LeakyReLU -> conv -> IN,
/// plus the input (through a strided 1x1 conv when use_1x1conv), then
/// LeakyReLU. Both activations run in place as in the official code.
class BasicResBlock : public Module {
 public:
  BasicResBlock(int in_channels, int out_channels, Int3 kernel, Int3 stride, bool use_1x1conv,
                DType dtype = DType::f32) {
    const Int3 pad{kernel[0] / 2, kernel[1] / 2, kernel[2] / 2};
    conv1 = register_module("conv1", std::make_shared<Conv3d>(in_channels, out_channels, kernel, stride, pad, dtype));
    norm1 = register_module("norm1", std::make_shared<InstanceNorm3d>(out_channels, dtype));
    conv2 = register_module("conv2", std::make_shared<Conv3d>(out_channels, out_channels, kernel, Int3{1, 1, 1}, pad, dtype));
    norm2 = register_module("norm2", std::make_shared<InstanceNorm3d>(out_channels, dtype));
    if (use_1x1conv)
      conv3 = register_module("conv3", std::make_shared<Conv3d>(in_channels, out_channels, Int3{1, 1, 1}, stride,
                                                                Int3{0, 0, 0}, dtype));
    else
      STUNET_CHECK(in_channels == out_channels && stride == Int3({1, 1, 1}),
                   "BasicResBlock: an identity shortcut needs equal channels ({} vs {}) and stride 1", in_channels,
                   out_channels);
  }
  /// x: [N, Cin, D, H, W] -> [N, Cout, D/s0, H/s1, W/s2].
  Tensor forward(const Tensor& x) const {
    Tensor y = norm1->forward(conv1->forward(x));
    leaky_relu_(y, 0.01);
    y = norm2->forward(conv2->forward(y));
    y = add(y, conv3 ? conv3->forward(x) : x);
    leaky_relu_(y, 0.01);
    return y;
  }
  void init_he(Generator& gen) {
    conv1->init_he(gen);
    conv2->init_he(gen);
    if (conv3) conv3->init_he(gen);
  }

  std::shared_ptr<Conv3d> conv1, conv2, conv3;
  std::shared_ptr<InstanceNorm3d> norm1, norm2;
};

/// A stage: blocks applied in order (nn.Sequential of BasicResBlock).
class ResStage : public ModuleList<BasicResBlock> {
 public:
  /// x: [N, Cin, ...] -> [N, Cout, ...downsampled by the first block's stride].
  Tensor forward(Tensor x) const {
    for (const auto& b : *this) x = b->forward(x);
    return x;
  }
};

/// Upsample_Layer_nearest: nearest upsampling by the pool kernel, then a 1x1
/// conv to the skip's width. The conv is named "conv" as in the official code.
class UpsampleLayer : public Module {
 public:
  UpsampleLayer(int in_channels, int out_channels, Int3 scale, DType dtype = DType::f32) : scale_(scale) {
    conv = register_module("conv", std::make_shared<Conv3d>(in_channels, out_channels, Int3{1, 1, 1}, Int3{1, 1, 1},
                                                           Int3{0, 0, 0}, dtype));
  }
  /// x: [N, Cin, D, H, W] -> [N, Cout, D*s0, H*s1, W*s2].
  Tensor forward(const Tensor& x) const { return conv->forward(upsample_nearest(x, scale_)); }
  std::shared_ptr<Conv3d> conv;

 private:
  Int3 scale_;
};

}  // namespace stunet::nn
