#pragma once
/// \file
/// Softmax along one axis (the channel axis of [N, C, D, H, W] class scores:
/// nnU-Net's softmax_helper_dim1, the nonlinearity before soft Dice).

#include "stunet/core/tensor.hpp"
#include "stunet/cpu/softmax.hpp"
#include "stunet/ops/elementwise.hpp"

namespace stunet {

namespace detail {
/// A dense shape viewed as [outer, size, inner] around axis `dim`.
struct AxisSplit {
  std::int64_t outer = 1, size = 1, inner = 1;
};
inline AxisSplit split_at_axis(const Shape& shape, int dim) {
  AxisSplit s;
  for (int i = 0; i < dim; ++i) s.outer *= shape[i];
  s.size = shape[dim];
  for (int i = dim + 1; i < shape.rank(); ++i) s.inner *= shape[i];
  return s;
}
}  // namespace detail

namespace autograd {
/// Gradient of softmax from its saved output y: dx = y * (g - sum_dim(g*y)).
class SoftmaxBackward final : public Node {
 public:
  explicit SoftmaxBackward(int dim) : dim_(dim) {}
  std::string name() const override { return "SoftmaxBackward"; }
  std::vector<Tensor> apply(const Tensor& g) override {
    Tensor y = saved(0);
    Tensor gc = g.contiguous();
    Tensor dx = Tensor::empty(y.shape(), y.dtype(), y.device());
    const detail::AxisSplit s = detail::split_at_axis(y.shape(), dim_);
    if (y.device().is_cuda()) {
      if (y.numel() > 0)
        detail::cuda_entry(cuda_kernels().softmax_backward, "softmax backward")(
            y.dtype(), y.raw_data(), gc.raw_data(), dx.raw_data(), s.outer, s.size, s.inner, y.device().index);
      return {dx};
    }
    dispatch_float(y.dtype(), "softmax backward", [&]<class T>() {
      cpu::softmax_backward(y.data<T>(), gc.data<T>(), dx.data<T>(), s.outer, s.size, s.inner);
    });
    return {dx};
  }

 private:
  int dim_;
};
}  // namespace autograd

/// softmax(x) along `dim` (negative counts from the end, as in PyTorch),
/// computed as exp(x - max) / sum exp(x - max) so large logits cannot
/// overflow. x: [N, C, spatial...] float32/float64 (any rank >= 1); the
/// default dim 1 is the channel axis. Returns a tensor of x's shape and dtype.
inline Tensor softmax(const Tensor& x, int dim = 1) {
  STUNET_CHECK(x.defined(), "softmax: undefined input");
  const int r = x.rank();
  const int d = dim < 0 ? dim + r : dim;
  STUNET_CHECK(d >= 0 && d < r, "softmax: dim {} out of range for a tensor of shape {}", dim, x.shape());
  STUNET_CHECK(is_floating(x.dtype()), "softmax: input must be a float tensor, got {} (shape {})", x.dtype(),
               x.shape());
  // Detached so that densifying a strided input records no stray node.
  Tensor xc = x.detach().contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  const detail::AxisSplit s = detail::split_at_axis(x.shape(), d);
  if (x.device().is_cuda()) {
    if (x.numel() > 0)
      detail::cuda_entry(cuda_kernels().softmax_forward, "softmax")(x.dtype(), xc.raw_data(), out.raw_data(), s.outer,
                                                                    s.size, s.inner, x.device().index);
  } else if (x.numel() > 0) {
    dispatch_float(x.dtype(), "softmax", [&]<class T>() {
      cpu::softmax_forward(xc.data<T>(), out.data<T>(), s.outer, s.size, s.inner);
    });
  }
  if (autograd::should_record({x})) {
    auto node = std::make_shared<autograd::SoftmaxBackward>(d);
    node->save(out);
    autograd::connect(*node, {x});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

}  // namespace stunet
