#pragma once
/// \file
/// Module: a tree of named children and parameters whose dotted names are
/// exactly PyTorch's state_dict keys ("conv_blocks_context.0.0.conv1.weight"),
/// so that official checkpoints load unchanged.

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <algorithm>

#include <fmt/ranges.h>

#include "stunet/core/tensor.hpp"

namespace stunet::nn {

/// What load_state_dict did, key by key.
struct LoadReport {
  std::vector<std::string> loaded;      ///< copied into the module
  std::vector<std::string> missing;     ///< in the module, not in the file
  std::vector<std::string> unexpected;  ///< in the file, not in the module
  std::vector<std::string> mismatched;  ///< in both, with different shapes ("key: file [..] vs model [..]")
  std::vector<std::string> skipped;     ///< excluded by the caller's filter
  std::vector<std::string> reshaped;    ///< adapted by the caller's adapter (e.g. repeated input channels)
};

/// A named tensor list, in PyTorch's state_dict order.
using StateDict = std::vector<std::pair<std::string, Tensor>>;

class Module {
 public:
  virtual ~Module() = default;
  Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  /// Every parameter with its full dotted name, depth first in registration
  /// order (the order of PyTorch's named_parameters()).
  StateDict named_parameters(const std::string& prefix = "") const {
    StateDict out;
    collect(prefix, out);
    return out;
  }
  /// The parameters alone, in named_parameters() order.
  std::vector<Tensor> parameters() const {
    std::vector<Tensor> out;
    for (auto& [k, t] : named_parameters()) out.push_back(t);
    return out;
  }
  /// The state_dict: parameters (STU-Net has no buffers: its instance norms
  /// keep no running statistics).
  StateDict state_dict() const { return named_parameters(); }
  /// Number of scalar parameters.
  std::int64_t parameter_count() const {
    std::int64_t n = 0;
    for (auto& [k, t] : named_parameters()) n += t.numel();
    return n;
  }
  /// Clears every parameter's gradient.
  void zero_grad() {
    for (auto& [k, t] : named_parameters()) t.zero_grad();
  }
  /// Training mode (the default) or evaluation mode, for this module and all
  /// children. STU-Net behaves the same in both; the flag is for callers.
  void train(bool on = true) {
    training_ = on;
    for (auto& [name, child] : children_) child->train(on);
  }
  void eval() { train(false); }

  /// Moves every parameter to `device` in place (torch's module.to(device)):
  /// the parameter objects keep their identity, so handles held elsewhere
  /// follow; gradients are dropped. Create the optimiser after the move (its
  /// momentum buffers are made on the parameters' device).
  void to(Device device) {
    for (auto& [k, t] : named_parameters()) {
      if (t.device() == device) continue;
      t.set_data(t.detach().contiguous().to(device));
    }
  }
  /// The device of the parameters (the host for a module without any).
  Device device() const {
    StateDict p = named_parameters();
    return p.empty() ? Device::cpu() : p.front().second.device();
  }
  bool is_training() const { return training_; }

  /// Copies tensors from `state` into the parameters of the same name
  /// (converting dtype). strict: every parameter must be present with its
  /// shape and no extra keys may exist, else stunet::Error listing them and
  /// nothing is modified. Non-strict: loads what matches and reports the rest.
  LoadReport load_state_dict(const StateDict& state, bool strict = true) {
    std::map<std::string, const Tensor*> file;
    for (const auto& [k, t] : state) file[k] = &t;
    LoadReport report;
    StateDict mine = named_parameters();
    std::map<std::string, bool> known;
    std::vector<std::pair<Tensor, const Tensor*>> copies;
    for (auto& [key, param] : mine) {
      known[key] = true;
      auto it = file.find(key);
      if (it == file.end()) {
        report.missing.push_back(key);
      } else if (!(it->second->shape() == param.shape())) {
        report.mismatched.push_back(fmt::format("{}: file {} vs model {}", key, it->second->shape(), param.shape()));
      } else {
        copies.emplace_back(param, it->second);
        report.loaded.push_back(key);
      }
    }
    for (const auto& [k, t] : state)
      if (!known.count(k)) report.unexpected.push_back(k);
    if (strict) {
      STUNET_CHECK(report.missing.empty() && report.unexpected.empty() && report.mismatched.empty(),
                   "load_state_dict (strict): {} missing [{}], {} unexpected [{}], {} with other shapes [{}]",
                   report.missing.size(), fmt::join(first(report.missing), ", "), report.unexpected.size(),
                   fmt::join(first(report.unexpected), ", "), report.mismatched.size(),
                   fmt::join(first(report.mismatched), "; "));
    }
    for (auto& [param, src] : copies) assign(param, *src);
    return report;
  }

  /// Overwrites a parameter's values in place, keeping its identity (handles
  /// held by an optimiser stay valid). src: the parameter's shape, any dtype.
  static void assign(const Tensor& param, const Tensor& src) {
    STUNET_CHECK(param.shape() == src.shape(), "assign: source {} for a parameter of shape {}", src.shape(),
                 param.shape());
    param.detach().copy_(src);
  }

 protected:
  /// Registers a parameter (a float leaf that requires grad) under `name`.
  Tensor& register_parameter(const std::string& name, Tensor t) {
    t.set_requires_grad(true);
    params_.emplace_back(name, std::move(t));
    return params_.back().second;
  }
  /// Registers a child module under `name` and returns it.
  template <class M> std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> m) {
    children_.emplace_back(name, m);
    return m;
  }

 private:
  static std::vector<std::string> first(const std::vector<std::string>& v, std::size_t n = 8) {
    std::vector<std::string> out(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(std::min(n, v.size())));
    if (v.size() > n) out.push_back("...");
    return out;
  }
  void collect(const std::string& prefix, StateDict& out) const {
    for (const auto& [name, t] : params_) out.emplace_back(prefix + name, t);
    for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
  }

  std::vector<std::pair<std::string, Tensor>> params_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

/// A list of children named "0", "1", ... (PyTorch's nn.ModuleList and
/// nn.Sequential name their children this way).
template <class M> class ModuleList : public Module {
 public:
  /// Appends `m` under the next index.
  std::shared_ptr<M> push_back(std::shared_ptr<M> m) {
    items_.push_back(register_module(std::to_string(items_.size()), std::move(m)));
    return items_.back();
  }
  std::size_t size() const { return items_.size(); }
  M& operator[](std::size_t i) const { return *items_.at(i); }
  auto begin() const { return items_.begin(); }
  auto end() const { return items_.end(); }

 private:
  std::vector<std::shared_ptr<M>> items_;
};

}  // namespace stunet::nn
