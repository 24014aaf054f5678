#pragma once
/// \file
/// Instance normalisation (nn.InstanceNorm3d(affine=True) in STU-Net's
/// residual blocks): statistics per (sample, channel) over the spatial axes.

#include <algorithm>
#include <memory>
#include <vector>

#include "stunet/core/tensor.hpp"
#include "stunet/cpu/norm.hpp"
#include "stunet/ops/elementwise.hpp"

namespace stunet {

namespace autograd {

/// Gradient of instance_norm. Keeps the input and the per-(n, c) statistics,
/// not the output: the LeakyReLU that follows in STU-Net may run in place on
/// the output.
class InstanceNormBackward final : public Node {
 public:
  InstanceNormBackward(std::vector<double> mean, std::vector<double> rstd, std::int64_t N, std::int64_t C,
                       std::int64_t S, bool has_weight)
      : mean_(std::move(mean)), rstd_(std::move(rstd)), N_(N), C_(C), S_(S), has_weight_(has_weight) {}
  /// On a GPU the statistics stay there: [N*C] float (double for f64) tensors.
  InstanceNormBackward(Tensor mean, Tensor rstd, std::int64_t N, std::int64_t C, std::int64_t S, bool has_weight)
      : mean_dev_(std::move(mean)), rstd_dev_(std::move(rstd)), N_(N), C_(C), S_(S), has_weight_(has_weight) {}
  std::string name() const override { return "InstanceNormBackward"; }
  std::vector<Tensor> apply(const Tensor& grad_output) override;

 private:
  std::vector<Tensor> apply_cuda(const Tensor& grad_output);

  std::vector<double> mean_, rstd_;
  Tensor mean_dev_, rstd_dev_;
  std::int64_t N_, C_, S_;
  bool has_weight_;
};

}  // namespace autograd

/// Instance normalisation with PyTorch's nn.InstanceNorm3d(affine=True)
/// semantics: per (n, c), mean and biased variance over all spatial voxels
/// (accumulated in double), y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c].
/// x: [N, C, spatial...] (rank 3 to 5, e.g. [N, C, D, H, W]), float32/float64.
/// weight, bias: [C] with x's dtype, or undefined (Tensor()) for scale 1 /
/// shift 0. Returns a tensor of x's shape. Differentiable in x, weight, bias.
inline Tensor instance_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-5) {
  STUNET_CHECK(x.defined(), "instance_norm: undefined input");
  STUNET_CHECK(x.rank() >= 3, "instance_norm: input must be [N, C, spatial...] (rank 3 to 5), got shape {}",
               x.shape());
  STUNET_CHECK(eps >= 0.0, "instance_norm: eps must be non-negative, got {} (input shape {})", eps, x.shape());
  const std::int64_t N = x.size(0), C = x.size(1);
  const std::int64_t S = x.numel() / std::max<std::int64_t>(1, N * C);
  STUNET_CHECK(N * C == 0 || S > 0, "instance_norm: no spatial elements to normalise over in input of shape {}",
               x.shape());
  for (const Tensor* p : {&weight, &bias}) {
    if (!p->defined()) continue;
    const char* what = p == &weight ? "weight" : "bias";
    STUNET_CHECK(p->rank() == 1 && p->size(0) == C,
                 "instance_norm: {} of shape {} does not match the {} channels of input of shape {} (expected [{}])",
                 what, p->shape(), C, x.shape(), C);
    STUNET_CHECK(p->dtype() == x.dtype(), "instance_norm: {} dtype {} differs from input dtype {} (input shape {})",
                 what, p->dtype(), x.dtype(), x.shape());
    STUNET_CHECK(p->device() == x.device(), "instance_norm: {} on {} but input of shape {} on {}", what,
                 p->device(), x.shape(), x.device());
  }

  Tensor xc = x.detach().contiguous();  // detach: no side node for the copy
  Tensor wc = weight.defined() ? weight.detach().contiguous() : Tensor();
  Tensor bc = bias.defined() ? bias.detach().contiguous() : Tensor();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  const std::int64_t planes = N * C;
  if (x.device().is_cuda()) {
    // Statistics in float (double for f64) on the device, kept there for backward.
    const DType stat = x.dtype() == DType::f64 ? DType::f64 : DType::f32;
    Tensor mean_d = Tensor::empty(Shape{planes}, stat, x.device()), rstd_d = Tensor::empty(Shape{planes}, stat, x.device());
    const int dev = x.device().index;
    if (planes > 0) {
      detail::cuda_entry(cuda_kernels().instance_norm_stats, "instance_norm")(x.dtype(), xc.raw_data(), planes, S, eps,
                                                                             mean_d.raw_data(), rstd_d.raw_data(), dev);
      detail::cuda_entry(cuda_kernels().instance_norm_forward, "instance_norm")(
          x.dtype(), xc.raw_data(), mean_d.raw_data(), rstd_d.raw_data(), wc.defined() ? wc.raw_data() : nullptr,
          bc.defined() ? bc.raw_data() : nullptr, out.raw_data(), planes, C, S, dev);
    }
    if (autograd::should_record({x, weight, bias})) {
      auto node = std::make_shared<autograd::InstanceNormBackward>(mean_d, rstd_d, N, C, S, weight.defined());
      node->save(xc);
      if (weight.defined()) node->save(wc);
      autograd::connect(*node, {x, weight, bias});
      autograd::set_history(out, std::move(node));
    }
    return out;
  }
  std::vector<double> mean(static_cast<std::size_t>(planes)), rstd(static_cast<std::size_t>(planes));
  dispatch_float(x.dtype(), "instance_norm", [&]<class T>() {
    cpu::instance_norm_stats(xc.data<T>(), planes, S, eps, mean.data(), rstd.data());
    cpu::instance_norm_forward(xc.data<T>(), mean.data(), rstd.data(), wc.defined() ? wc.data<T>() : nullptr,
                               bc.defined() ? bc.data<T>() : nullptr, out.data<T>(), planes, C, S);
  });

  if (autograd::should_record({x, weight, bias})) {
    auto node = std::make_shared<autograd::InstanceNormBackward>(std::move(mean), std::move(rstd), N, C, S,
                                                                 weight.defined());
    node->save(xc);
    if (weight.defined()) node->save(wc);
    autograd::connect(*node, {x, weight, bias});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

inline std::vector<Tensor> autograd::InstanceNormBackward::apply_cuda(const Tensor& grad_output) {
  const bool need_x = needs_input_grad(0), need_w = needs_input_grad(1), need_b = needs_input_grad(2);
  Tensor x = saved(0);
  Tensor w = has_weight_ ? saved(1) : Tensor();
  Tensor g = grad_output.contiguous();
  const std::int64_t planes = N_ * C_;
  const int dev = x.device().index;
  Tensor sum_g = Tensor::empty(Shape{planes}, mean_dev_.dtype(), x.device());
  Tensor sum_gx = Tensor::empty(Shape{planes}, mean_dev_.dtype(), x.device());
  Tensor dx, dw, db;
  if (planes > 0)
    detail::cuda_entry(cuda_kernels().instance_norm_backward_sums, "instance_norm backward")(
        x.dtype(), x.raw_data(), g.raw_data(), mean_dev_.raw_data(), rstd_dev_.raw_data(), planes, S_,
        sum_g.raw_data(), sum_gx.raw_data(), dev);
  if (need_x) {
    dx = Tensor::empty(x.shape(), x.dtype(), x.device());
    if (planes > 0)
      detail::cuda_entry(cuda_kernels().instance_norm_backward_input, "instance_norm backward")(
          x.dtype(), x.raw_data(), g.raw_data(), mean_dev_.raw_data(), rstd_dev_.raw_data(),
          w.defined() ? w.raw_data() : nullptr, sum_g.raw_data(), sum_gx.raw_data(), dx.raw_data(), planes, C_, S_,
          dev);
  }
  auto reduce_over_batch = [&](const Tensor& per_plane) {
    Tensor r = Tensor::empty(Shape{C_}, x.dtype(), x.device());
    if (C_ > 0)
      detail::cuda_entry(cuda_kernels().sum_planes_over_batch, "instance_norm backward")(
          x.dtype(), per_plane.raw_data(), r.raw_data(), N_, C_, dev);
    return r;
  };
  if (need_w) dw = reduce_over_batch(sum_gx);
  if (need_b) db = reduce_over_batch(sum_g);
  return {dx, dw, db};
}

inline std::vector<Tensor> autograd::InstanceNormBackward::apply(const Tensor& grad_output) {
  if (mean_dev_.defined()) return apply_cuda(grad_output);
  const bool need_x = needs_input_grad(0), need_w = needs_input_grad(1), need_b = needs_input_grad(2);
  Tensor x = saved(0);
  Tensor w = has_weight_ ? saved(1) : Tensor();
  Tensor g = grad_output.contiguous();
  const std::int64_t planes = N_ * C_;
  std::vector<double> sum_g(static_cast<std::size_t>(planes)), sum_gx(static_cast<std::size_t>(planes));
  Tensor dx, dw, db;
  dispatch_float(x.dtype(), "instance_norm backward", [&]<class T>() {
    cpu::instance_norm_backward_sums(x.data<T>(), g.data<T>(), mean_.data(), rstd_.data(), planes, S_, sum_g.data(),
                                     sum_gx.data());
    if (need_x) {
      dx = Tensor::empty(x.shape(), x.dtype());
      cpu::instance_norm_backward_input(x.data<T>(), g.data<T>(), mean_.data(), rstd_.data(),
                                        w.defined() ? w.data<T>() : nullptr, sum_g.data(), sum_gx.data(),
                                        dx.data<T>(), planes, C_, S_);
    }
    // Sum over the batch in a fixed order (reproducible, and N is small).
    auto reduce_over_batch = [&](const std::vector<double>& per_plane) {
      Tensor r = Tensor::empty(Shape{C_}, x.dtype());
      T* pr = r.data<T>();
      for (std::int64_t c = 0; c < C_; ++c) {
        double s = 0.0;
        for (std::int64_t n = 0; n < N_; ++n) s += per_plane[static_cast<std::size_t>(n * C_ + c)];
        pr[c] = static_cast<T>(s);
      }
      return r;
    };
    if (need_w) dw = reduce_over_batch(sum_gx);
    if (need_b) db = reduce_over_batch(sum_g);
  });
  return {dx, dw, db};
}

}  // namespace stunet
