#pragma once
/// \file
/// Nearest-neighbour upsampling by integer factors: STU-Net's decoder
/// upsamples by each stage's pool kernel, (2,2,2) or anisotropic (1,2,2).

#include <array>
#include <memory>

#include "stunet/core/tensor.hpp"
#include "stunet/cpu/interp.hpp"
#include "stunet/ops/elementwise.hpp"

namespace stunet {

namespace autograd {

/// Gradient of upsample_nearest: each input voxel receives the sum over the
/// block it was copied to.
class UpsampleNearestBackward final : public Node {
 public:
  UpsampleNearestBackward(Shape input_shape, std::array<int, 3> scale) : input_shape_(input_shape), scale_(scale) {}
  std::string name() const override { return "UpsampleNearest3DBackward"; }
  std::vector<Tensor> apply(const Tensor& grad_output) override {
    Tensor g = grad_output.contiguous();
    Tensor dx = Tensor::empty(input_shape_, g.dtype(), g.device());
    const Shape& s = input_shape_;
    if (g.device().is_cuda()) {
      detail::cuda_entry(cuda_kernels().upsample_nearest_backward, "upsample_nearest backward")(
          g.dtype(), g.raw_data(), dx.raw_data(), s[0] * s[1], s[2], s[3], s[4], scale_[0], scale_[1], scale_[2],
          g.device().index);
      return {dx};
    }
    dispatch_float(g.dtype(), "upsample_nearest backward", [&]<class T>() {
      cpu::upsample_nearest_backward(g.data<T>(), dx.data<T>(), s[0] * s[1], s[2], s[3], s[4], scale_[0], scale_[1],
                                     scale_[2]);
    });
    return {dx};
  }

 private:
  Shape input_shape_;
  std::array<int, 3> scale_;
};

}  // namespace autograd

/// Nearest-neighbour upsampling by integer factors (fd, fh, fw), PyTorch
/// F.interpolate(mode='nearest', scale_factor=...) semantics:
/// out[n, c, od, oh, ow] = x[n, c, od / fd, oh / fh, ow / fw].
/// x: [N, C, D, H, W], float32/float64; scale: each factor >= 1.
/// Returns [N, C, D*fd, H*fh, W*fw]. Differentiable.
inline Tensor upsample_nearest(const Tensor& x, std::array<int, 3> scale) {
  STUNET_CHECK(x.defined(), "upsample_nearest: undefined input");
  STUNET_CHECK(x.rank() == 5, "upsample_nearest: input must be [N, C, D, H, W], got shape {}", x.shape());
  STUNET_CHECK(scale[0] >= 1 && scale[1] >= 1 && scale[2] >= 1,
               "upsample_nearest: scale factors must be positive integers, got ({}, {}, {}) for input of shape {}",
               scale[0], scale[1], scale[2], x.shape());
  const Shape& s = x.shape();
  Shape out_shape{s[0], s[1], s[2] * scale[0], s[3] * scale[1], s[4] * scale[2]};
  Tensor xc = x.detach().contiguous();  // detach: no side node for the copy
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());
  if (x.device().is_cuda()) {
    detail::cuda_entry(cuda_kernels().upsample_nearest, "upsample_nearest")(
        x.dtype(), xc.raw_data(), out.raw_data(), s[0] * s[1], s[2], s[3], s[4], scale[0], scale[1], scale[2],
        x.device().index);
  } else {
    dispatch_float(x.dtype(), "upsample_nearest", [&]<class T>() {
      cpu::upsample_nearest(xc.data<T>(), out.data<T>(), s[0] * s[1], s[2], s[3], s[4], scale[0], scale[1],
                            scale[2]);
    });
  }
  if (autograd::should_record({x})) {
    auto node = std::make_shared<autograd::UpsampleNearestBackward>(s, scale);
    autograd::connect(*node, {x});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

}  // namespace stunet
