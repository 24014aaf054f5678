#pragma once
/// \file
/// The differentiable members of Tensor (reshape, contiguous, clone, to(dtype))
/// and their backward nodes. Separate from core/tensor.hpp because they need
/// the graph structures of node.hpp.

#include "stunet/autograd/node.hpp"

namespace stunet {

namespace detail {
/// Dense copy on the same device, converting to `dtype`; no autograd.
inline Tensor dense_copy(const Tensor& src, DType dtype) {
  Tensor out = Tensor::empty(src.shape(), dtype, src.device());
  if (src.device().is_cpu()) {
    host_copy(out, src);
  } else if (src.numel() > 0) {
    const Loop5 ld = pad_to_5(out.shape(), out.strides()), ls = pad_to_5(src.shape(), src.strides());
    require_cuda_kernel(cuda_kernels().strided_copy, "copy")(out.raw_data(), dtype, ld, src.raw_data(), src.dtype(),
                                                             ls, src.device().index);
  }
  return out;
}
}  // namespace detail

namespace autograd {

/// Gradient of reshape: the same values under the input's shape.
class ReshapeBackward final : public Node {
 public:
  explicit ReshapeBackward(Shape input_shape) : input_shape_(input_shape) {}
  std::string name() const override { return "ReshapeBackward"; }
  std::vector<Tensor> apply(const Tensor& g) override { return {g.reshape(input_shape_)}; }

 private:
  Shape input_shape_;
};

/// Gradient of clone/contiguous: passes through.
class CloneBackward final : public Node {
 public:
  std::string name() const override { return "CloneBackward"; }
  std::vector<Tensor> apply(const Tensor& g) override { return {g}; }
};

/// Gradient of a float->float conversion: converted back to the input dtype.
class ToDtypeBackward final : public Node {
 public:
  explicit ToDtypeBackward(DType input_dtype) : input_dtype_(input_dtype) {}
  std::string name() const override { return "ToDtypeBackward"; }
  std::vector<Tensor> apply(const Tensor& g) override { return {detail::dense_copy(g, input_dtype_)}; }

 private:
  DType input_dtype_;
};

}  // namespace autograd

inline Tensor Tensor::reshape(const Shape& new_shape) const {
  STUNET_CHECK(new_shape.numel() == numel(), "reshape(): shape {} ({} elements) cannot hold a tensor of shape {} ({})",
               new_shape, new_shape.numel(), shape(), numel());
  Tensor out = is_contiguous() ? make_view(*this, new_shape, new_shape.contiguous_strides(), storage_offset())
                               : detail::dense_copy(*this, dtype()).reshape(new_shape);
  if (autograd::should_record({*this})) {
    auto node = std::make_shared<autograd::ReshapeBackward>(shape());
    autograd::connect(*node, {*this});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

inline Tensor Tensor::clone() const {
  Tensor out = detail::dense_copy(*this, dtype());
  if (autograd::should_record({*this})) {
    auto node = std::make_shared<autograd::CloneBackward>();
    autograd::connect(*node, {*this});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

inline Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }

inline Tensor Tensor::to(DType target) const {
  if (target == dtype()) return *this;
  Tensor out = detail::dense_copy(*this, target);
  if (autograd::should_record({*this})) {
    STUNET_CHECK(is_floating(target), "to({}): a conversion to an integer type is not differentiable (shape {})",
                 target, shape());
    auto node = std::make_shared<autograd::ToDtypeBackward>(dtype());
    autograd::connect(*node, {*this});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

}  // namespace stunet
