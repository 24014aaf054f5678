#pragma once
/// \file
/// nnU-Net v2's training loop for STU-Net: epochs of N iterations (batch from
/// the background loader, forward, deep-supervision DC+CE, backward, clip the
/// gradient norm at 12, SGD Nesterov step), the poly learning-rate schedule
/// per epoch, a validation pass with per-class pseudo Dice (TP/FP/FN summed
/// over validation patches, as nnU-Net's online evaluation), a progress bar,
/// a CSV log, a PNG of the curves, atomic checkpoints every epoch and at the
/// end, exact resume, and a clear stop on a non-finite loss.
///
/// Reproducibility: batch k of training is data::make_batch(seed, k) and the
/// validation batches of every epoch are the same fixed set, so a run resumed
/// from the checkpoint of epoch e continues bit for bit like the run that
/// never stopped (same thread count).

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "stunet/autograd/grad_mode.hpp"
#include "stunet/data/loader.hpp"
#include "stunet/nn/stunet.hpp"
#include "stunet/optim/grad_scaler.hpp"
#include "stunet/optim/sgd.hpp"
#include "stunet/train/checkpoint.hpp"
#include "stunet/train/deep_supervision.hpp"
#include "stunet/train/plot.hpp"
#include "stunet/train/targets.hpp"

namespace stunet::train {

/// The run's settings; the defaults are nnU-Net v2's for training from scratch.
struct TrainerOptions {
  std::int64_t epochs = 1000;
  int iterations_per_epoch = 250;
  int validation_batches = 50;
  double lr = 1e-2;                  ///< head lr (and every parameter's when backbone_lr_factor = 1)
  double backbone_lr_factor = 1.0;   ///< the paper's fine-tuning variant: 0.1
  double momentum = 0.99;
  double weight_decay = 3e-5;
  double grad_clip = 12.0;
  data::LoaderOptions loader{};      ///< batch, patch, oversampling, augmentation, workers, seed
  std::filesystem::path output_dir;  ///< checkpoints, log, plot (empty: write nothing)
  bool progress = true;              ///< progress bar on stderr
  std::vector<std::string> label_names;  ///< for the log's column names
  nlohmann::json extra = nlohmann::json::object();  ///< stored in checkpoints (plan, dataset ...)
  /// Where the model trains: the Trainer moves the model there (batches are
  /// assembled on the host by the loader and copied over per step).
  Device device = Device::cpu();
  /// Activation dtype: float32, or float16 / bfloat16 mixed precision on CUDA
  /// (float32 master weights; float16 adds dynamic loss scaling).
  DType compute_dtype = DType::f32;
};

/// One epoch's figures.
struct EpochRecord {
  std::int64_t epoch = 0;
  double train_loss = 0;
  double val_loss = 0;
  std::vector<double> dice;  ///< pseudo Dice per foreground class (NaN when a class never occurred)
  double mean_dice = 0;
  double lr = 0;
  double seconds = 0;
  double iterations_per_second = 0;
};

inline nlohmann::json to_json_value(const EpochRecord& r) {
  auto num = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
  nlohmann::json dice = nlohmann::json::array();
  for (double d : r.dice) dice.push_back(num(d));
  return {{"epoch", r.epoch}, {"train_loss", num(r.train_loss)}, {"val_loss", num(r.val_loss)}, {"dice", dice},
          {"mean_dice", num(r.mean_dice)}, {"lr", r.lr}, {"seconds", r.seconds},
          {"iterations_per_second", r.iterations_per_second}};
}

inline EpochRecord epoch_record_from_json(const nlohmann::json& j) {
  auto num = [](const nlohmann::json& v) { return v.is_null() ? std::nan("") : v.get<double>(); };
  EpochRecord r;
  r.epoch = j.at("epoch").get<std::int64_t>();
  r.train_loss = num(j.at("train_loss"));
  r.val_loss = num(j.at("val_loss"));
  for (const auto& d : j.at("dice")) r.dice.push_back(num(d));
  r.mean_dice = num(j.at("mean_dice"));
  r.lr = j.at("lr").get<double>();
  r.seconds = j.at("seconds").get<double>();
  r.iterations_per_second = j.at("iterations_per_second").get<double>();
  return r;
}

/// Trains one STU-Net on training cases, validating on validation cases.
class Trainer {
 public:
  /// net: the model to train (weights as they are: fresh He init or
  /// pretrained); train_cases / val_cases: preprocessed cases (val may be
  /// empty: no validation, Dice NaN).
  Trainer(nn::STUNet& net, std::shared_ptr<const std::vector<data::TrainingCase>> train_cases,
          std::shared_ptr<const std::vector<data::TrainingCase>> val_cases, TrainerOptions options)
      : net_(net), train_(std::move(train_cases)), val_(std::move(val_cases)), options_(std::move(options)),
        sgd_({}, optim::SGDOptions{.lr = options_.lr, .momentum = options_.momentum,
                                   .weight_decay = options_.weight_decay, .nesterov = true}) {
    STUNET_CHECK(train_ && !train_->empty(), "Trainer: no training cases");
    STUNET_CHECK(options_.epochs >= 1 && options_.iterations_per_epoch >= 1 && options_.validation_batches >= 0,
                 "Trainer: epochs {}, iterations per epoch {}, validation batches {}", options_.epochs,
                 options_.iterations_per_epoch, options_.validation_batches);
    STUNET_CHECK(options_.lr > 0 && options_.backbone_lr_factor > 0 && options_.grad_clip > 0,
                 "Trainer: lr {}, backbone factor {}, grad clip {} must be > 0", options_.lr,
                 options_.backbone_lr_factor, options_.grad_clip);
    const auto& c = net_.config();
    for (const auto& tc : *train_)
      STUNET_CHECK(tc.data.size(0) == c.in_channels, "Trainer: case '{}' has {} channels, the model takes {}", tc.id,
                   tc.data.size(0), c.in_channels);
    for (int a = 0; a < 3; ++a) {
      std::int64_t f = 1;
      for (const auto& p : c.pool) f *= p[static_cast<std::size_t>(a)];
      STUNET_CHECK(options_.loader.patch[static_cast<std::size_t>(a)] % f == 0,
                   "Trainer: patch {}x{}x{} is not divisible by the pooling product {} on axis {}",
                   options_.loader.patch[0], options_.loader.patch[1], options_.loader.patch[2], f, a);
    }
    STUNET_CHECK(options_.compute_dtype == DType::f32 || options_.compute_dtype == DType::f64 ||
                     (options_.device.is_cuda() &&
                      (options_.compute_dtype == DType::f16 || options_.compute_dtype == DType::bf16)),
                 "Trainer: compute dtype {} on {}: mixed precision (float16 / bfloat16) runs on CUDA only",
                 options_.compute_dtype, options_.device);
    // Before the optimiser groups: the momentum buffers follow the parameters.
    net_.to(options_.device);
    if (options_.compute_dtype == DType::f16 || options_.compute_dtype == DType::bf16)
      net_.set_compute_dtype(options_.compute_dtype);
    scaler_ = optim::GradScaler(optim::GradScalerOptions{.enabled = options_.compute_dtype == DType::f16});
    nn::StateDict backbone, head;
    for (auto& [k, p] : net_.named_parameters()) (k.rfind("seg_outputs.", 0) == 0 ? head : backbone).emplace_back(k, p);
    sgd_.add_group(std::move(backbone), options_.lr * options_.backbone_lr_factor);
    sgd_.add_group(std::move(head), options_.lr);
    if (!options_.output_dir.empty()) std::filesystem::create_directories(options_.output_dir);
  }

  /// Continues a run from its checkpoint (weights, momentum, epoch, history).
  void resume(const std::filesystem::path& checkpoint) {
    const CheckpointInfo info = load_checkpoint(checkpoint, net_, &sgd_);
    STUNET_CHECK(info.epoch >= 0 && info.epoch <= options_.epochs,
                 "resume: checkpoint '{}' is at epoch {}, this run has {} epochs", checkpoint.string(), info.epoch,
                 options_.epochs);
    epoch_ = info.epoch;
    history_.clear();
    if (info.extra.contains("history"))
      for (const auto& r : info.extra.at("history")) history_.push_back(epoch_record_from_json(r));
  }

  /// Runs epochs until `until` (default: all), checkpointing after each.
  /// Throws stunet::Error on a non-finite loss, naming epoch and iteration
  /// and the last good checkpoint (which is left untouched).
  const std::vector<EpochRecord>& fit(std::int64_t until = -1) {
    const std::int64_t last = until < 0 ? options_.epochs : std::min<std::int64_t>(until, options_.epochs);
    while (epoch_ < last) {
      run_epoch();
      save(latest_checkpoint_path());
    }
    if (epoch_ == options_.epochs && !options_.output_dir.empty()) save(options_.output_dir / "checkpoint_final.safetensors");
    return history_;
  }

  /// One optimiser step on a batch (host or device tensors); returns the
  /// loss. With float16 loss scaling, a step whose gradients overflowed is
  /// skipped (the scale backs off) and the loss is still returned.
  double train_step(const data::Batch& batch) {
    sgd_.zero_grad();
    const auto outputs = net_.forward(batch.image.to(options_.device));
    const Tensor loss = deep_supervision_loss(outputs, targets_on_device(batch.label), weights_);
    const double value = loss.item();
    if (!std::isfinite(value)) return value;  // the caller stops; no update from a broken step
    scaler_.scale(loss).backward();
    const std::vector<Tensor> params = net_.parameters();
    if (scaler_.unscale_(params)) {
      scaler_.update(true);
      return value;
    }
    const double norm = optim::clip_grad_norm(params, options_.grad_clip);
    if (!std::isfinite(norm)) return std::nan("");
    sgd_.step();
    scaler_.update(false);
    return value;
  }

  /// The loss scaler (disabled unless the compute dtype is float16).
  const optim::GradScaler& grad_scaler() const { return scaler_; }

  /// Validation: loss and per-class pseudo Dice over the fixed validation
  /// batches (no augmentation, the same foreground oversampling).
  EpochRecord validate() {
    EpochRecord r;
    const int classes = net_.config().num_classes;
    r.dice.assign(static_cast<std::size_t>(classes - 1), std::nan(""));
    if (!val_ || val_->empty() || options_.validation_batches == 0) {
      r.val_loss = std::nan("");
      r.mean_dice = std::nan("");
      return r;
    }
    NoGradGuard no_grad;
    data::LoaderOptions vo = options_.loader;
    vo.augment = data::AugmentOptions::none();
    vo.seed = options_.loader.seed ^ 0x9e3779b97f4a7c15ULL;
    std::vector<double> tp(static_cast<std::size_t>(classes), 0), fp(tp), fn(tp);
    double loss_sum = 0;
    for (int b = 0; b < options_.validation_batches; ++b) {
      const data::Batch batch = data::make_batch(*val_, vo, b);
      const auto outputs = net_.forward(batch.image.to(options_.device));
      loss_sum += deep_supervision_loss(outputs, targets_on_device(batch.label), weights_).item();
      accumulate_confusion(outputs[0], batch.label, tp, fp, fn);
    }
    r.val_loss = loss_sum / options_.validation_batches;
    double sum = 0;
    int counted = 0;
    for (int c = 1; c < classes; ++c) {
      const double denom = 2 * tp[static_cast<std::size_t>(c)] + fp[static_cast<std::size_t>(c)] + fn[static_cast<std::size_t>(c)];
      const double d = denom > 0 ? 2 * tp[static_cast<std::size_t>(c)] / denom : std::nan("");
      r.dice[static_cast<std::size_t>(c - 1)] = d;
      if (std::isfinite(d)) {
        sum += d;
        ++counted;
      }
    }
    r.mean_dice = counted ? sum / counted : std::nan("");
    return r;
  }

  std::int64_t epoch() const { return epoch_; }
  const std::vector<EpochRecord>& history() const { return history_; }
  optim::SGD& optimizer() { return sgd_; }
  nn::STUNet& model() { return net_; }
  std::filesystem::path latest_checkpoint_path() const {
    return options_.output_dir.empty() ? std::filesystem::path() : options_.output_dir / "checkpoint_latest.safetensors";
  }

 private:
  /// The deep-supervision targets (nearest-downsampled on the host) on the training device.
  std::vector<Tensor> targets_on_device(const Tensor& label) const {
    std::vector<Tensor> t = deep_supervision_targets(label.to(Device::cpu()), net_.config());
    if (!options_.device.is_cpu())
      for (Tensor& x : t) x = x.to(options_.device);
    return t;
  }

  /// argmax of logits [N, K, ...] against labels [N, 1, ...]: TP/FP/FN per class.
  static void accumulate_confusion(const Tensor& logits, const Tensor& labels, std::vector<double>& tp,
                                   std::vector<double>& fp, std::vector<double>& fn) {
    const Tensor x = logits.to(Device::cpu()).to(DType::f32).contiguous();
    const Tensor y = labels.to(Device::cpu()).to(DType::i32).contiguous();
    const std::int64_t N = x.size(0), K = x.size(1), V = x.numel() / (N * K);
    const float* px = x.data<float>();
    const std::int32_t* py = y.data<std::int32_t>();
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t v = 0; v < V; ++v) {
        std::int64_t best = 0;
        float bv = px[(n * K) * V + v];
        for (std::int64_t k = 1; k < K; ++k)
          if (px[(n * K + k) * V + v] > bv) {
            bv = px[(n * K + k) * V + v];
            best = k;
          }
        const std::int64_t t = py[n * V + v];
        if (best == t) tp[static_cast<std::size_t>(t)] += 1;
        else {
          fp[static_cast<std::size_t>(best)] += 1;
          if (t >= 0 && t < K) fn[static_cast<std::size_t>(t)] += 1;
        }
      }
  }

  void run_epoch() {
    using Clock = std::chrono::steady_clock;
    const auto t0 = Clock::now();
    const double factor = optim::poly_lr_factor(epoch_, options_.epochs);
    sgd_.scale_lr(factor);
    net_.train();
    const std::int64_t first_batch = epoch_ * options_.iterations_per_epoch;
    data::BatchLoader loader(train_, options_.loader, first_batch);
    double loss_sum = 0;
    const bool tty = isatty(STDERR_FILENO);
    for (int it = 0; it < options_.iterations_per_epoch; ++it) {
      const data::Batch batch = loader.next();
      const double loss = train_step(batch);
      STUNET_CHECK(std::isfinite(loss),
                   "training stopped: the loss (or its gradient) is not finite at epoch {} iteration {} (step {}); "
                   "the last good checkpoint is {}",
                   epoch_, it, first_batch + it,
                   latest_checkpoint_path().empty() || !std::filesystem::exists(latest_checkpoint_path())
                       ? std::string("(none written yet)")
                       : latest_checkpoint_path().string());
      loss_sum += loss;
      if (options_.progress) {
        const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
        const int done = it + 1, width = 24, filled = done * width / options_.iterations_per_epoch;
        const std::string bar = std::string(static_cast<std::size_t>(filled), '#') +
                                std::string(static_cast<std::size_t>(width - filled), '.');
        if (tty || done == options_.iterations_per_epoch || done % 10 == 0)
          std::fprintf(stderr, "%sepoch %lld/%lld [%s] %d/%d loss %.4f lr %.2e %.2f it/s%s", tty ? "\r" : "",
                       static_cast<long long>(epoch_ + 1), static_cast<long long>(options_.epochs), bar.c_str(), done,
                       options_.iterations_per_epoch, loss_sum / done, sgd_.groups().back().lr, done / elapsed,
                       tty ? "" : "\n");
      }
    }
    EpochRecord r = validate();
    r.epoch = epoch_;
    r.train_loss = loss_sum / options_.iterations_per_epoch;
    r.lr = sgd_.groups().back().lr;
    r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    r.iterations_per_second = options_.iterations_per_epoch / r.seconds;
    if (options_.progress)
      std::fprintf(stderr, "%s  val loss %.4f  pseudo Dice %.3f  (%.1f s)\n", tty ? "" : "epoch done:", r.val_loss,
                   r.mean_dice, r.seconds);
    history_.push_back(r);
    ++epoch_;
    write_log();
  }

  void save(const std::filesystem::path& path) {
    if (path.empty()) return;
    CheckpointInfo info;
    info.epoch = epoch_;
    info.config = net_.config();
    info.extra = options_.extra;
    nlohmann::json h = nlohmann::json::array();
    for (const auto& r : history_) h.push_back(to_json_value(r));
    info.extra["history"] = h;
    info.extra["label_names"] = options_.label_names;
    save_checkpoint(path, net_, &sgd_, info);
  }

  void write_log() const {
    if (options_.output_dir.empty()) return;
    const auto csv = options_.output_dir / "training_log.csv";
    {
      std::ofstream out(csv.string() + ".tmp");
      out << "epoch,train_loss,val_loss,mean_dice";
      const int classes = net_.config().num_classes;
      for (int c = 1; c < classes; ++c)
        out << ",dice_"
            << (static_cast<std::size_t>(c) < options_.label_names.size() ? options_.label_names[static_cast<std::size_t>(c)]
                                                                          : std::to_string(c));
      out << ",lr,seconds,iterations_per_second\n";
      for (const auto& r : history_) {
        out << fmt::format("{},{:.6f},{:.6f},{:.6f}", r.epoch, r.train_loss, r.val_loss, r.mean_dice);
        for (double d : r.dice) out << fmt::format(",{:.6f}", d);
        out << fmt::format(",{:.6g},{:.3f},{:.3f}\n", r.lr, r.seconds, r.iterations_per_second);
      }
      STUNET_CHECK(out.good(), "cannot write '{}'", csv.string());
    }
    std::filesystem::rename(csv.string() + ".tmp", csv);
    std::vector<Curve> curves(3);
    curves[0].color = {31, 119, 180};
    curves[1].color = {214, 39, 40};
    curves[2].color = {44, 160, 44};
    curves[2].right_axis = true;
    for (const auto& r : history_) {
      curves[0].y.push_back(r.train_loss);
      curves[1].y.push_back(r.val_loss);
      curves[2].y.push_back(r.mean_dice);
    }
    plot_curves(options_.output_dir / "progress.png", curves);
  }

  nn::STUNet& net_;
  std::shared_ptr<const std::vector<data::TrainingCase>> train_, val_;
  TrainerOptions options_;
  optim::SGD sgd_;
  optim::GradScaler scaler_;
  std::vector<double> weights_ = deep_supervision_weights(5);
  std::int64_t epoch_ = 0;
  std::vector<EpochRecord> history_;
};

}  // namespace stunet::train
