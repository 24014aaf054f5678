#pragma once
/// \file
/// Data movement ops: concat (STU-Net's decoder joins [upsampled, skip] along
/// channels) and flip (mirroring for augmentation and test-time
/// augmentation).

#include <memory>
#include <string>
#include <vector>

#include "stunet/core/tensor.hpp"
#include "stunet/cpu/shape_ops.hpp"
#include "stunet/ops/elementwise.hpp"

namespace stunet {

namespace detail {

/// "[2, 3, 4], [2, 5, 4]" for error messages about several inputs.
inline std::string format_shapes(const std::vector<Tensor>& xs) {
  std::string s;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    if (i) s += ", ";
    s += xs[i].defined() ? fmt::format("{}", xs[i].shape()) : std::string("undefined");
  }
  return s;
}

/// Product of shape[begin, end).
inline std::int64_t extent_product(const Shape& shape, int begin, int end) {
  std::int64_t p = 1;
  for (int i = begin; i < end; ++i) p *= shape[i];
  return p;
}

}  // namespace detail

namespace autograd {

/// Gradient of concat: the slice of the gradient that each input filled.
class ConcatBackward final : public Node {
 public:
  ConcatBackward(std::vector<Shape> input_shapes, int dim) : input_shapes_(std::move(input_shapes)), dim_(dim) {}
  std::string name() const override { return "CatBackward"; }
  std::vector<Tensor> apply(const Tensor& grad_output) override {
    Tensor g = grad_output.contiguous();
    const Shape& os = g.shape();
    const std::int64_t outer = detail::extent_product(os, 0, dim_);
    const std::int64_t inner = detail::extent_product(os, dim_ + 1, os.rank());
    const std::int64_t total = os[dim_] * inner;
    std::vector<Tensor> grads(input_shapes_.size());
    std::int64_t offset = 0;
    if (g.device().is_cuda()) {
      // Each input's gradient is a slice of g along dim: one strided copy.
      std::int64_t start = 0;
      for (std::size_t i = 0; i < input_shapes_.size(); ++i) {
        if (needs_input_grad(i))
          grads[i] = detail::dense_copy(make_view(g, input_shapes_[i], g.strides(), g.storage_offset() + start * inner),
                                        g.dtype());
        start += input_shapes_[i][dim_];
      }
      return grads;
    }
    dispatch_float(g.dtype(), "concat backward", [&]<class T>() {
      for (std::size_t i = 0; i < input_shapes_.size(); ++i) {
        const std::int64_t len = input_shapes_[i][dim_] * inner;
        if (needs_input_grad(i)) {
          grads[i] = Tensor::empty(input_shapes_[i], g.dtype());
          cpu::copy_blocks(g.data<T>() + offset, total, grads[i].data<T>(), len, outer, len);
        }
        offset += len;
      }
    });
    return grads;
  }

 private:
  std::vector<Shape> input_shapes_;
  int dim_;
};

/// Gradient of flip: the gradient flipped along the same axes.
class FlipBackward final : public Node {
 public:
  explicit FlipBackward(std::vector<int> dims) : dims_(std::move(dims)) {}
  std::string name() const override { return "FlipBackward"; }
  std::vector<Tensor> apply(const Tensor& grad_output) override;

 private:
  std::vector<int> dims_;
};

}  // namespace autograd

/// Concatenation along `dim` (negative counts from the end, as in PyTorch).
/// xs: one or more tensors of equal rank (1 to 5), dtype (float32/float64)
/// and extents except along dim, e.g. [N, C1, D, H, W] and [N, C2, D, H, W]
/// with dim 1 give [N, C1 + C2, D, H, W]. Returns a new tensor; differentiable
/// in every input.
inline Tensor concat(const std::vector<Tensor>& xs, int dim = 1) {
  STUNET_CHECK(!xs.empty(), "concat: no tensors to concatenate");
  for (const Tensor& t : xs)
    STUNET_CHECK(t.defined(), "concat: undefined tensor among inputs of shapes {}", detail::format_shapes(xs));
  const Tensor& x0 = xs[0];
  const int r = x0.rank();
  STUNET_CHECK(r >= 1, "concat: rank-0 tensors cannot be concatenated (shapes {})", detail::format_shapes(xs));
  const int d = dim < 0 ? dim + r : dim;
  STUNET_CHECK(d >= 0 && d < r, "concat: dim {} out of range for tensors of rank {} (shapes {})", dim, r,
               detail::format_shapes(xs));
  std::int64_t total = 0;
  for (const Tensor& t : xs) {
    STUNET_CHECK(t.device() == x0.device(), "concat: tensors on {} and {} (shapes {})", x0.device(), t.device(),
                 detail::format_shapes(xs));
    STUNET_CHECK(t.dtype() == x0.dtype(), "concat: dtypes differ: {} vs {} (shapes {})", x0.dtype(), t.dtype(),
                 detail::format_shapes(xs));
    bool same = t.rank() == r;
    for (int i = 0; same && i < r; ++i) same = i == d || t.shape()[i] == x0.shape()[i];
    STUNET_CHECK(same, "concat along dim {}: shapes {} must agree in every other dimension", dim,
                 detail::format_shapes(xs));
    total += t.shape()[d];
  }
  Shape out_shape = x0.shape();
  out_shape[d] = total;
  Tensor out = Tensor::empty(out_shape, x0.dtype(), x0.device());
  const std::int64_t outer = detail::extent_product(out_shape, 0, d);
  const std::int64_t inner = detail::extent_product(out_shape, d + 1, r);
  if (x0.device().is_cuda()) {
    // Each input lands in a slice of out along dim: one strided copy each.
    std::int64_t start = 0;
    for (const Tensor& t : xs) {
      if (t.numel() > 0) make_view(out, t.shape(), out.strides(), start * inner).copy_(t.detach());
      start += t.shape()[d];
    }
  } else dispatch_float(x0.dtype(), "concat", [&]<class T>() {
    std::int64_t offset = 0;
    for (const Tensor& t : xs) {
      Tensor tc = t.detach().contiguous();
      const std::int64_t len = t.shape()[d] * inner;
      cpu::copy_blocks(tc.data<T>(), len, out.data<T>() + offset, total * inner, outer, len);
      offset += len;
    }
  });

  bool record = false;
  for (const Tensor& t : xs) record = record || t.requires_grad();
  if (record && grad_enabled()) {
    std::vector<Shape> shapes;
    for (const Tensor& t : xs) shapes.push_back(t.shape());
    auto node = std::make_shared<autograd::ConcatBackward>(std::move(shapes), d);
    for (const Tensor& t : xs) node->next_edges.push_back(autograd::edge_for(t));
    autograd::set_history(out, std::move(node));
  }
  return out;
}

/// Reverses x along each axis in `dims` (negative counts from the end, as in
/// torch.flip; duplicates are rejected, an empty list copies). x: any shape up
/// to rank 5, float32/float64, e.g. [N, C, D, H, W] with dims {2, 3, 4} for
/// mirroring every spatial axis. Returns a new tensor; differentiable.
inline Tensor flip(const Tensor& x, const std::vector<int>& dims) {
  STUNET_CHECK(x.defined(), "flip: undefined input");
  const int r = x.rank();
  bool flags[5] = {false, false, false, false, false};
  std::vector<int> norm;
  for (int dim : dims) {
    const int d = dim < 0 ? dim + r : dim;
    STUNET_CHECK(d >= 0 && d < r, "flip: dim {} out of range for a tensor of shape {}", dim, x.shape());
    STUNET_CHECK(!flags[5 - r + d], "flip: dim {} appears more than once in the dims for a tensor of shape {}", dim,
                 x.shape());
    flags[5 - r + d] = true;
    norm.push_back(d);
  }
  std::int64_t n[5] = {1, 1, 1, 1, 1};
  for (int i = 0; i < r; ++i) n[5 - r + i] = x.shape()[i];
  Tensor xc = x.detach().contiguous();  // detach: no side node for the copy
  Tensor out;
  if (x.device().is_cuda()) {
    // A view with negative strides along the flipped axes, made dense.
    Shape strides = xc.strides();
    std::int64_t offset = xc.storage_offset();
    for (int d : norm) {
      if (x.shape()[d] > 0) offset += (x.shape()[d] - 1) * strides[d];
      strides[d] = -strides[d];
    }
    out = x.numel() > 0 ? detail::dense_copy(make_view(xc, x.shape(), strides, offset), x.dtype())
                        : Tensor::empty(x.shape(), x.dtype(), x.device());
  } else {
    out = Tensor::empty(x.shape(), x.dtype());
    dispatch_float(x.dtype(), "flip", [&]<class T>() { cpu::flip(xc.data<T>(), out.data<T>(), n, flags); });
  }
  if (autograd::should_record({x})) {
    auto node = std::make_shared<autograd::FlipBackward>(std::move(norm));
    autograd::connect(*node, {x});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

inline std::vector<Tensor> autograd::FlipBackward::apply(const Tensor& grad_output) {
  return {stunet::flip(grad_output, dims_)};
}

}  // namespace stunet
