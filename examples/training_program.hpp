#pragma once
// What stunet-pretrain and stunet-finetune share: the command line, the
// dataset -> plan -> preprocessed cache -> split -> model -> Trainer path.
// A program file, not a library header: it prints and returns exit codes.

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <stunet/data/dataset.hpp>
#include <stunet/data/loader.hpp>
#include <stunet/data/preprocess.hpp>
#include <stunet/io/nifti.hpp>
#include <stunet/io/weights.hpp>
#include <stunet/nn/pretrained.hpp>
#include <stunet/nn/stunet.hpp>
#include <stunet/train/trainer.hpp>

#include "device_options.hpp"

namespace stunet::programs {

struct TrainArgs {
  std::string dataset, out, preset = "small", device = "cpu", precision = "fp32", norm = "auto", pretrained;
  std::vector<int> depth, dims, patch{128, 128, 128};
  std::vector<double> spacing;
  int batch = 2, iterations = 250, val_batches = 50, workers = 2;
  std::int64_t epochs = 1000;
  double lr = 1e-2, momentum = 0.99, backbone_lr_factor = 1.0, val_fraction = 0.2;
  std::uint64_t seed = 0;
  bool no_augment = false, elastic = false, quiet = false, resume = false;
};

/// Registers the flags both programs take.
inline void add_training_flags(CLI::App& app, TrainArgs& a) {
  app.add_option("-d,--dataset", a.dataset, "nnU-Net v2 raw dataset folder (dataset.json, imagesTr, labelsTr)")
      ->required();
  app.add_option("-o,--out", a.out, "output folder: checkpoints, training_log.csv, progress.png, plan.json, "
                                    "preprocessed cache")
      ->required();
  app.add_option("-m,--model", a.preset, "STU-Net preset: small, base, large, huge (ignored with --depth/--dims)");
  app.add_option("--depth", a.depth, "custom model: six residual-block counts, e.g. 1 1 1 1 1 1")->expected(6);
  app.add_option("--dims", a.dims, "custom model: six stage widths, e.g. 16 32 64 128 256 256")->expected(6);
  app.add_option("--patch", a.patch, "patch size D H W (one value for a cube); pool kernels follow from it")
      ->expected(1, 3);
  app.add_option("--batch", a.batch, "patches per batch (nnU-Net: 2)")->check(CLI::PositiveNumber);
  app.add_option("--epochs", a.epochs, "epochs (nnU-Net: 1000; the poly schedule decays over them)")
      ->check(CLI::PositiveNumber);
  app.add_option("--iterations", a.iterations, "iterations per epoch (nnU-Net: 250)")->check(CLI::PositiveNumber);
  app.add_option("--val-batches", a.val_batches, "validation batches per epoch (nnU-Net: 50)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--val-fraction", a.val_fraction, "share of the cases held out for validation (nnU-Net fold 0: 0.2)")
      ->check(CLI::Range(0.0, 0.9));
  app.add_option("--lr", a.lr, "initial learning rate (poly decay to 0)")->check(CLI::PositiveNumber);
  app.add_option("--momentum", a.momentum,
                 "SGD Nesterov momentum (nnU-Net: 0.99; it averages ~100 steps, so runs of a few hundred steps learn "
                 "faster with 0.9 and a 10x lr: the same lr / (1 - momentum))")
      ->check(CLI::Range(0.0, 0.999));
  app.add_option("--backbone-lr-factor", a.backbone_lr_factor,
                 "learning rate of everything but the seg heads relative to --lr (the paper's fine-tuning: 0.1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--spacing", a.spacing, "target spacing D H W in mm (default: the dataset's median, as nnU-Net)")
      ->expected(1, 3);
  app.add_option("--norm", a.norm, "intensity normalisation: auto (CT channels: nnU-Net CT, else z-score), zscore, ct")
      ->check(CLI::IsMember({"auto", "zscore", "ct"}));
  app.add_option("--device", a.device, "cpu, cuda or cuda:N");
  app.add_option("--precision", a.precision,
                 "activations on CUDA: fp32, fp16 (with dynamic loss scaling) or bf16; master weights stay float32")
      ->check(CLI::IsMember({"fp32", "fp16", "bf16"}));
  app.add_option("--workers", a.workers, "data-loader threads (augmentation runs beside the model's step)")
      ->check(CLI::Range(0, 64));
  app.add_option("--seed", a.seed, "seed of initialisation, split, sampling and augmentation (same seed, same run)");
  app.add_flag("--no-augment", a.no_augment, "train without data augmentation");
  app.add_flag("--elastic", a.elastic, "add elastic deformation (off in nnU-Net v2, on in the STU-Net paper)");
  app.add_flag("--resume", a.resume, "continue from OUT/checkpoint_latest.safetensors exactly where it stopped");
  app.add_flag("-q,--quiet", a.quiet, "no progress bar");
}

/// Pool kernels for a patch: halve an axis while it stays >= 8 voxels at the
/// next stage (nnU-Net stops at a 4-voxel feature map); 1 otherwise.
inline std::array<nn::Int3, 5> pool_kernels_for(const std::array<std::int64_t, 3>& patch) {
  std::array<nn::Int3, 5> pool{};
  std::array<std::int64_t, 3> size = patch;
  for (std::size_t s = 0; s < 5; ++s)
    for (std::size_t a = 0; a < 3; ++a) {
      const bool halve = size[a] % 2 == 0 && size[a] / 2 >= 4;
      pool[s][a] = halve ? 2 : 1;
      if (halve) size[a] /= 2;
    }
  return pool;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// Everything a trained model needs at prediction time, next to its weights.
inline nlohmann::json make_model_plan(const data::Dataset& ds, const data::PreprocessPlan& plan,
                                      const nn::STUNetConfig& config, const std::array<std::int64_t, 3>& patch) {
  nlohmann::json j;
  j["format"] = "stunet-plan-1";
  j["preprocessing"] = data::to_json_value(plan);
  j["model"] = train::config_to_json(config);
  j["patch_size"] = patch;
  j["label_names"] = ds.label_names;
  j["channel_names"] = ds.channel_names;
  j["file_ending"] = ds.file_ending;
  return j;
}

/// The whole training program; returns the exit code.
inline int run_training(const TrainArgs& a, bool finetune) {
  namespace fs = std::filesystem;
  const Device device = parse_device(a.device);
  const DType precision = parse_precision(a.precision);
  check_device_and_precision(device, precision);
  std::array<std::int64_t, 3> patch{};
  STUNET_CHECK(a.patch.size() == 1 || a.patch.size() == 3, "--patch takes 1 or 3 values");
  for (std::size_t i = 0; i < 3; ++i) patch[i] = a.patch[a.patch.size() == 1 ? 0 : i];
  for (auto p : patch) STUNET_CHECK(p >= 8 && p <= 1024, "--patch {} is outside 8..1024", p);

  const data::Dataset ds = data::open_dataset(a.dataset);
  std::fprintf(stderr, "dataset '%s': %zu cases, %d channel(s), %d classes\n", ds.name.c_str(), ds.cases.size(),
               ds.num_channels(), ds.num_classes());

  // Plan: target spacing (median) and normalisation per channel.
  data::PreprocessPlan plan;
  if (!a.spacing.empty()) {
    STUNET_CHECK(a.spacing.size() == 1 || a.spacing.size() == 3, "--spacing takes 1 or 3 values");
    for (std::size_t i = 0; i < 3; ++i) plan.target_spacing[i] = a.spacing[a.spacing.size() == 1 ? 0 : i];
  } else {
    std::array<std::vector<double>, 3> sp;
    for (const auto& c : ds.cases) {
      const auto s = io::read_nifti_header(c.images.front()).spacing();
      for (std::size_t i = 0; i < 3; ++i) sp[i].push_back(s[i]);
    }
    for (std::size_t i = 0; i < 3; ++i) plan.target_spacing[i] = median(sp[i]);
  }
  for (int ch = 0; ch < ds.num_channels(); ++ch) {
    const bool ct = a.norm == "ct" || (a.norm == "auto" && ds.channel_names[static_cast<std::size_t>(ch)] == "CT");
    plan.channel_normalization.push_back(ct ? data::Normalization::ct : data::Normalization::zscore);
  }
  const bool any_ct = std::count(plan.channel_normalization.begin(), plan.channel_normalization.end(),
                                 data::Normalization::ct) > 0;
  if (any_ct) {
    // nnU-Net's fingerprint: foreground intensities of the training cases.
    data::CTStatisticsAccumulator acc;
    for (const auto& c : ds.cases) {
      const data::Image image = data::load_case_image(c);
      const data::Image label = data::load_case_label(c, ds.num_classes(), &image);
      acc.add(image.data, label.data);
    }
    for (int ch = 0; ch < ds.num_channels(); ++ch) plan.channel_ct.push_back(acc.finish(ch));
  }
  std::fprintf(stderr, "plan: spacing %.3g x %.3g x %.3g mm, normalisation %s\n", plan.target_spacing[0],
               plan.target_spacing[1], plan.target_spacing[2], any_ct ? "CT (dataset statistics)" : "z-score per image");

  // Preprocess with a cache under OUT/preprocessed.
  fs::create_directories(fs::path(a.out) / "preprocessed");
  std::vector<data::TrainingCase> all;
  for (std::size_t i = 0; i < ds.cases.size(); ++i) {
    const auto& c = ds.cases[i];
    std::vector<fs::path> sources = c.images;
    sources.push_back(c.label);
    const std::string key = data::preprocess_cache_key(plan, sources, a.seed);
    const data::PreprocessedCase pc =
        data::load_or_preprocess(fs::path(a.out) / "preprocessed" / (c.id + ".safetensors"), key, [&] {
          const data::Image image = data::load_case_image(c);
          const data::Image label = data::load_case_label(c, ds.num_classes(), &image);
          return data::preprocess_case(image, &label, plan, a.seed + i);
        });
    all.push_back(data::TrainingCase{c.id, pc.data, pc.seg, pc.class_locations});
    if (!a.quiet) std::fprintf(stderr, "\rpreprocessed %zu/%zu", i + 1, ds.cases.size());
  }
  if (!a.quiet) std::fprintf(stderr, "\n");

  // Split: a seeded shuffle, the first val_fraction for validation.
  std::vector<std::size_t> order(all.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  Generator split_rng(a.seed ^ 0x51u);
  for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[split_rng.uniform_int(i)]);
  const std::size_t n_val =
      all.size() >= 2 ? std::max<std::size_t>(a.val_fraction > 0 ? 1 : 0, static_cast<std::size_t>(a.val_fraction * static_cast<double>(all.size()) + 0.5)) : 0;
  auto train_cases = std::make_shared<std::vector<data::TrainingCase>>();
  auto val_cases = std::make_shared<std::vector<data::TrainingCase>>();
  for (std::size_t i = 0; i < order.size(); ++i) (i < n_val ? val_cases : train_cases)->push_back(all[order[i]]);

  // Model.
  nn::STUNetConfig config = nn::preset(a.preset);
  if (!a.depth.empty() || !a.dims.empty()) {
    STUNET_CHECK(a.depth.size() == 6 && a.dims.size() == 6, "--depth and --dims are given together, six values each");
    for (std::size_t i = 0; i < 6; ++i) {
      config.depth[i] = a.depth[i];
      config.dims[i] = a.dims[i];
    }
  }
  config.in_channels = ds.num_channels();
  config.num_classes = ds.num_classes();
  config.pool = pool_kernels_for(patch);
  nn::validate(config);
  nn::STUNet net(config);
  net.init_he(a.seed);
  if (finetune) {
    STUNET_CHECK(!a.pretrained.empty(), "--pretrained is required");
    const nn::StateDict weights = io::load_state_dict_file(a.pretrained);
    const nn::LoadReport report = nn::load_pretrained(net, weights);
    std::fprintf(stderr, "pretrained '%s': %zu tensors loaded, %zu reshaped (input channels), %zu skipped (heads), "
                 "%zu missing in the file, %zu mismatched\n",
                 a.pretrained.c_str(), report.loaded.size(), report.reshaped.size(), report.skipped.size(),
                 report.missing.size(), report.mismatched.size());
  }
  std::fprintf(stderr, "model: STU-Net depth [%d %d %d %d %d %d] dims [%d %d %d %d %d %d], %lld parameters, patch %lldx%lldx%lld\n",
               config.depth[0], config.depth[1], config.depth[2], config.depth[3], config.depth[4], config.depth[5],
               config.dims[0], config.dims[1], config.dims[2], config.dims[3], config.dims[4], config.dims[5],
               static_cast<long long>(net.parameter_count()), static_cast<long long>(patch[0]),
               static_cast<long long>(patch[1]), static_cast<long long>(patch[2]));

  train::TrainerOptions o;
  o.device = device;
  o.compute_dtype = precision;
  o.epochs = a.epochs;
  o.iterations_per_epoch = a.iterations;
  o.validation_batches = val_cases->empty() ? 0 : a.val_batches;
  o.lr = a.lr;
  o.momentum = a.momentum;
  o.backbone_lr_factor = a.backbone_lr_factor;
  o.loader.batch_size = a.batch;
  o.loader.patch = patch;
  o.loader.workers = a.workers;
  o.loader.seed = a.seed;
  if (a.no_augment) o.loader.augment = data::AugmentOptions::none();
  o.loader.augment.elastic = a.elastic;
  o.output_dir = a.out;
  o.progress = !a.quiet;
  o.label_names = ds.label_names;
  const nlohmann::json model_plan = make_model_plan(ds, plan, config, patch);
  o.extra["plan"] = model_plan;
  {
    std::ofstream(fs::path(a.out) / "plan.json") << model_plan.dump(2) << "\n";
  }
  train::Trainer trainer(net, train_cases, val_cases, o);
  if (a.resume) {
    const fs::path ck = trainer.latest_checkpoint_path();
    STUNET_CHECK(fs::exists(ck), "--resume: no checkpoint at '{}'", ck.string());
    trainer.resume(ck);
    std::fprintf(stderr, "resumed at epoch %lld\n", static_cast<long long>(trainer.epoch()));
  }
  const auto& history = trainer.fit();
  if (!history.empty()) {
    const auto& r = history.back();
    std::printf("final epoch %lld: train loss %.4f, val loss %.4f, pseudo Dice %.4f\n", static_cast<long long>(r.epoch + 1),
                r.train_loss, r.val_loss, r.mean_dice);
  }
  std::printf("weights: %s\n", (fs::path(a.out) / "checkpoint_final.safetensors").string().c_str());
  return 0;
}

/// main() of both programs: parse, run, one clear line on any error.
inline int training_main(int argc, char** argv, bool finetune) {
  CLI::App app{finetune ? "Fine-tunes a pretrained STU-Net on an nnU-Net dataset (the official recipe: every "
                          "parameter at lr 1e-3, segmentation heads re-initialised, first-layer weights repeated for "
                          "extra input channels)"
                        : "Trains an STU-Net from scratch on an nnU-Net v2 raw dataset (nnU-Net v2's recipe: SGD "
                          "Nesterov 0.99, poly lr, DC+CE deep supervision, its augmentation)",
               finetune ? "stunet-finetune" : "stunet-pretrain"};
  TrainArgs a;
  if (finetune) a.lr = 1e-3;
  app.option_defaults()->always_capture_default();  // --help shows every default
  add_training_flags(app, a);
  if (finetune)
    app.add_option("--pretrained", a.pretrained,
                   "pretrained weights: safetensors, official nnU-Net v1 .model or v2 .pth checkpoint")
        ->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run_training(a, finetune);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", app.get_name().c_str(), e.what());
    return 1;
  }
}

}  // namespace stunet::programs
