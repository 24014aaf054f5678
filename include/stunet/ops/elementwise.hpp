#pragma once
/// \file
/// Elementwise and whole-tensor arithmetic: add (residual connections, loss
/// sums), scale (loss weights), sum and mean (reductions to a scalar).

#include <cmath>

#include "stunet/core/tensor.hpp"
#include "stunet/cpu/elementwise.hpp"

namespace stunet {

namespace detail {
inline void check_same(const Tensor& a, const Tensor& b, const char* op) {
  STUNET_CHECK(a.defined() && b.defined(), "{}: undefined operand", op);
  STUNET_CHECK(a.shape() == b.shape(), "{}: shapes differ: {} vs {}", op, a.shape(), b.shape());
  STUNET_CHECK(a.dtype() == b.dtype(), "{}: dtypes differ: {} vs {} (shape {})", op, a.dtype(), b.dtype(), a.shape());
  STUNET_CHECK(a.device() == b.device(), "{}: devices differ: {} vs {}", op, a.device(), b.device());
}
inline void check_cpu(const Tensor& t, const char* op) {
  STUNET_CHECK(t.device().is_cpu(), "{}: no CUDA implementation in this build for a tensor on {} (shape {})", op,
               t.device(), t.shape());
}
/// The kernel table entry `fn` for an op on CUDA tensors (throws when the
/// program has no CUDA kernels; see core/cuda_kernels.hpp).
template <class F> F cuda_entry(F fn, const char* op) { return require_cuda_kernel(fn, op); }
}  // namespace detail

namespace autograd {
class AddBackward final : public Node {
 public:
  std::string name() const override { return "AddBackward"; }
  std::vector<Tensor> apply(const Tensor& g) override { return {g, g}; }
};
class ScaleBackward final : public Node {
 public:
  explicit ScaleBackward(double s) : s_(s) {}
  std::string name() const override { return "ScaleBackward"; }
  std::vector<Tensor> apply(const Tensor& g) override;

 private:
  double s_;
};
class SumBackward final : public Node {
 public:
  SumBackward(Shape shape, double factor) : shape_(shape), factor_(factor) {}
  std::string name() const override { return "SumBackward"; }
  std::vector<Tensor> apply(const Tensor& g) override {
    return {Tensor::full(shape_, g.item() * factor_, g.dtype(), g.device())};
  }

 private:
  Shape shape_;
  double factor_;
};
}  // namespace autograd

/// a + b, elementwise. a, b: same shape, dtype and device.
inline Tensor add(const Tensor& a, const Tensor& b) {
  detail::check_same(a, b, "add");
  Tensor ac = a.detach().contiguous(), bc = b.detach().contiguous();
  Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
  if (a.device().is_cuda()) {
    detail::cuda_entry(cuda_kernels().add, "add")(a.dtype(), ac.raw_data(), bc.raw_data(), 1.0, out.raw_data(),
                                                  a.numel(), a.device().index);
  } else {
    dispatch_float(a.dtype(), "add", [&]<class T>() {
      cpu::add(ac.data<T>(), bc.data<T>(), out.data<T>(), a.numel());
    });
  }
  if (autograd::should_record({a, b})) {
    auto node = std::make_shared<autograd::AddBackward>();
    autograd::connect(*node, {a, b});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

/// s * x, elementwise (loss weights, averaging). x: any shape, float.
inline Tensor scale(const Tensor& x, double s) {
  STUNET_CHECK(x.defined(), "scale: undefined operand");
  Tensor xc = x.detach().contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (x.device().is_cuda()) {
    detail::cuda_entry(cuda_kernels().scale, "scale")(x.dtype(), xc.raw_data(), s, out.raw_data(), x.numel(),
                                                      x.device().index);
  } else {
    dispatch_float(x.dtype(), "scale", [&]<class T>() {
      cpu::scale(xc.data<T>(), static_cast<T>(s), out.data<T>(), x.numel());
    });
  }
  if (autograd::should_record({x})) {
    auto node = std::make_shared<autograd::ScaleBackward>(s);
    autograd::connect(*node, {x});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

inline std::vector<Tensor> autograd::ScaleBackward::apply(const Tensor& g) { return {stunet::scale(g, s_)}; }

namespace detail {
/// Sum of every element in double, on the tensor's device (a GPU sum
/// synchronises to return it).
inline double sum_of(const Tensor& x, const char* op) {
  Tensor xc = x.detach().contiguous();
  if (x.device().is_cuda())
    return x.numel() == 0 ? 0.0 : cuda_entry(cuda_kernels().sum, op)(x.dtype(), xc.raw_data(), x.numel(), x.device().index);
  return dispatch_float(x.dtype(), op, [&]<class T>() { return cpu::sum(xc.data<T>(), x.numel()); });
}
}  // namespace detail

/// Sum of all elements as a one-element tensor of shape [] (rank 0),
/// accumulated in double.
inline Tensor sum(const Tensor& x) {
  STUNET_CHECK(x.defined(), "sum: undefined operand");
  const double total = detail::sum_of(x, "sum");
  Tensor out = Tensor::full(Shape{}, total, x.dtype(), x.device());
  if (autograd::should_record({x})) {
    auto node = std::make_shared<autograd::SumBackward>(x.shape(), 1.0);
    autograd::connect(*node, {x});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

/// Mean of all elements as a rank-0 tensor (accumulated in double).
inline Tensor mean(const Tensor& x) {
  STUNET_CHECK(x.numel() > 0, "mean: empty tensor of shape {}", x.shape());
  const double inv = 1.0 / static_cast<double>(x.numel());
  const double total = detail::sum_of(x, "mean");
  Tensor out = Tensor::full(Shape{}, total * inv, x.dtype(), x.device());
  if (autograd::should_record({x})) {
    auto node = std::make_shared<autograd::SumBackward>(x.shape(), inv);
    autograd::connect(*node, {x});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

}  // namespace stunet
