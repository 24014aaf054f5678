#pragma once
/// \file
/// Dynamic loss scaling for float16 training, as torch.cuda.amp.GradScaler:
/// the loss is multiplied by a large factor before backward so that small
/// float16 gradients do not flush to zero; the float32 master gradients are
/// divided by it again before clipping and the step. When any gradient came
/// out Inf/NaN (float16 overflow) the step is skipped and the factor halved;
/// after `growth_interval` clean steps it doubles.

#include <cmath>
#include <cstdint>
#include <vector>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/ops/elementwise.hpp"

namespace stunet::optim {

/// torch.cuda.amp.GradScaler's defaults.
struct GradScalerOptions {
  double init_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int growth_interval = 2000;
  bool enabled = true;  ///< false: every call is the identity (float32 / bfloat16 runs)
};

class GradScaler {
 public:
  explicit GradScaler(GradScalerOptions options = {}) : options_(options), scale_(options.init_scale) {
    STUNET_CHECK(options.init_scale > 0 && options.growth_factor > 1 && options.backoff_factor > 0 &&
                     options.backoff_factor < 1 && options.growth_interval >= 1,
                 "GradScaler: init scale {}, growth {}, backoff {}, interval {}", options.init_scale,
                 options.growth_factor, options.backoff_factor, options.growth_interval);
  }

  /// loss * scale (differentiable); the loss itself when disabled. loss: rank 0.
  Tensor scale(const Tensor& loss) const { return options_.enabled ? stunet::scale(loss, scale_) : loss; }

  /// Divides every gradient of `params` by the scale in place and returns
  /// true when any gradient holds an Inf or NaN (the step must be skipped).
  bool unscale_(const std::vector<Tensor>& params) const {
    if (!options_.enabled) return false;
    const double inv = 1.0 / scale_;
    bool found_inf = false;
    for (const Tensor& p : params) {
      const Tensor& g = p.grad();
      if (!g.defined() || g.numel() == 0) continue;
      STUNET_CHECK(g.is_contiguous(), "GradScaler: gradient of shape {} must be contiguous", g.shape());
      double sq = 0;
      if (g.device().is_cuda()) {
        const int dev = g.device().index;
        require_cuda_kernel(cuda_kernels().scale, "GradScaler::unscale_")(g.dtype(), g.raw_data(), inv, g.raw_data(),
                                                                          g.numel(), dev);
        sq = require_cuda_kernel(cuda_kernels().sum_squares, "GradScaler::unscale_")(g.dtype(), g.raw_data(),
                                                                                     g.numel(), dev);
      } else {
        dispatch_float(g.dtype(), "GradScaler::unscale_", [&]<class T>() {
          T* d = g.data<T>();
          for (std::int64_t i = 0; i < g.numel(); ++i) {
            d[i] = static_cast<T>(static_cast<double>(d[i]) * inv);
            sq += static_cast<double>(d[i]) * static_cast<double>(d[i]);
          }
        });
      }
      g.storage()->bump_version();
      if (!std::isfinite(sq)) found_inf = true;
    }
    return found_inf;
  }

  /// After each step: back off on overflow, grow after growth_interval clean steps.
  void update(bool found_inf) {
    if (!options_.enabled) return;
    if (found_inf) {
      scale_ *= options_.backoff_factor;
      clean_steps_ = 0;
      ++skipped_;
    } else if (++clean_steps_ >= options_.growth_interval) {
      scale_ *= options_.growth_factor;
      clean_steps_ = 0;
    }
  }

  double get_scale() const { return scale_; }
  bool enabled() const { return options_.enabled; }
  /// Steps skipped because a gradient overflowed.
  std::int64_t skipped_steps() const { return skipped_; }

 private:
  GradScalerOptions options_;
  double scale_;
  int clean_steps_ = 0;
  std::int64_t skipped_ = 0;
};

}  // namespace stunet::optim
