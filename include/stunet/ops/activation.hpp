#pragma once
/// \file
/// LeakyReLU (slope 0.01 after every instance norm in STU-Net), out of place
/// and in place.

#include <memory>

#include "stunet/core/tensor.hpp"
#include "stunet/cpu/activation.hpp"
#include "stunet/ops/elementwise.hpp"

namespace stunet {

namespace autograd {

/// Gradient of LeakyReLU: g where the saved reference is positive, slope * g
/// elsewhere. The reference is the output when slope >= 0 (its sign is the
/// input's, and the next conv keeps the output alive anyway), else the input.
class LeakyReluBackward final : public Node {
 public:
  explicit LeakyReluBackward(double slope) : slope_(slope) {}
  std::string name() const override { return "LeakyReluBackward"; }
  std::vector<Tensor> apply(const Tensor& grad_output) override {
    Tensor ref = saved(0).contiguous();
    Tensor g = grad_output.contiguous();
    Tensor dx = Tensor::empty(ref.shape(), ref.dtype(), ref.device());
    if (ref.device().is_cuda()) {
      detail::cuda_entry(cuda_kernels().leaky_relu_backward, "leaky_relu backward")(
          ref.dtype(), ref.raw_data(), g.raw_data(), dx.raw_data(), slope_, ref.numel(), ref.device().index);
      return {dx};
    }
    dispatch_float(ref.dtype(), "leaky_relu backward", [&]<class T>() {
      cpu::leaky_relu_backward(ref.data<T>(), g.data<T>(), dx.data<T>(), static_cast<T>(slope_), ref.numel());
    });
    return {dx};
  }

 private:
  double slope_;
};

}  // namespace autograd

/// LeakyReLU: y = x for x > 0, negative_slope * x otherwise (PyTorch
/// F.leaky_relu). x: any shape, float32/float64. Returns a new tensor of x's
/// shape. Differentiable (the gradient at 0 is negative_slope, as in PyTorch).
inline Tensor leaky_relu(const Tensor& x, double negative_slope = 0.01) {
  STUNET_CHECK(x.defined(), "leaky_relu: undefined input");
  Tensor xc = x.detach().contiguous();  // detach: no side node for the copy
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (x.device().is_cuda()) {
    detail::cuda_entry(cuda_kernels().leaky_relu, "leaky_relu")(x.dtype(), xc.raw_data(), out.raw_data(),
                                                                negative_slope, x.numel(), x.device().index);
  } else {
    dispatch_float(x.dtype(), "leaky_relu", [&]<class T>() {
      cpu::leaky_relu(xc.data<T>(), out.data<T>(), static_cast<T>(negative_slope), x.numel());
    });
  }
  if (autograd::should_record({x})) {
    auto node = std::make_shared<autograd::LeakyReluBackward>(negative_slope);
    node->save(negative_slope >= 0.0 ? out : xc);
    autograd::connect(*node, {x});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

/// In-place LeakyReLU: overwrites x's storage (saving one activation-sized
/// buffer per block) and returns x. x: any shape, float32/float64; any view.
/// When recorded, x's history is rebased onto a new node whose edge leads to
/// x's previous producer, and x's storage version is bumped so that nodes that
/// saved x's old values refuse to run backward. Like PyTorch, this refuses a
/// leaf that requires grad (under grad mode) and, when recording, a negative
/// slope: the backward reads the sign of the output, which equals the sign of
/// the input only for negative_slope >= 0.
inline Tensor leaky_relu_(Tensor& x, double negative_slope = 0.01) {
  STUNET_CHECK(x.defined(), "leaky_relu_: undefined input");
  STUNET_CHECK(!(grad_enabled() && x.is_leaf() && x.requires_grad()),
               "leaky_relu_: in-place write into a leaf tensor that requires grad (shape {}); use leaky_relu() or "
               "detach it first",
               x.shape());
  const bool record = autograd::should_record({x});
  STUNET_CHECK(!record || negative_slope >= 0.0,
               "leaky_relu_: negative_slope {} < 0 is not differentiable in place (the backward needs the sign of "
               "the input, which the output no longer shows); use leaky_relu() (tensor of shape {})",
               negative_slope, x.shape());
  if (x.device().is_cuda()) {
    auto fn = detail::cuda_entry(cuda_kernels().leaky_relu, "leaky_relu_");
    if (x.is_contiguous()) {
      fn(x.dtype(), x.raw_data(), x.raw_data(), negative_slope, x.numel(), x.device().index);
    } else {
      Tensor tmp = detail::dense_copy(x, x.dtype());
      fn(x.dtype(), tmp.raw_data(), tmp.raw_data(), negative_slope, tmp.numel(), x.device().index);
      x.detach().copy_(tmp);
    }
  } else dispatch_float(x.dtype(), "leaky_relu_", [&]<class T>() {
    if (x.is_contiguous()) {
      cpu::leaky_relu(x.data<T>(), x.data<T>(), static_cast<T>(negative_slope), x.numel());
    } else {
      // A strided view (say a box() of a larger volume): compute densely, write back.
      Tensor tmp = detail::dense_copy(x, x.dtype());
      cpu::leaky_relu(tmp.data<T>(), tmp.data<T>(), static_cast<T>(negative_slope), tmp.numel());
      detail::host_copy(x, tmp);
    }
  });
  x.storage()->bump_version();
  if (record) {
    auto node = std::make_shared<autograd::LeakyReluBackward>(negative_slope);
    // Saved after the bump: this node holds the new values legitimately.
    node->save(x);
    autograd::connect(*node, {x});  // the edge leads to x's previous producer
    autograd::set_history(x, std::move(node));
  }
  return x;
}

}  // namespace stunet
