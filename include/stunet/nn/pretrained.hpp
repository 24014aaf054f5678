#pragma once
/// \file
/// Loading pretrained STU-Net weights into a model for fine-tuning, the way
/// the official STU-Net trainer does: everything but the segmentation heads
/// (re-initialised for the new classes); the first layer's weights repeated
/// along the input-channel axis when the new task has more input channels.

#include <string>
#include <vector>

#include "stunet/nn/stunet.hpp"

namespace stunet::nn {

struct PretrainedLoadOptions {
  /// Keys with these prefixes keep the model's own (fresh) values.
  std::vector<std::string> skip_prefixes{"seg_outputs."};
  /// First-layer weights whose input channels may be repeated (no rescaling,
  /// as in the official code) when the model has k times as many.
  std::vector<std::string> repeat_input_channel_keys{"conv_blocks_context.0.0.conv1.weight",
                                                     "conv_blocks_context.0.0.conv3.weight"};
};

/// Copies `pretrained` into `model` for fine-tuning. Every parameter outside
/// skip_prefixes must be present with a compatible shape, else stunet::Error
/// listing the offenders (and nothing is modified). Returns what was loaded,
/// skipped (kept fresh, or present only in the file) and reshaped.
inline LoadReport load_pretrained(Module& model, const StateDict& pretrained, const PretrainedLoadOptions& opt = {}) {
  auto starts_with_any = [](const std::string& k, const std::vector<std::string>& prefixes) {
    for (const auto& p : prefixes)
      if (k.rfind(p, 0) == 0) return true;
    return false;
  };
  std::map<std::string, const Tensor*> file;
  for (const auto& [k, t] : pretrained) file[k] = &t;
  LoadReport report;
  std::vector<std::pair<Tensor, Tensor>> copies;  // (parameter, value)
  std::map<std::string, bool> in_model;
  for (const auto& [key, param] : model.named_parameters()) {
    in_model[key] = true;
    if (starts_with_any(key, opt.skip_prefixes)) {
      report.skipped.push_back(key);
      continue;
    }
    auto it = file.find(key);
    if (it == file.end()) {
      report.missing.push_back(key);
      continue;
    }
    const Tensor& src = *it->second;
    if (src.shape() == param.shape()) {
      copies.emplace_back(param, src);
      report.loaded.push_back(key);
      continue;
    }
    const bool repeatable = std::find(opt.repeat_input_channel_keys.begin(), opt.repeat_input_channel_keys.end(),
                                      key) != opt.repeat_input_channel_keys.end();
    bool ok = repeatable && src.rank() == 5 && param.rank() == 5 && src.size(1) > 0 &&
              param.size(1) % src.size(1) == 0;
    for (int d : {0, 2, 3, 4}) ok = ok && src.size(d) == param.size(d);
    if (!ok) {
      report.mismatched.push_back(fmt::format("{}: file {} vs model {}", key, src.shape(), param.shape()));
      continue;
    }
    // Tile [Cout, c, k, k, k] into [Cout, r*c, k, k, k]: channel j takes j % c.
    Tensor s = src.detach().contiguous().to(DType::f64);
    Tensor out = Tensor::empty(param.shape(), DType::f64);
    const std::int64_t cout = param.size(0), cin_new = param.size(1), cin_old = src.size(1);
    const std::int64_t taps = param.size(2) * param.size(3) * param.size(4);
    for (std::int64_t o = 0; o < cout; ++o)
      for (std::int64_t c = 0; c < cin_new; ++c)
        std::copy_n(s.data<double>() + (o * cin_old + c % cin_old) * taps, taps,
                    out.data<double>() + (o * cin_new + c) * taps);
    copies.emplace_back(param, out);
    report.loaded.push_back(key);
    report.reshaped.push_back(fmt::format("{}: {} -> {} (input channels repeated)", key, src.shape(), param.shape()));
  }
  for (const auto& [k, t] : pretrained)
    if (!in_model.count(k)) report.unexpected.push_back(k);
  STUNET_CHECK(report.missing.empty() && report.mismatched.empty(),
               "load_pretrained: {} parameters missing from the file [{}] and {} with incompatible shapes [{}]; is "
               "the model configured like the pretrained one (depth, dims, pool kernels)?",
               report.missing.size(), fmt::join(report.missing, ", "), report.mismatched.size(),
               fmt::join(report.mismatched, "; "));
  for (auto& [param, value] : copies) Module::assign(param, value);
  return report;
}

}  // namespace stunet::nn
