#pragma once
/// \file
/// STU-Net (Huang et al. 2023): a residual nnU-Net scaled in depth and width.
/// Module names and parameter shapes match the official implementation, so
/// its state_dicts (and checkpoints) load unchanged.

#include <array>
#include <memory>
#include <string_view>
#include <vector>

#include "stunet/nn/layers.hpp"
#include "stunet/ops/shape_ops.hpp"

namespace stunet::nn {

/// Depth and width of the six resolution stages and the five pooling kernels.
/// A literal type: presets are constexpr and usable as template arguments.
struct STUNetConfig {
  int in_channels = 1;
  int num_classes = 105;
  std::array<int, 6> depth{1, 1, 1, 1, 1, 1};          ///< residual blocks per stage
  std::array<int, 6> dims{32, 64, 128, 256, 512, 512};  ///< channels per stage
  std::array<Int3, 5> pool{Int3{2, 2, 2}, Int3{2, 2, 2}, Int3{2, 2, 2}, Int3{2, 2, 2}, Int3{2, 2, 2}};
  Int3 kernel{3, 3, 3};
  bool deep_supervision = true;

  friend constexpr bool operator==(const STUNetConfig&, const STUNetConfig&) = default;
};

/// The paper's four sizes (1 input channel, 105 TotalSegmentator classes).
namespace presets {
inline constexpr STUNetConfig small{.depth = {1, 1, 1, 1, 1, 1}, .dims = {16, 32, 64, 128, 256, 256}};
inline constexpr STUNetConfig base{.depth = {1, 1, 1, 1, 1, 1}, .dims = {32, 64, 128, 256, 512, 512}};
inline constexpr STUNetConfig large{.depth = {2, 2, 2, 2, 2, 2}, .dims = {64, 128, 256, 512, 1024, 1024}};
inline constexpr STUNetConfig huge{.depth = {3, 3, 3, 3, 3, 3}, .dims = {96, 192, 384, 768, 1536, 1536}};
}  // namespace presets

/// The preset named "small"/"s", "base"/"b", "large"/"l" or "huge"/"h".
inline STUNetConfig preset(std::string_view name) {
  if (name == "small" || name == "s" || name == "S") return presets::small;
  if (name == "base" || name == "b" || name == "B") return presets::base;
  if (name == "large" || name == "l" || name == "L") return presets::large;
  if (name == "huge" || name == "h" || name == "H") return presets::huge;
  STUNET_FAIL("unknown STU-Net preset '{}' (small, base, large or huge)", name);
}

/// Checks a configuration before any allocation.
inline void validate(const STUNetConfig& c) {
  STUNET_CHECK(c.in_channels > 0 && c.num_classes > 0, "STUNet: in_channels {} and num_classes {} must be positive",
               c.in_channels, c.num_classes);
  for (int i = 0; i < 6; ++i)
    STUNET_CHECK(c.depth[i] >= 1 && c.dims[i] >= 1, "STUNet: stage {} has depth {} and width {} (both must be >= 1)",
                 i, c.depth[i], c.dims[i]);
  for (int i = 0; i < 5; ++i)
    for (int a = 0; a < 3; ++a)
      STUNET_CHECK(c.pool[i][a] >= 1, "STUNet: pool kernel {} has a non-positive factor on axis {}", i, a);
  for (int a = 0; a < 3; ++a)
    STUNET_CHECK(c.kernel[a] % 2 == 1, "STUNet: conv kernel {} must be odd on every axis", c.kernel[a]);
}

/// The network. forward() returns the five deep-supervision outputs, full
/// resolution first (seg_outputs[4] applied to the last decoder stage), or
/// only the full-resolution one when deep_supervision is off.
class STUNet : public Module {
 public:
  explicit STUNet(const STUNetConfig& config, DType dtype = DType::f32) : config_(config), compute_dtype_(dtype) {
    validate(config);
    const auto& d = config.dims;
    const Int3 one{1, 1, 1};
    conv_blocks_context = register_module("conv_blocks_context", std::make_shared<ModuleList<ResStage>>());
    for (int s = 0; s < 6; ++s) {
      auto stage = std::make_shared<ResStage>();
      const int cin = s == 0 ? config.in_channels : d[s - 1];
      const Int3 stride = s == 0 ? one : config.pool[s - 1];
      stage->push_back(std::make_shared<BasicResBlock>(cin, d[s], config.kernel, stride, true, dtype));
      for (int b = 1; b < config.depth[s]; ++b)
        stage->push_back(std::make_shared<BasicResBlock>(d[s], d[s], config.kernel, one, false, dtype));
      conv_blocks_context->push_back(stage);
    }
    upsample_layers = register_module("upsample_layers", std::make_shared<ModuleList<UpsampleLayer>>());
    for (int u = 0; u < 5; ++u)
      upsample_layers->push_back(std::make_shared<UpsampleLayer>(d[5 - u], d[4 - u], config.pool[4 - u], dtype));
    conv_blocks_localization = register_module("conv_blocks_localization", std::make_shared<ModuleList<ResStage>>());
    for (int u = 0; u < 5; ++u) {
      const int w = d[4 - u];
      auto stage = std::make_shared<ResStage>();
      stage->push_back(std::make_shared<BasicResBlock>(2 * w, w, config.kernel, one, true, dtype));
      for (int b = 1; b < config.depth[4 - u]; ++b)
        stage->push_back(std::make_shared<BasicResBlock>(w, w, config.kernel, one, false, dtype));
      conv_blocks_localization->push_back(stage);
    }
    seg_outputs = register_module("seg_outputs", std::make_shared<ModuleList<Conv3d>>());
    for (int u = 0; u < 5; ++u)
      seg_outputs->push_back(std::make_shared<Conv3d>(d[4 - u], config.num_classes, one, one, Int3{0, 0, 0}, dtype));
  }

  /// x: [N, in_channels, D, H, W] with D, H, W divisible by the product of
  /// the pool kernels on each axis. Returns [N, num_classes, D, H, W] first,
  /// then the coarser outputs (each downsampled by the next pool kernel).
  std::vector<Tensor> forward(const Tensor& x) const {
    STUNET_CHECK(x.rank() == 5 && x.size(1) == config_.in_channels,
                 "STUNet: input {} must be [N, {}, D, H, W]", x.shape(), config_.in_channels);
    for (int a = 0; a < 3; ++a) {
      int f = 1;
      for (const auto& p : config_.pool) f *= p[a];
      STUNET_CHECK(x.size(2 + a) % f == 0,
                   "STUNet: input {} has extent {} on spatial axis {}, not divisible by the pooling product {}",
                   x.shape(), x.size(2 + a), a, f);
    }
    std::vector<Tensor> skips;
    // Mixed precision: activations in the compute dtype, outputs back in the
    // parameters' dtype so that the loss runs in float32 (as under autocast).
    const DType param_dtype = (*seg_outputs)[4].weight.dtype();
    Tensor h = x.dtype() == compute_dtype_ ? x : x.to(compute_dtype_);
    for (int s = 0; s < 5; ++s) {
      h = (*conv_blocks_context)[s].forward(h);
      skips.push_back(h);
    }
    h = (*conv_blocks_context)[5].forward(h);
    std::vector<Tensor> outputs;  // coarsest first
    for (int u = 0; u < 5; ++u) {
      h = (*upsample_layers)[u].forward(h);
      h = concat({h, skips[4 - u]}, 1);
      h = (*conv_blocks_localization)[u].forward(h);
      if (config_.deep_supervision || u == 4) outputs.push_back((*seg_outputs)[u].forward(h));
    }
    if (compute_dtype_ != param_dtype)
      for (Tensor& o : outputs) o = o.to(param_dtype);
    return {outputs.rbegin(), outputs.rend()};
  }

  /// The dtype of the activations: the parameters' (float32) by default;
  /// float16 or bfloat16 for mixed precision on CUDA (float32 master weights,
  /// cast per layer; float32 outputs and loss). float16 training needs loss
  /// scaling (optim::GradScaler); bfloat16 has float32's range and does not.
  void set_compute_dtype(DType dtype) {
    STUNET_CHECK(is_floating(dtype), "STUNet::set_compute_dtype: {} is not a float dtype", dtype);
    compute_dtype_ = dtype;
  }
  DType compute_dtype() const { return compute_dtype_; }

  /// nnU-Net v1's InitWeights_He(1e-2) over every conv, from a seed.
  void init_he(std::uint64_t seed) {
    Generator gen(seed);
    for (auto& st : *conv_blocks_context)
      for (auto& b : *st) b->init_he(gen);
    for (auto& up : *upsample_layers) up->conv->init_he(gen);
    for (auto& st : *conv_blocks_localization)
      for (auto& b : *st) b->init_he(gen);
    for (auto& so : *seg_outputs) so->init_he(gen);
  }

  const STUNetConfig& config() const { return config_; }

  std::shared_ptr<ModuleList<ResStage>> conv_blocks_context;
  std::shared_ptr<ModuleList<UpsampleLayer>> upsample_layers;
  std::shared_ptr<ModuleList<ResStage>> conv_blocks_localization;
  std::shared_ptr<ModuleList<Conv3d>> seg_outputs;

 private:
  STUNetConfig config_;
  DType compute_dtype_ = DType::f32;
};

/// Parameters of a configuration without building it (bias included).
inline constexpr std::int64_t parameter_count(const STUNetConfig& c) {
  const std::int64_t k = static_cast<std::int64_t>(c.kernel[0]) * c.kernel[1] * c.kernel[2];
  auto conv = [](std::int64_t cin, std::int64_t cout, std::int64_t taps) { return cout * cin * taps + cout; };
  auto block = [&](std::int64_t cin, std::int64_t cout, bool shortcut) {
    return conv(cin, cout, k) + conv(cout, cout, k) + 4 * cout + (shortcut ? conv(cin, cout, 1) : 0);
  };
  std::int64_t n = 0;
  for (int s = 0; s < 6; ++s) {
    n += block(s == 0 ? c.in_channels : c.dims[s - 1], c.dims[s], true);
    n += (c.depth[s] - 1) * block(c.dims[s], c.dims[s], false);
  }
  for (int u = 0; u < 5; ++u) {
    const std::int64_t w = c.dims[4 - u];
    n += conv(c.dims[5 - u], w, 1);
    n += block(2 * w, w, true) + (c.depth[4 - u] - 1) * block(w, w, false);
    n += conv(w, c.num_classes, 1);
  }
  return n;
}

/// Multiply-accumulates of the convolutions in one forward pass at `patch`
/// (the paper's "FLOPs" column counts these). Biases, norms and activations
/// are not counted.
inline constexpr std::int64_t forward_macs(const STUNetConfig& c, Int3 patch) {
  const std::int64_t k = static_cast<std::int64_t>(c.kernel[0]) * c.kernel[1] * c.kernel[2];
  std::array<std::int64_t, 6> vox{};
  Int3 size = patch;
  for (int s = 0; s < 6; ++s) {
    if (s > 0)
      for (int a = 0; a < 3; ++a) size[a] /= c.pool[s - 1][a];
    vox[s] = static_cast<std::int64_t>(size[0]) * size[1] * size[2];
  }
  auto block = [&](std::int64_t cin, std::int64_t cout, bool shortcut, std::int64_t v) {
    return v * (cin * cout * k + cout * cout * k + (shortcut ? cin * cout : 0));
  };
  std::int64_t m = 0;
  for (int s = 0; s < 6; ++s) {
    m += block(s == 0 ? c.in_channels : c.dims[s - 1], c.dims[s], true, vox[s]);
    m += (c.depth[s] - 1) * block(c.dims[s], c.dims[s], false, vox[s]);
  }
  for (int u = 0; u < 5; ++u) {
    const std::int64_t w = c.dims[4 - u], v = vox[4 - u];
    m += v * c.dims[5 - u] * w;  // 1x1 conv after the upsample, at the finer resolution
    m += block(2 * w, w, true, v) + (c.depth[4 - u] - 1) * block(w, w, false, v);
    m += v * w * c.num_classes;
  }
  return m;
}

}  // namespace stunet::nn
