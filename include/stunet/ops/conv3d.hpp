#pragma once
/// \file
/// conv3d: the 3D convolution of STU-Net (zero padding, per-axis stride, no
/// dilation, no groups), with PyTorch's weight layout so that official
/// checkpoints load unchanged, and its backward node.

#include <array>
#include <string>

#include "stunet/core/tensor.hpp"
#include "stunet/cpu/conv3d.hpp"
#include "stunet/ops/conv3d_problem.hpp"

namespace stunet {

/// Stride and zero padding of conv3d, per axis (d, h, w), as in
/// torch.nn.Conv3d(stride=..., padding=...).
struct Conv3dOptions {
  std::array<int, 3> stride{1, 1, 1};   ///< each >= 1
  std::array<int, 3> padding{0, 0, 0};  ///< each >= 0, applied on both sides
};

namespace detail {

/// A dense host tensor with the values of t and no autograd history: the
/// kernels need dense buffers, and the node connects to the caller's tensors
/// directly (no Clone node in the graph).
inline Tensor dense_detached(const Tensor& t) { return t.is_contiguous() ? t.detach() : dense_copy(t, t.dtype()); }

/// Checks conv3d's arguments (throwing stunet::Error that names the shapes)
/// and returns the problem size.
inline Conv3dProblem conv3d_problem(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                    const Conv3dOptions& opt) {
  STUNET_CHECK(x.defined() && weight.defined(), "conv3d: undefined input or weight");
  STUNET_CHECK(x.rank() == 5, "conv3d: input of shape {} must have rank 5 [N, C, D, H, W]", x.shape());
  STUNET_CHECK(weight.rank() == 5, "conv3d: weight of shape {} must have rank 5 [Cout, Cin, kD, kH, kW]",
               weight.shape());
  STUNET_CHECK(x.size(1) == weight.size(1), "conv3d: input {} has {} channels but weight {} expects {}", x.shape(),
               x.size(1), weight.shape(), weight.size(1));
  STUNET_CHECK(x.dtype() == weight.dtype(), "conv3d: input {} is {} but weight {} is {}", x.shape(), x.dtype(),
               weight.shape(), weight.dtype());
  STUNET_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f64 ||
                   (x.device().is_cuda() && (x.dtype() == DType::f16 || x.dtype() == DType::bf16)),
               "conv3d: input {} and weight {} are {} on {}; conv3d computes in float32 or float64 (and float16 / "
               "bfloat16 on CUDA)",
               x.shape(), weight.shape(), x.dtype(), x.device());
  STUNET_CHECK(x.device() == weight.device(), "conv3d: input {} on {} but weight {} on {}", x.shape(), x.device(),
               weight.shape(), weight.device());
  if (bias.defined()) {
    STUNET_CHECK(bias.rank() == 1 && bias.size(0) == weight.size(0),
                 "conv3d: bias of shape {} must be [{}] for weight {}", bias.shape(), weight.size(0),
                 weight.shape());
    STUNET_CHECK(bias.dtype() == x.dtype(), "conv3d: bias {} is {} but input {} is {}", bias.shape(), bias.dtype(),
                 x.shape(), x.dtype());
    STUNET_CHECK(bias.device() == x.device(), "conv3d: bias {} is on {}, input {} on {}", bias.shape(), bias.device(),
                 x.shape(), x.device());
  }
  for (int a = 0; a < 3; ++a) {
    STUNET_CHECK(opt.stride[a] >= 1, "conv3d: stride ({}, {}, {}) must be >= 1 on every axis (input {})",
                 opt.stride[0], opt.stride[1], opt.stride[2], x.shape());
    STUNET_CHECK(opt.padding[a] >= 0, "conv3d: padding ({}, {}, {}) must be >= 0 on every axis (input {})",
                 opt.padding[0], opt.padding[1], opt.padding[2], x.shape());
  }
  // The kernels index with int; every extent of a realistic volume fits.
  for (int i = 0; i < 5; ++i)
    STUNET_CHECK(x.size(i) >= 1 && x.size(i) <= (1 << 30) && weight.size(i) >= 1 && weight.size(i) <= (1 << 30),
                 "conv3d: empty or oversized extent in input {} or weight {}", x.shape(), weight.shape());
  Conv3dProblem p;
  p.N = static_cast<int>(x.size(0));
  p.C = static_cast<int>(x.size(1));
  p.D = static_cast<int>(x.size(2));
  p.H = static_cast<int>(x.size(3));
  p.W = static_cast<int>(x.size(4));
  p.K = static_cast<int>(weight.size(0));
  p.T = static_cast<int>(weight.size(2));
  p.R = static_cast<int>(weight.size(3));
  p.S = static_cast<int>(weight.size(4));
  p.pad_d = opt.padding[0];
  p.pad_h = opt.padding[1];
  p.pad_w = opt.padding[2];
  p.stride_d = opt.stride[0];
  p.stride_h = opt.stride[1];
  p.stride_w = opt.stride[2];
  STUNET_CHECK(p.out_d() >= 1 && p.out_h() >= 1 && p.out_w() >= 1,
               "conv3d: kernel {} is larger than input {} with padding ({}, {}, {})", weight.shape(), x.shape(),
               p.pad_d, p.pad_h, p.pad_w);
  return p;
}

}  // namespace detail

namespace autograd {

/// Gradient of conv3d: dx (gather + GEMM), dw (im2col + GEMM) and db (sums),
/// each only when its input needs it. Saves x and the weight, not the output,
/// which an in-place activation may overwrite afterwards.
class Conv3dBackward final : public Node {
 public:
  Conv3dBackward(const Conv3dProblem& problem, const Tensor& x, const Tensor& weight) : problem_(problem) {
    x_slot_ = save(x);
    weight_slot_ = save(weight);
  }
  std::string name() const override { return "Conv3dBackward"; }
  std::vector<Tensor> apply(const Tensor& grad_output) override;

 private:
  Conv3dProblem problem_;
  std::size_t x_slot_ = 0, weight_slot_ = 0;
};

}  // namespace autograd

/// y = conv3d(x, weight) + bias, as torch.nn.functional.conv3d.
/// x: [N, Cin, D, H, W]; weight: [Cout, Cin, kD, kH, kW]; bias: [Cout] or an
/// undefined Tensor() for none; returns [N, Cout, Do, Ho, Wo] with
/// Do = (D + 2*padding[0] - kD) / stride[0] + 1 (likewise Ho, Wo).
/// float32 or float64 on the host; float32/float64/float16/bfloat16 on one
/// CUDA device (accumulating in float); all of one dtype; any strides.
inline Tensor conv3d(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor(), Conv3dOptions opt = {}) {
  const Conv3dProblem p = detail::conv3d_problem(x, weight, bias, opt);
  Tensor xc = detail::dense_detached(x);
  Tensor wc = detail::dense_detached(weight);
  Tensor bc = bias.defined() ? detail::dense_detached(bias) : Tensor();
  Tensor out = Tensor::empty(Shape{p.N, p.K, p.out_d(), p.out_h(), p.out_w()}, x.dtype(), x.device());
  if (x.device().is_cuda()) {
    require_cuda_kernel(cuda_kernels().conv3d_fprop, "conv3d")(p, x.dtype(), xc.raw_data(), wc.raw_data(),
                                                               bc.defined() ? bc.raw_data() : nullptr, out.raw_data(),
                                                               x.device().index);
  } else {
    dispatch_float(x.dtype(), "conv3d", [&]<class T>() {
      cpu::conv3d_forward<T>(p, xc.data<T>(), wc.data<T>(), bc.defined() ? bc.data<T>() : nullptr, out.data<T>());
    });
  }
  if (autograd::should_record({x, weight, bias})) {
    auto node = std::make_shared<autograd::Conv3dBackward>(p, xc, wc);
    autograd::connect(*node, {x, weight, bias});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

inline std::vector<Tensor> autograd::Conv3dBackward::apply(const Tensor& grad_output) {
  const Conv3dProblem& p = problem_;
  const Tensor g = detail::dense_detached(grad_output);
  std::vector<Tensor> grads(3);
  const bool need_x = needs_input_grad(0), need_w = needs_input_grad(1), need_b = needs_input_grad(2);
  const Tensor x = need_w ? saved(x_slot_) : Tensor();
  const Tensor w = need_x ? saved(weight_slot_) : Tensor();
  if (g.device().is_cuda()) {
    const Device dev = g.device();
    const CudaKernels& k = cuda_kernels();
    if (need_x) {
      grads[0] = Tensor::empty(Shape{p.N, p.C, p.D, p.H, p.W}, g.dtype(), dev);
      require_cuda_kernel(k.conv3d_dgrad, "conv3d backward")(p, g.dtype(), g.raw_data(), w.raw_data(),
                                                             grads[0].raw_data(), dev.index);
    }
    if (need_w) {
      grads[1] = Tensor::empty(Shape{p.K, p.C, p.T, p.R, p.S}, g.dtype(), dev);
      require_cuda_kernel(k.conv3d_wgrad, "conv3d backward")(p, g.dtype(), x.raw_data(), g.raw_data(),
                                                             grads[1].raw_data(), dev.index);
    }
    if (need_b) {
      grads[2] = Tensor::empty(Shape{p.K}, g.dtype(), dev);
      require_cuda_kernel(k.conv3d_bgrad, "conv3d backward")(p, g.dtype(), g.raw_data(), grads[2].raw_data(),
                                                             dev.index);
    }
    return grads;
  }
  dispatch_float(g.dtype(), "Conv3dBackward", [&]<class T>() {
    if (need_x) {
      grads[0] = Tensor::empty(Shape{p.N, p.C, p.D, p.H, p.W}, g.dtype());
      cpu::conv3d_backward_data<T>(p, g.data<T>(), w.data<T>(), grads[0].data<T>());
    }
    if (need_w) {
      grads[1] = Tensor::empty(Shape{p.K, p.C, p.T, p.R, p.S}, g.dtype());
      cpu::conv3d_backward_weight<T>(p, x.data<T>(), g.data<T>(), grads[1].data<T>());
    }
    if (need_b) {
      grads[2] = Tensor::empty(Shape{p.K}, g.dtype());
      cpu::conv3d_backward_bias<T>(p, g.data<T>(), grads[2].data<T>());
    }
  });
  return grads;
}

}  // namespace stunet
