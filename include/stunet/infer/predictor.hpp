#pragma once
/// \file
/// Prediction of whole cases: NIfTI file(s) -> preprocessing with the model's
/// plan -> sliding window -> argmax (optionally probabilities) -> back to the
/// input grid -> NIfTI with the input's affine and header codes.
///
/// A model is its weights plus a small plan (JSON) that records what the
/// network needs: target spacing and normalisation (with CT statistics), the
/// patch, the STU-Net configuration (pool kernels included, which weights
/// cannot tell), class and channel names. The plan lives next to the weights
/// (`<weights stem>.plan.json`, else `plan.json` in the same folder); the
/// released TotalSegmentator models' plan is built in.
///
/// Modes, as nnU-Net / TotalSegmentator users know them:
/// - normal: mirror TTA over the plan's axes, logits resampled (linear) to
///   the input grid, then argmax (nnU-Net's export);
/// - fast: no TTA, argmax at network spacing with the streamed sliding window
///   (memory K * patch_d * H * W instead of K * D * H * W), the label map
///   resampled to the input grid (nnU-Net's label rule), optionally at a
///   coarser spacing than the plan's.
///
/// Label maps are written as uint8 (uint16 on disk beyond 256 classes).

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "stunet/autograd/grad_mode.hpp"
#include "stunet/core/error.hpp"
#include "stunet/core/parallel.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/data/dataset.hpp"
#include "stunet/data/image.hpp"
#include "stunet/data/preprocess.hpp"
#include "stunet/data/resample.hpp"
#include "stunet/infer/label_orders.hpp"
#include "stunet/infer/sliding_window.hpp"
#include "stunet/io/nifti.hpp"
#include "stunet/io/safetensors.hpp"
#include "stunet/io/weights.hpp"
#include "stunet/nn/stunet.hpp"

namespace stunet::infer {

// ======================================================================
// The plan
// ======================================================================

/// Tag of the plan file format (shared with stunet-pretrain / -finetune,
/// which write plan.json next to their checkpoints).
inline constexpr const char* kPlanFormat = "stunet-plan-1";

/// What a trained model needs to predict a case.
struct ModelPlan {
  nn::STUNetConfig network;             ///< depth, widths, pool kernels, channels, classes
  Extent3 patch{128, 128, 128};         ///< sliding-window tile (D, H, W)
  double step_size = 0.5;               ///< tile step as a fraction of the patch
  std::vector<int> mirror_axes{0, 1, 2};  ///< TTA axes in normal mode (0 = D, 1 = H, 2 = W)
  data::PreprocessPlan preprocess;      ///< spacing, normalisation, resampling orders
  std::vector<std::string> labels;      ///< index = output channel; size num_classes
  std::vector<std::string> channel_names;  ///< index = input channel; size in_channels
};

/// Throws naming the inconsistency (patch not divisible by the pooling,
/// label or channel lists of the wrong length, ...).
inline void validate(const ModelPlan& p) {
  nn::validate(p.network);
  for (std::size_t a = 0; a < 3; ++a) {
    std::int64_t f = 1;
    for (const auto& k : p.network.pool) f *= k[a];
    STUNET_CHECK(p.patch[a] >= 1 && p.patch[a] % f == 0,
                 "plan: patch {} x {} x {} is not divisible by the network's pooling product {} on axis {}",
                 p.patch[0], p.patch[1], p.patch[2], f, a);
  }
  STUNET_CHECK(p.step_size > 0 && p.step_size <= 1, "plan: step_size {} must be in (0, 1]", p.step_size);
  for (int a : p.mirror_axes) STUNET_CHECK(a >= 0 && a < 3, "plan: mirror axis {} is not 0, 1 or 2", a);
  STUNET_CHECK(static_cast<int>(p.labels.size()) == p.network.num_classes,
               "plan: {} label names for a network with {} classes", p.labels.size(), p.network.num_classes);
  STUNET_CHECK(static_cast<int>(p.channel_names.size()) == p.network.in_channels,
               "plan: {} channel names for a network with {} input channels", p.channel_names.size(),
               p.network.in_channels);
  const auto& pre = p.preprocess;
  STUNET_CHECK(pre.channel_normalization.empty() ||
                   static_cast<int>(pre.channel_normalization.size()) == p.network.in_channels,
               "plan: {} channel_normalization entries for {} input channels", pre.channel_normalization.size(),
               p.network.in_channels);
  for (int c = 0; c < p.network.in_channels; ++c)
    if (pre.scheme(c) == data::Normalization::ct)
      STUNET_CHECK(pre.ct.has_value() || !pre.channel_ct.empty(),
                   "plan: channel {} uses CT normalisation but the plan has no CT statistics ('ct' with mean, std, "
                   "percentile_00_5, percentile_99_5)", c);
}

/// The STU-Net configuration as JSON (the same fields as training
/// checkpoints: in_channels, num_classes, depth, dims, pool, kernel).
inline nlohmann::json network_to_json(const nn::STUNetConfig& c) {
  return {{"in_channels", c.in_channels}, {"num_classes", c.num_classes}, {"depth", c.depth},
          {"dims", c.dims},               {"pool", c.pool},               {"kernel", c.kernel}};
}

/// The plan as JSON (every field; the keys of the training programs' plan.json).
inline nlohmann::json to_json_value(const ModelPlan& p) {
  return {{"format", kPlanFormat},
          {"model", network_to_json(p.network)},
          {"patch_size", p.patch},
          {"step_size", p.step_size},
          {"mirror_axes", p.mirror_axes},
          {"preprocessing", data::to_json_value(p.preprocess)},
          {"label_names", p.labels},
          {"channel_names", p.channel_names}};
}

/// The network configuration a state_dict implies (in_channels,
/// num_classes, depth, dims, kernel); the pool kernels leave no trace in the
/// weights and keep `base`'s. Throws when a key STU-Net needs is missing.
inline nn::STUNetConfig config_from_state_dict(const nn::StateDict& sd, nn::STUNetConfig base = {}) {
  auto find = [&](const std::string& key) -> const Tensor* {
    for (const auto& [k, t] : sd)
      if (k == key) return &t;
    return nullptr;
  };
  const Tensor* first = find("conv_blocks_context.0.0.conv1.weight");
  const Tensor* head = find("seg_outputs.0.weight");
  STUNET_CHECK(first && head && first->rank() == 5 && head->rank() == 5,
               "weights: no STU-Net keys (conv_blocks_context.0.0.conv1.weight, seg_outputs.0.weight); is this an "
               "STU-Net state_dict?");
  base.in_channels = static_cast<int>(first->size(1));
  base.num_classes = static_cast<int>(head->size(0));
  base.kernel = {static_cast<int>(first->size(2)), static_cast<int>(first->size(3)), static_cast<int>(first->size(4))};
  for (int s = 0; s < 6; ++s) {
    const Tensor* w = find(fmt::format("conv_blocks_context.{}.0.conv1.weight", s));
    STUNET_CHECK(w && w->rank() == 5, "weights: stage {} of the encoder is missing (conv_blocks_context.{}.0)", s, s);
    base.dims[static_cast<std::size_t>(s)] = static_cast<int>(w->size(0));
    int depth = 0;
    while (find(fmt::format("conv_blocks_context.{}.{}.conv1.weight", s, depth))) ++depth;
    base.depth[static_cast<std::size_t>(s)] = depth;
  }
  return base;
}

namespace detail {

template <class T> T plan_get(const nlohmann::json& j, const char* key, const char* what) {
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception& e) {
    STUNET_FAIL("plan: field '{}' ({}) is malformed: {}", key, what, e.what());
  }
}

}  // namespace detail

/// Parses a plan. Fields: "model" (alias "network": the STU-Net
/// configuration), "patch_size", "preprocessing" (alias "preprocess"),
/// "label_names" (alias "labels"), "channel_names", "step_size",
/// "mirror_axes". Network fields absent from "model" come from `weights`
/// when given (depth, widths, channels and classes are visible in a
/// state_dict; the pool kernels are not and default to 2 x 2 x 2), else from
/// "preset" ("small", "base", ...). Labels may be a list, an object
/// {"0": "background", ...} or "totalsegmentator"; "preprocessing" may omit
/// fields (nnU-Net's defaults fill them). Throws naming the bad field.
inline ModelPlan plan_from_json(const nlohmann::json& j, const nn::StateDict* weights = nullptr) {
  STUNET_CHECK(j.is_object(), "plan: expected a JSON object");
  if (j.contains("format"))
    STUNET_CHECK(j.at("format") == kPlanFormat, "plan: format {} is not '{}'", j.at("format").dump(), kPlanFormat);
  auto key = [&](const char* name, const char* alias) { return j.contains(name) ? name : alias; };
  ModelPlan p;
  const char* net_key = key("model", "network");
  const nlohmann::json net = j.contains(net_key) ? j.at(net_key) : nlohmann::json::object();
  STUNET_CHECK(net.is_object(), "plan: '{}' must be an object", net_key);
  nn::STUNetConfig c;
  if (net.contains("preset")) c = nn::preset(detail::plan_get<std::string>(net, "preset", "small, base, large, huge"));
  if (weights) {
    const nn::STUNetConfig w = config_from_state_dict(*weights, c);
    if (!net.contains("preset")) c = w;
    // A preset names the widths; the weights still decide the head and the stem.
    c.in_channels = w.in_channels;
    c.num_classes = w.num_classes;
  }
  if (net.contains("in_channels")) c.in_channels = detail::plan_get<int>(net, "in_channels", "an integer");
  if (net.contains("num_classes")) c.num_classes = detail::plan_get<int>(net, "num_classes", "an integer");
  if (net.contains("depth")) c.depth = detail::plan_get<std::array<int, 6>>(net, "depth", "6 integers");
  if (net.contains("dims")) c.dims = detail::plan_get<std::array<int, 6>>(net, "dims", "6 integers");
  if (net.contains("pool")) c.pool = detail::plan_get<std::array<nn::Int3, 5>>(net, "pool", "5 triples");
  if (net.contains("kernel")) c.kernel = detail::plan_get<nn::Int3>(net, "kernel", "a triple");
  c.deep_supervision = false;  // inference needs the full-resolution head only
  p.network = c;
  if (j.contains("patch_size")) p.patch = detail::plan_get<Extent3>(j, "patch_size", "3 integers");
  if (j.contains("step_size")) p.step_size = detail::plan_get<double>(j, "step_size", "a number");
  if (j.contains("mirror_axes")) p.mirror_axes = detail::plan_get<std::vector<int>>(j, "mirror_axes", "a list");
  const char* pre_key = key("preprocessing", "preprocess");
  STUNET_CHECK(j.contains(pre_key), "plan: missing field 'preprocessing' (target_spacing, normalization)");
  nlohmann::json pre = data::to_json_value(data::PreprocessPlan{});
  STUNET_CHECK(j.at(pre_key).is_object(), "plan: '{}' must be an object", pre_key);
  pre.update(j.at(pre_key));
  p.preprocess = data::plan_from_json(pre);
  const char* labels_key = key("label_names", "labels");
  if (j.contains(labels_key)) {
    const auto& l = j.at(labels_key);
    if (l.is_string()) {
      STUNET_CHECK(l.get<std::string>() == "totalsegmentator",
                   "plan: labels '{}' is not a list and not \"totalsegmentator\"", l.get<std::string>());
      for (auto n : kTotalSegmentatorLabels) p.labels.emplace_back(n);
    } else if (l.is_object()) {
      p.labels.assign(l.size(), std::string());
      for (const auto& [k, v] : l.items()) {
        std::size_t used = 0;
        long idx = -1;
        try {
          idx = std::stol(k, &used);
        } catch (const std::exception&) {
        }
        STUNET_CHECK(used == k.size() && idx >= 0 && static_cast<std::size_t>(idx) < l.size() && v.is_string(),
                     "plan: labels must map 0..{} to names, got key '{}'", l.size() - 1, k);
        p.labels[static_cast<std::size_t>(idx)] = v.get<std::string>();
      }
    } else {
      p.labels = detail::plan_get<std::vector<std::string>>(j, labels_key, "a list of names");
    }
  } else {
    for (int k = 0; k < c.num_classes; ++k) p.labels.push_back(k == 0 ? "background" : fmt::format("class_{}", k));
  }
  if (j.contains("channel_names"))
    p.channel_names = detail::plan_get<std::vector<std::string>>(j, "channel_names", "a list of names");
  else
    for (int k = 0; k < c.in_channels; ++k) p.channel_names.push_back(fmt::format("{}", k));
  validate(p);
  return p;
}

/// The plan of the released STU-Net TotalSegmentator models (1.5 mm
/// isotropic, z-score per image, patch 128^3, pool kernels [2,2,2] x 4 then
/// [1,1,2], 105 classes in kTotalSegmentatorLabels order) for a preset.
inline ModelPlan totalsegmentator_plan(std::string_view preset = "small") {
  ModelPlan p;
  p.network = nn::preset(preset);
  p.network.pool = {nn::Int3{2, 2, 2}, nn::Int3{2, 2, 2}, nn::Int3{2, 2, 2}, nn::Int3{2, 2, 2}, nn::Int3{1, 1, 2}};
  p.network.deep_supervision = false;
  p.preprocess.target_spacing = {1.5, 1.5, 1.5};
  p.preprocess.normalization = data::Normalization::zscore;
  for (auto n : kTotalSegmentatorLabels) p.labels.emplace_back(n);
  p.channel_names = {"CT"};
  validate(p);
  return p;
}

/// Reads a plan file (see plan_from_json).
inline ModelPlan read_model_plan(const std::filesystem::path& path, const nn::StateDict* weights = nullptr) {
  std::ifstream in(path);
  STUNET_CHECK(in.good(), "plan file '{}' cannot be opened", path.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    STUNET_FAIL("plan file '{}' is not valid JSON: {}", path.string(), e.what());
  }
  try {
    return plan_from_json(j, weights);
  } catch (const Error& e) {
    STUNET_FAIL("plan file '{}': {}", path.string(), e.what());
  }
}

/// Writes a plan as indented JSON (what pretrain / finetune leave next to
/// their weights).
inline void write_model_plan(const std::filesystem::path& path, const ModelPlan& plan) {
  validate(plan);
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp);
    STUNET_CHECK(out.good(), "cannot write plan file '{}'", tmp.string());
    out << to_json_value(plan).dump(2) << "\n";
    STUNET_CHECK(out.good(), "writing plan file '{}' failed", tmp.string());
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  STUNET_CHECK(!ec, "cannot rename '{}' to '{}': {}", tmp.string(), path.string(), ec.message());
}

/// The plan file that belongs to `weights`: `<stem>.plan.json` next to it
/// (stem without .safetensors / .model / .pth), else `plan.json` in its
/// folder; empty when neither exists.
inline std::filesystem::path find_plan_for_weights(const std::filesystem::path& weights) {
  const std::filesystem::path dir = weights.parent_path();
  const std::filesystem::path own = dir / (weights.stem().string() + ".plan.json");
  if (std::filesystem::exists(own)) return own;
  const std::filesystem::path shared = dir / "plan.json";
  if (std::filesystem::exists(shared)) return shared;
  return {};
}

// ======================================================================
// Reading the input
// ======================================================================

/// Why a volume looks like a label map rather than an image, or nothing:
/// NIfTI intent code 1002 (NIFTI_INTENT_LABEL), or only whole non-negative
/// values with at most `max_distinct` different ones.
inline std::optional<std::string> label_like_reason(const io::NiftiVolume& volume, const Tensor& scaled,
                                                    std::int64_t max_distinct = 128) {
  if (volume.header.intent_code == 1002) return std::string("its intent code is NIFTI_INTENT_LABEL (1002)");
  const Tensor x = scaled.to(DType::f32).contiguous();
  const float* p = x.data<float>();
  std::vector<std::uint8_t> seen(65536, 0);
  std::int64_t distinct = 0;
  float hi = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const float v = p[i];
    if (!(v >= 0 && v <= 65535 && v == std::floor(v))) return std::nullopt;
    auto& s = seen[static_cast<std::size_t>(v)];
    if (!s) {
      s = 1;
      if (++distinct > max_distinct) return std::nullopt;
    }
    hi = std::max(hi, v);
  }
  return fmt::format("it holds only {} distinct whole values in [0, {}]", distinct, hi);
}

/// One case read from its channel files: the image [C, D, H, W] float32 and
/// the header of the first file (whose codes the prediction keeps).
struct CaseInput {
  data::Image image;                          ///< [C, D, H, W] float32, geometry of the first file
  io::NiftiHeader header;                     ///< header of the first file (codes, units, version)
  std::vector<std::filesystem::path> files;   ///< the channel files, in channel order
};

/// Reads a case: one file per channel (nnU-Net's CASE_0000, _0001, ...) or
/// one 4D file holding all channels. Throws one clear error for a missing or
/// unreadable file, a 2D image, files on different grids, a label map given
/// as an image (unless allow_label_like), and a channel count other than
/// `expected_channels` (when > 0).
inline CaseInput read_case(const std::vector<std::filesystem::path>& files, std::int64_t expected_channels = 0,
                           bool allow_label_like = false) {
  STUNET_CHECK(!files.empty(), "predict: no input files given");
  CaseInput in;
  in.files = files;
  std::vector<Tensor> channels;
  for (const auto& f : files) {
    STUNET_CHECK(std::filesystem::exists(f), "input '{}' does not exist", f.string());
    const io::NiftiVolume v = io::read_nifti(f);
    Tensor t = v.scaled(DType::f32);
    const Shape s = t.shape();
    STUNET_CHECK(s[1] > 1 && s[2] > 1 && s[3] > 1,
                 "input '{}' is a 2D image (shape {} in nibabel's order): STU-Net segments 3D volumes", f.string(),
                 fmt::join(v.header.shape(), " x "));
    if (!allow_label_like) {
      const auto why = label_like_reason(v, t);
      STUNET_CHECK(!why, "input '{}' looks like a label map, not an image ({}); pass the image (e.g. "
                   "imagesTr/CASE_0000.nii.gz), or allow label-like inputs (--allow-label-input) if it really is one",
                   f.string(), why.value_or(""));
    }
    data::Image img{t, v.header.spacing(), v.header.affine()};
    if (channels.empty()) {
      in.header = v.header;
      in.image = img;
    } else {
      STUNET_CHECK(img.spatial_shape() == in.image.spatial_shape(),
                   "input '{}' has shape {} but '{}' has {}: channels must share one grid", f.string(), s,
                   files.front().string(), in.image.data.shape());
      STUNET_CHECK(data::same_geometry(img.affine, in.image.affine),
                   "input '{}' is on another grid (affine) than '{}': channels must share one grid", f.string(),
                   files.front().string());
    }
    channels.push_back(t);
  }
  if (channels.size() > 1) {
    std::int64_t C = 0;
    for (const auto& t : channels) C += t.size(0);
    const auto sp = in.image.spatial_shape();
    Tensor all = Tensor::empty(Shape{C, sp[0], sp[1], sp[2]}, DType::f32);
    std::int64_t c0 = 0;
    for (const auto& t : channels) {
      all.box({c0, 0, 0, 0}, t.shape()).copy_(t);
      c0 += t.size(0);
    }
    in.image.data = all;
  }
  if (expected_channels > 0 && in.image.channels() != expected_channels) {
    std::vector<std::string> names;
    for (const auto& f : files) names.push_back(f.string());
    STUNET_FAIL("the model takes {} input channel(s) but the case has {} ({} file(s): {}); give one file per "
                "channel in channel order", expected_channels, in.image.channels(), files.size(),
                fmt::join(names, ", "));
  }
  return in;
}

/// One case to predict: its id and its channel files in channel order.
struct CaseFiles {
  std::string id;                             ///< CASE of CASE_0000.nii.gz
  std::vector<std::filesystem::path> files;   ///< channel 0, 1, ...
};

/// The file name without .nii.gz / .nii, or empty for other files.
inline std::string nifti_stem(const std::filesystem::path& p) {
  const std::string name = p.filename().string();
  for (const char* ext : {".nii.gz", ".nii"}) {
    const std::string e = ext;
    if (name.size() > e.size() && name.compare(name.size() - e.size(), e.size(), e) == 0)
      return name.substr(0, name.size() - e.size());
  }
  return {};
}

/// Groups NIfTI files (and the NIfTI files of folders, not recursive) into
/// cases the nnU-Net way: CASE_0000, CASE_0001, ... are the channels of
/// CASE; a name without a 4-digit channel suffix is a one-channel case of
/// its own. Cases come sorted by id. Throws for a missing input, a file that
/// is not NIfTI, a channel gap (CASE_0000 and CASE_0002 only), or no files.
inline std::vector<CaseFiles> group_case_files(const std::vector<std::filesystem::path>& inputs) {
  std::map<std::string, std::map<int, std::filesystem::path>> cases;
  auto add = [&](const std::filesystem::path& f, bool from_folder) {
    const std::string stem = nifti_stem(f);
    if (stem.empty()) {
      STUNET_CHECK(from_folder, "input '{}' is not a NIfTI file (.nii or .nii.gz)", f.string());
      return;
    }
    std::string id = stem;
    int channel = 0;
    const bool suffixed = stem.size() > 5 && stem[stem.size() - 5] == '_' &&
                          std::all_of(stem.end() - 4, stem.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (suffixed) {
      id = stem.substr(0, stem.size() - 5);
      channel = std::stoi(stem.substr(stem.size() - 4));
    }
    auto& ch = cases[id];
    STUNET_CHECK(!ch.count(channel), "inputs: '{}' and '{}' are both channel {} of case '{}'", ch[channel].string(),
                 f.string(), channel, id);
    ch[channel] = f;
  };
  for (const auto& in : inputs) {
    STUNET_CHECK(std::filesystem::exists(in), "input '{}' does not exist", in.string());
    if (std::filesystem::is_directory(in)) {
      std::vector<std::filesystem::path> files;
      for (const auto& e : std::filesystem::directory_iterator(in))
        if (e.is_regular_file()) files.push_back(e.path());
      std::sort(files.begin(), files.end());
      for (const auto& f : files) add(f, true);
    } else {
      add(in, false);
    }
  }
  STUNET_CHECK(!cases.empty(), "inputs: no .nii or .nii.gz files found");
  std::vector<CaseFiles> out;
  for (auto& [id, channels] : cases) {
    CaseFiles c{id, {}};
    int expect = 0;
    std::vector<int> present;
    for (const auto& kv : channels) present.push_back(kv.first);
    for (auto& [k, f] : channels) {
      STUNET_CHECK(k == expect, "case '{}' has channel files {} but no channel {} ({}_{:04d})", id,
                   fmt::join(present, ", "), expect, id, expect);
      c.files.push_back(f);
      ++expect;
    }
    out.push_back(std::move(c));
  }
  return out;
}

// ======================================================================
// The predictor
// ======================================================================

/// How to predict one case.
struct PredictOptions {
  bool fast = false;                          ///< no TTA, argmax at network spacing, label map resampled
  std::optional<data::Spacing> spacing;       ///< predict at this spacing instead of the plan's (coarser = faster)
  std::optional<bool> mirroring;              ///< TTA on/off (default: on, off in fast mode)
  std::optional<double> step_size;            ///< default: the plan's
  std::int64_t tile_batch = 1;                ///< tiles per forward pass
  bool probabilities = false;                 ///< also return softmax probabilities on the input grid (normal mode)
  bool allow_label_like_input = false;        ///< skip the label-map check of read_case
  Device device = Device::cpu();              ///< where the network runs (tiles go there and back)
  DType compute_dtype = DType::f32;           ///< activations: float32, or float16 / bfloat16 on CUDA
  TileProgress progress;                      ///< per batch of tiles
};

/// Seconds spent per stage of one case.
struct StageTimes {
  double read = 0, preprocess = 0, predict = 0, export_ = 0;
};

/// A predicted case on the input grid.
struct CasePrediction {
  data::Image labels;                         ///< [1, D, H, W] uint8 (int32 beyond 256 classes)
  std::optional<data::Image> probabilities;   ///< [K, D, H, W] float32 when asked for
  StageTimes times;
  std::int64_t tiles = 0;                     ///< sliding-window tiles
  Extent3 network_shape{};                    ///< the preprocessed grid (D, H, W)
};

/// A model ready to predict: plan + STU-Net with its weights. The network
/// runs under NoGradGuard and never records a graph.
class Predictor {
 public:
  /// plan: validated; weights: an STU-Net state_dict (official keys); every
  /// parameter must be present with its shape, other tensors are ignored.
  Predictor(ModelPlan plan, const nn::StateDict& weights) : plan_(std::move(plan)) {
    validate(plan_);
    plan_.network.deep_supervision = false;
    net_ = std::make_shared<nn::STUNet>(plan_.network);
    nn::StateDict model_weights;
    for (const auto& [k, t] : weights)
      if (k.rfind("optimizer.", 0) != 0) model_weights.emplace_back(k, t);
    // Every parameter must be there with its shape; extra tensors (reference
    // inputs, optimiser state) are ignored.
    const nn::LoadReport r = net_->load_state_dict(model_weights, /*strict=*/false);
    auto some = [](const std::vector<std::string>& v) {
      std::vector<std::string> head(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(std::min<std::size_t>(v.size(), 3)));
      if (v.size() > 3) head.emplace_back("...");
      return fmt::format("{}", fmt::join(head, "; "));
    };
    STUNET_CHECK(r.missing.empty() && r.mismatched.empty(),
                 "the weights do not fit the plan's network (depth {}, dims {}, {} -> {} channels): {} parameters "
                 "missing [{}], {} with other shapes [{}]",
                 fmt::join(plan_.network.depth, ","), fmt::join(plan_.network.dims, ","), plan_.network.in_channels,
                 plan_.network.num_classes, r.missing.size(), some(r.missing), r.mismatched.size(),
                 some(r.mismatched));
    net_->eval();
  }

  /// A model from its files: weights in any format load_state_dict_file
  /// reads; the plan from `plan_spec`: a file path, the JSON text itself
  /// (starting with '{'), "totalsegmentator" (the built-in plan, depth and
  /// widths taken from the weights), or empty: the plan file next to the
  /// weights (find_plan_for_weights), else the one a training checkpoint
  /// stores in its metadata.
  static Predictor load(const std::filesystem::path& weights_path, const std::string& plan_spec = {}) {
    STUNET_CHECK(!weights_path.empty(), "predict: no weights file given");
    STUNET_CHECK(std::filesystem::exists(weights_path), "weights file '{}' does not exist", weights_path.string());
    nn::StateDict weights;
    nlohmann::json embedded;  // a training checkpoint carries its plan in the "extra" metadata
    if (weights_path.extension() == ".safetensors") {
      io::SafetensorsFile f = io::read_safetensors(weights_path);
      weights = std::move(f.tensors);
      if (auto it = f.metadata.find("extra"); it != f.metadata.end()) {
        const auto extra = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
        if (extra.is_object() && extra.contains("plan") && extra.at("plan").is_object()) embedded = extra.at("plan");
      }
    } else {
      weights = io::load_state_dict_file(weights_path);
    }
    ModelPlan plan;
    if (!plan_spec.empty() && plan_spec.front() == '{') {  // the plan itself, inline
      const auto j = nlohmann::json::parse(plan_spec, nullptr, /*allow_exceptions=*/false);
      STUNET_CHECK(!j.is_discarded(), "the plan given inline is not valid JSON: {}", plan_spec);
      plan = plan_from_json(j, &weights);
    } else if (plan_spec == "totalsegmentator") {
      plan = totalsegmentator_plan();
      const nn::STUNetConfig w = config_from_state_dict(weights, plan.network);
      plan.network.depth = w.depth;
      plan.network.dims = w.dims;
      plan.network.kernel = w.kernel;
      STUNET_CHECK(w.num_classes == 105 && w.in_channels == 1,
                   "'{}' has {} input channel(s) and {} classes; the TotalSegmentator plan needs 1 and 105",
                   weights_path.string(), w.in_channels, w.num_classes);
    } else {
      const std::filesystem::path p =
          plan_spec.empty() ? find_plan_for_weights(weights_path) : std::filesystem::path(plan_spec);
      if (p.empty() && !embedded.is_null()) {
        try {
          plan = plan_from_json(embedded, &weights);
        } catch (const Error& e) {
          STUNET_FAIL("the plan stored in '{}': {}", weights_path.string(), e.what());
        }
      } else {
        STUNET_CHECK(!p.empty(), "no plan for '{}': looked for '{}' and '{}'; pass one (or \"totalsegmentator\" "
                     "for the released TotalSegmentator models)", weights_path.string(),
                     (weights_path.parent_path() / (weights_path.stem().string() + ".plan.json")).string(),
                     (weights_path.parent_path() / "plan.json").string());
        STUNET_CHECK(std::filesystem::exists(p), "plan file '{}' does not exist", p.string());
        plan = read_model_plan(p, &weights);
      }
    }
    return Predictor(std::move(plan), weights);
  }

  /// The validated plan (deep supervision off).
  const ModelPlan& plan() const { return plan_; }
  /// The STU-Net with its weights.
  const nn::STUNet& network_module() const { return *net_; }

  /// The sliding-window callable: x [B, C, pd, ph, pw] -> full-resolution
  /// logits [B, K, pd, ph, pw].
  Network network() const {
    std::shared_ptr<const nn::STUNet> net = net_;
    return [net](const Tensor& x) {
      NoGradGuard no_grad;
      const Device dev = net->device();
      return net->forward(x.device() == dev ? x : x.to(dev))[0];
    };
  }

  /// The sliding-window options a prediction with `o` uses.
  SlidingWindowOptions window_options(const PredictOptions& o) const {
    SlidingWindowOptions w;
    w.patch = plan_.patch;
    w.step_size = o.step_size.value_or(plan_.step_size);
    const bool mirror = o.mirroring.value_or(!o.fast);
    w.mirror_axes = mirror ? plan_.mirror_axes : std::vector<int>{};
    w.tile_batch = o.tile_batch;
    w.progress = o.progress;
    return w;
  }

  /// Predicts an image in memory: image [C, D, H, W] (any float dtype) with
  /// its spacing and affine. Returns labels on the image's grid.
  CasePrediction predict(const data::Image& image, const PredictOptions& o = {}) const {
    data::check_image(image, "predict");
    STUNET_CHECK(o.compute_dtype == DType::f32 ||
                     (o.device.is_cuda() && (o.compute_dtype == DType::f16 || o.compute_dtype == DType::bf16)),
                 "predict: compute dtype {} on {}: float16 / bfloat16 run on CUDA only", o.compute_dtype, o.device);
    // The model moves to the device of the request (once; later calls on the
    // same device find it there).
    net_->to(o.device);
    net_->set_compute_dtype(o.compute_dtype);
    STUNET_CHECK(image.channels() == plan_.network.in_channels,
                 "predict: the model takes {} input channel(s) ({}), the image has {} (shape {})",
                 plan_.network.in_channels, fmt::join(plan_.channel_names, ", "), image.channels(), image.data.shape());
    const auto s = image.spatial_shape();
    STUNET_CHECK(s[0] > 1 && s[1] > 1 && s[2] > 1,
                 "predict: image of shape {} is 2D; STU-Net segments 3D volumes", image.data.shape());
    STUNET_CHECK(!(o.fast && o.probabilities),
                 "predict: probabilities need the normal mode (fast mode takes the argmax at network spacing)");
    using clock = std::chrono::steady_clock;
    auto seconds = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double>(b - a).count(); };
    CasePrediction out;
    data::PreprocessPlan pre = plan_.preprocess;
    if (o.spacing) {
      for (double v : *o.spacing)
        STUNET_CHECK(std::isfinite(v) && v > 0, "predict: spacing ({}, {}, {}) must be positive", (*o.spacing)[0],
                     (*o.spacing)[1], (*o.spacing)[2]);
      pre.target_spacing = *o.spacing;
    }
    auto t0 = clock::now();
    const data::PreprocessedCase pc = data::preprocess_case(image, nullptr, pre, 0);
    auto t1 = clock::now();
    out.times.preprocess = seconds(t0, t1);
    const auto& props = pc.properties;
    out.network_shape = {pc.data.size(1), pc.data.size(2), pc.data.size(3)};
    const SlidingWindowOptions w = window_options(o);
    out.tiles = static_cast<std::int64_t>(
        tile_origins(padding_for(out.network_shape, w.patch).padded(out.network_shape), w.patch, w.step_size).size());
    const Network net = network();
    if (o.fast) {
      const Tensor labels = predict_sliding_window_argmax(net, pc.data, w);
      auto t2 = clock::now();
      out.times.predict = seconds(t1, t2);
      out.labels = data::restore_labels(labels, props);
      out.times.export_ = seconds(t2, clock::now());
    } else {
      const Tensor logits = predict_sliding_window(net, pc.data, w);
      auto t2 = clock::now();
      out.times.predict = seconds(t1, t2);
      out.labels = data::restore_probabilities(logits, props);
      if (o.probabilities) out.probabilities = restore_softmax(logits, props);
      out.times.export_ = seconds(t2, clock::now());
    }
    // The input's own geometry (preprocessing hands it back; be explicit).
    out.labels.affine = image.affine;
    out.labels.spacing = image.spacing;
    return out;
  }

  /// Reads the channel files of one case (read_case) and predicts it; the
  /// header of the first file is returned for write_prediction.
  CasePrediction predict_files(const std::vector<std::filesystem::path>& files, const PredictOptions& o,
                               io::NiftiHeader* header = nullptr, data::Image* image = nullptr) const {
    const auto t0 = std::chrono::steady_clock::now();
    CaseInput in = read_case(files, plan_.network.in_channels, o.allow_label_like_input);
    const double read = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CasePrediction p = predict(in.image, o);
    p.times.read = read;
    if (header) *header = in.header;
    if (image) *image = in.image;
    return p;
  }

  /// Softmax probabilities on the input grid from logits on the network grid:
  /// nnU-Net's export (logits resampled linearly, nearest along a separate
  /// axis; softmax; background 1 outside the crop). logits: [K, d, h, w].
  static data::Image restore_softmax(const Tensor& logits, const data::CaseProperties& props) {
    const auto axis =
        data::resampling_separate_axis(props.target_spacing, props.original_spacing, props.anisotropy_threshold);
    Tensor r = data::resample_image(logits, props.shape_after_crop, data::Interp::linear, axis, data::Interp::nearest)
                   .contiguous();
    if (r.storage() == logits.storage()) r = r.clone();  // same grid: resample_image hands back the input
    const std::int64_t K = r.size(0), V = r.size(1) * r.size(2) * r.size(3);
    float* p = r.data<float>();
    STUNET_OMP(parallel for schedule(static))
    for (std::int64_t i = 0; i < V; ++i) {
      float mx = p[i];
      for (std::int64_t k = 1; k < K; ++k) mx = std::max(mx, p[k * V + i]);
      double sum = 0;
      for (std::int64_t k = 0; k < K; ++k) sum += std::exp(static_cast<double>(p[k * V + i] - mx));
      for (std::int64_t k = 0; k < K; ++k)
        p[k * V + i] = static_cast<float>(std::exp(static_cast<double>(p[k * V + i] - mx)) / sum);
    }
    const auto& o = props.original_shape;
    Tensor full = Tensor::zeros(Shape{K, o[0], o[1], o[2]}, DType::f32);
    if (K > 0) full.box({0, 0, 0, 0}, Shape{1, o[0], o[1], o[2]}).fill_(1.0);
    const auto& b = props.bbox;
    full.box({0, b[0][0], b[1][0], b[2][0]}, r.shape()).copy_(r);
    return data::Image{full, props.original_spacing, props.original_affine};
  }

 private:
  ModelPlan plan_;
  std::shared_ptr<nn::STUNet> net_;
};

/// The on-disk type of a label map with `num_classes` classes: uint8 up to
/// 256 classes, else uint16.
inline io::NiftiDType label_disk_type(std::int64_t num_classes) {
  STUNET_CHECK(num_classes >= 1 && num_classes <= 65536, "label maps of {} classes cannot be written", num_classes);
  return num_classes <= 256 ? io::NiftiDType::u8 : io::NiftiDType::u16;
}

namespace detail {

/// The image with its spacing taken from the affine's column norms, which
/// is what the header writer checks against (pixdim of a `like` header may
/// disagree in badly written inputs; the affine is what places the voxels).
inline data::Image with_affine_spacing(data::Image image) {
  for (std::size_t c = 0; c < 3; ++c) {
    const auto& a = image.affine;
    image.spacing[2 - c] = std::sqrt(a[0][c] * a[0][c] + a[1][c] * a[1][c] + a[2][c] * a[2][c]);
  }
  return image;
}

}  // namespace detail

/// Writes a predicted label map with the input's header (`like`: affine,
/// sform/qform codes, units, description), as uint8 or uint16 on disk.
inline void write_prediction(const std::filesystem::path& path, const data::Image& labels, std::int64_t num_classes,
                             const io::NiftiHeader* like = nullptr) {
  io::write_image(path, detail::with_affine_spacing(labels), label_disk_type(num_classes), like);
}

/// Writes probabilities [K, D, H, W] as a 4D float32 NIfTI (t = class) with
/// the input's header.
inline void write_probabilities(const std::filesystem::path& path, const data::Image& probabilities,
                                const io::NiftiHeader* like = nullptr) {
  io::write_image(path, detail::with_affine_spacing(probabilities), io::NiftiDType::f32, like);
}

}  // namespace stunet::infer
