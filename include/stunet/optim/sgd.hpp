#pragma once
/// \file
/// The nnU-Net optimiser: SGD with momentum 0.99, Nesterov and weight decay
/// 3e-5, exactly as torch.optim.SGD computes it (per element, in the
/// parameter's precision, momentum buffer created from the first gradient),
/// with parameter groups for per-group learning rates, the poly schedule and
/// gradient-norm clipping (torch.nn.utils.clip_grad_norm_).

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "stunet/core/dtype.hpp"
#include "stunet/core/error.hpp"
#include "stunet/core/parallel.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/nn/module.hpp"

namespace stunet::optim {

/// torch.optim.SGD's hyper-parameters; the defaults are nnU-Net v2's.
struct SGDOptions {
  double lr = 1e-2;
  double momentum = 0.99;
  double dampening = 0.0;
  double weight_decay = 3e-5;
  bool nesterov = true;
};

/// Parameters sharing a learning rate (torch's param_groups). `initial_lr`
/// is what schedules scale from; `lr` is the rate of the next step.
struct ParamGroup {
  nn::StateDict params;  ///< named parameter tensors (shared with the model)
  double lr = 1e-2;
  double initial_lr = 1e-2;
  double weight_decay = 3e-5;
};

/// SGD with momentum / Nesterov / weight decay over parameter groups.
/// Parameters without a gradient are skipped (as torch does for grad None).
/// Parameters and gradients: float32 or float64 tensors of equal shape, on
/// the host or a CUDA device (the update then runs there, in the same
/// per-element arithmetic).
class SGD {
 public:
  /// One group holding every parameter at options.lr.
  SGD(nn::StateDict params, const SGDOptions& options = {}) : options_(options) {
    STUNET_CHECK(options.lr >= 0.0 && options.momentum >= 0.0 && options.weight_decay >= 0.0,
                 "SGD: lr {}, momentum {}, weight decay {} must be >= 0", options.lr, options.momentum,
                 options.weight_decay);
    STUNET_CHECK(!options.nesterov || (options.momentum > 0.0 && options.dampening == 0.0),
                 "SGD: Nesterov momentum requires momentum > 0 and zero dampening (momentum {}, dampening {})",
                 options.momentum, options.dampening);
    if (!params.empty()) add_group(std::move(params), options.lr);
  }

  /// Adds a group with its own learning rate (e.g. backbone at 0.1x the head).
  void add_group(nn::StateDict params, double lr) {
    STUNET_CHECK(lr >= 0.0, "SGD: learning rate {} < 0", lr);
    for (const auto& [name, t] : params) {
      STUNET_CHECK(!buffers_.count(name) && !names_.count(name), "SGD: parameter '{}' is in two groups", name);
      STUNET_CHECK(t.defined() && (t.dtype() == DType::f32 || t.dtype() == DType::f64) && t.is_contiguous(),
                   "SGD: parameter '{}' must be a contiguous float32/float64 tensor (got {} on {})", name,
                   t.defined() ? dtype_name(t.dtype()) : "undefined", t.defined() ? fmt::format("{}", t.device()) : std::string("-"));
      names_.insert({name, groups_.size()});
    }
    groups_.push_back(ParamGroup{std::move(params), lr, lr, options_.weight_decay});
  }

  std::vector<ParamGroup>& groups() { return groups_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  const SGDOptions& options() const { return options_; }

  /// Sets every group's lr to initial_lr * factor (schedules).
  void scale_lr(double factor) {
    for (auto& g : groups_) g.lr = g.initial_lr * factor;
  }

  /// One update of every parameter that has a gradient:
  ///   g = grad + wd * p; buf = momentum * buf + (1 - dampening) * g
  ///   (buf = g on the first step); g = g + momentum * buf (Nesterov) or buf;
  ///   p -= lr * g.
  void step() {
    for (auto& group : groups_)
      for (auto& [name, p] : group.params) {
        const Tensor& grad = p.grad();
        if (!grad.defined()) continue;
        STUNET_CHECK(grad.shape() == p.shape() && grad.dtype() == p.dtype() && grad.is_contiguous(),
                     "SGD: gradient of '{}' is {} {}, parameter is {} {}", name, dtype_name(grad.dtype()),
                     grad.shape(), dtype_name(p.dtype()), p.shape());
        auto it = buffers_.find(name);
        const bool first = it == buffers_.end();
        STUNET_CHECK(grad.device() == p.device(), "SGD: gradient of '{}' is on {}, the parameter on {}", name,
                     grad.device(), p.device());
        if (first && options_.momentum != 0.0)
          it = buffers_.emplace(name, Tensor::zeros(p.shape(), p.dtype(), p.device())).first;
        if (p.device().is_cuda()) {
          if (p.numel() > 0)
            require_cuda_kernel(cuda_kernels().sgd_step, "SGD::step")(
                p.dtype(), p.raw_data(), grad.raw_data(), options_.momentum != 0.0 ? it->second.raw_data() : nullptr,
                p.numel(), group.lr, group.weight_decay, options_.momentum, options_.dampening, options_.nesterov,
                first, 1.0, p.device().index);
          p.storage()->bump_version();
          continue;
        }
        dispatch_float(p.dtype(), "SGD::step", [&]<class T>() {
          T* w = p.data<T>();
          const T* g = grad.data<T>();
          T* buf = options_.momentum != 0.0 ? it->second.data<T>() : nullptr;
          const T lr = static_cast<T>(group.lr), wd = static_cast<T>(group.weight_decay);
          const T mom = static_cast<T>(options_.momentum), damp = static_cast<T>(1.0 - options_.dampening);
          const bool nesterov = options_.nesterov;
          const std::int64_t n = p.numel();
          STUNET_OMP(parallel for simd if (n > 65536))
          for (std::int64_t i = 0; i < n; ++i) {
            T d = g[i];
            if (wd != T(0)) d = d + wd * w[i];
            if (buf) {
              buf[i] = first ? d : mom * buf[i] + damp * d;
              d = nesterov ? d + mom * buf[i] : buf[i];
            }
            w[i] = w[i] - lr * d;
          }
        });
      }
  }

  /// Drops every gradient (torch's zero_grad(set_to_none=True)).
  void zero_grad() {
    for (auto& group : groups_)
      for (auto& [name, p] : group.params) p.zero_grad();
  }

  /// Momentum buffers by parameter name, for checkpoints ("resume exactly").
  const std::map<std::string, Tensor>& momentum_buffers() const { return buffers_; }

  /// Restores momentum buffers saved by momentum_buffers(); every name must be
  /// a parameter of this optimiser with the same shape and dtype.
  void load_momentum_buffers(const std::map<std::string, Tensor>& buffers) {
    std::map<std::string, Tensor> loaded;
    for (const auto& [name, t] : buffers) {
      auto it = names_.find(name);
      STUNET_CHECK(it != names_.end(), "SGD: saved momentum for '{}', which is not a parameter of this optimiser", name);
      const Tensor& p = find_param(name);
      STUNET_CHECK(t.shape() == p.shape(), "SGD: saved momentum for '{}' has shape {}, the parameter {}", name,
                   t.shape(), p.shape());
      loaded[name] = t.to(p.dtype()).to(p.device()).contiguous().clone();
    }
    buffers_ = std::move(loaded);
  }

 private:
  const Tensor& find_param(const std::string& name) const {
    for (const auto& [n, t] : groups_[names_.at(name)].params)
      if (n == name) return t;
    STUNET_FAIL("SGD: no parameter '{}'", name);
  }

  SGDOptions options_;
  std::vector<ParamGroup> groups_;
  std::map<std::string, std::size_t> names_;   // parameter -> group index
  std::map<std::string, Tensor> buffers_;      // created on the first step
};

/// nnU-Net's PolyLRScheduler factor (1 - epoch / max_epochs)^exponent.
inline double poly_lr_factor(std::int64_t epoch, std::int64_t max_epochs, double exponent = 0.9) {
  STUNET_CHECK(max_epochs > 0 && epoch >= 0 && epoch <= max_epochs, "poly_lr_factor: epoch {} of {}", epoch,
               max_epochs);
  return std::pow(1.0 - static_cast<double>(epoch) / static_cast<double>(max_epochs), exponent);
}

/// torch.nn.utils.clip_grad_norm_(params, max_norm): the 2-norm over all
/// gradients together; when it exceeds max_norm every gradient is scaled by
/// max_norm / (norm + 1e-6). Returns the norm before clipping (NaN/Inf when a
/// gradient is not finite, which the trainer reports).
inline double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  STUNET_CHECK(max_norm > 0.0, "clip_grad_norm: max_norm {} must be > 0", max_norm);
  double sum_sq = 0.0;
  for (const Tensor& p : params) {
    const Tensor& g = p.grad();
    if (!g.defined()) continue;
    STUNET_CHECK(g.is_contiguous(), "clip_grad_norm: gradient of shape {} must be contiguous", g.shape());
    if (g.device().is_cuda()) {
      if (g.numel() > 0)
        sum_sq += require_cuda_kernel(cuda_kernels().sum_squares, "clip_grad_norm")(g.dtype(), g.raw_data(), g.numel(),
                                                                                     g.device().index);
      continue;
    }
    dispatch_float(g.dtype(), "clip_grad_norm", [&]<class T>() {
      const T* d = g.data<T>();
      const std::int64_t n = g.numel();
      double s = 0.0;
      STUNET_OMP(parallel for simd reduction(+ : s) if (n > 65536))
      for (std::int64_t i = 0; i < n; ++i) s += static_cast<double>(d[i]) * static_cast<double>(d[i]);
      sum_sq += s;
    });
  }
  const double norm = std::sqrt(sum_sq);
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    for (const Tensor& p : params) {
      const Tensor& g = p.grad();
      if (!g.defined()) continue;
      if (g.device().is_cuda()) {
        // In the gradient's dtype, as the host loop below: d * (T)coef.
        if (g.numel() > 0)
          require_cuda_kernel(cuda_kernels().scale, "clip_grad_norm")(g.dtype(), g.raw_data(), coef, g.raw_data(),
                                                                       g.numel(), g.device().index);
        continue;
      }
      dispatch_float(g.dtype(), "clip_grad_norm", [&]<class T>() {
        T* d = g.data<T>();
        const T c = static_cast<T>(coef);
        const std::int64_t n = g.numel();
        STUNET_OMP(parallel for simd if (n > 65536))
        for (std::int64_t i = 0; i < n; ++i) d[i] = d[i] * c;
      });
    }
  }
  return norm;
}

}  // namespace stunet::optim
