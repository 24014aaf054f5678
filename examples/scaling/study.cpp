// stunet-scaling-study: the paper's two training studies at a size a CPU can
// run, on the embedded phantoms (the CT lesion task: liver, kidney and their
// tumours): test Dice against model size (the same depth, widths scaled) and
// against the number of training cases (the middle width). Every run has the
// same number of steps and the same held-out test cases; results go to
// OUT/study.csv, OUT/dice_vs_size.png and OUT/dice_vs_cases.png.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <stunet/data/phantoms.hpp>
#include <stunet/train/plot.hpp>

#include "../model_scoring.hpp"
#include "../training_program.hpp"

using namespace stunet;
namespace fs = std::filesystem;

namespace {

struct StudyArgs {
  std::string out = "study_output";
  int size = 32, steps = 300, iterations = 30, test_cases = 4;
  std::vector<int> widths{4, 8, 16}, cases{2, 4, 8};
  double lr = 0.1, momentum = 0.9;
  std::uint64_t seed = 1;
};

/// One trained model and its score.
struct StudyRow {
  std::string experiment;  // "size" or "cases"
  int width = 0, train_cases = 0;
  std::int64_t parameters = 0;
  std::vector<double> dice;  // per foreground class
  double mean_dice = 0, seconds = 0;
};

std::array<int, 6> dims_of(int width) { return {width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width}; }

std::int64_t parameter_count(int width, int classes, const std::array<std::int64_t, 3>& patch) {
  nn::STUNetConfig c;
  c.in_channels = 1;
  c.num_classes = classes;
  c.depth = {1, 1, 1, 1, 1, 1};
  const auto d = dims_of(width);
  for (std::size_t i = 0; i < 6; ++i) c.dims[i] = d[i];
  c.pool = programs::pool_kernels_for(patch);
  return nn::STUNet(c).parameter_count();
}

// The Dice curves of one experiment: one per class and the mean (thick
// black), x = the experiment's rows in order.
void plot_rows(const fs::path& path, const std::vector<StudyRow>& rows) {
  if (rows.empty()) return;
  std::vector<train::Curve> curves(rows.front().dice.size() + 1);
  const std::array<std::array<std::uint8_t, 3>, 4> colors{{{214, 39, 40}, {31, 119, 180}, {255, 127, 14}, {44, 160, 44}}};
  for (std::size_t k = 0; k < curves.size(); ++k) {
    curves[k].right_axis = true;
    curves[k].color = k + 1 == curves.size() ? std::array<std::uint8_t, 3>{0, 0, 0} : colors[k % colors.size()];
  }
  for (const auto& r : rows) {
    for (std::size_t k = 0; k < r.dice.size(); ++k) curves[k].y.push_back(std::isfinite(r.dice[k]) ? r.dice[k] : 0.0);
    curves.back().y.push_back(r.mean_dice);
  }
  train::plot_curves(path, curves);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"The STU-Net paper's training studies on synthetic CT lesion phantoms: test Dice vs model size and vs "
               "number of training cases, at the same number of steps. Writes study.csv and two PNG plots.",
               "stunet-scaling-study"};
  app.option_defaults()->always_capture_default();  // --help shows every default
  StudyArgs a;
  app.add_option("-o,--out", a.out, "output folder (data, models, study.csv, dice_vs_size.png, dice_vs_cases.png)");
  app.add_option("--size", a.size, "phantom grid N: volumes and patch N/2 x N x N")->check(CLI::Range(32, 256));
  app.add_option("--steps", a.steps, "training steps of every run (rounded up to whole epochs)")
      ->check(CLI::PositiveNumber);
  app.add_option("--iterations", a.iterations, "iterations per epoch (the poly lr decays per epoch)")
      ->check(CLI::PositiveNumber);
  app.add_option("--widths", a.widths, "first-stage widths w of the size study (dims w 2w 4w 8w 8w 8w, depth 1)")
      ->check(CLI::Range(1, 64));
  app.add_option("--cases", a.cases, "training-set sizes of the data study (at the middle width)")
      ->check(CLI::Range(1, 10000));
  app.add_option("--test-cases", a.test_cases, "held-out test cases")->check(CLI::Range(1, 10000));
  app.add_option("--lr", a.lr, "learning rate")->check(CLI::PositiveNumber);
  app.add_option("--momentum", a.momentum, "SGD Nesterov momentum")->check(CLI::Range(0.01, 0.999));
  app.add_option("--seed", a.seed, "seed of data, initialisation and sampling");
  CLI11_PARSE(app, argc, argv);
  try {
    STUNET_CHECK(!a.widths.empty() && !a.cases.empty(), "--widths and --cases need at least one value each");
    std::sort(a.widths.begin(), a.widths.end());
    std::sort(a.cases.begin(), a.cases.end());
    const fs::path out = a.out;
    const std::array<std::int64_t, 3> patch{a.size / 2, a.size, a.size};
    const int max_cases = a.cases.back(), mid_width = a.widths[a.widths.size() / 2];
    const auto task = data::PhantomTask::downstream_ct;
    const std::vector<std::string> names = data::phantom_labels(task);

    // Case i depends only on (seed, i), so the n-case sets are nested.
    for (int n : a.cases) {
      const fs::path p = out / "data" / fmt::format("train_{}", n);
      fs::remove_all(p);
      data::write_phantom_dataset(p, {task, n, patch, a.seed});
    }
    const fs::path test_path = out / "data" / "test";
    fs::remove_all(test_path);
    data::write_phantom_dataset(test_path, {task, a.test_cases, patch, a.seed + 1000});
    const data::Dataset test = data::open_dataset(test_path);

    auto train_one = [&](const std::string& experiment, int width, int n) {
      StudyRow r;
      r.experiment = experiment;
      r.width = width;
      r.train_cases = n;
      r.parameters = parameter_count(width, static_cast<int>(names.size()), patch);
      const std::string tag = fmt::format("w{}_n{}", width, n);
      std::fprintf(stderr, "[%s] width %d (%lld parameters), %d training cases\n", experiment.c_str(), width,
                   static_cast<long long>(r.parameters), n);
      programs::TrainArgs t;
      t.dataset = (out / "data" / fmt::format("train_{}", n)).string();
      t.out = (out / "models" / tag).string();
      t.depth = {1, 1, 1, 1, 1, 1};
      const auto d = dims_of(width);
      t.dims.assign(d.begin(), d.end());
      t.patch = {static_cast<int>(patch[0]), static_cast<int>(patch[1]), static_cast<int>(patch[2])};
      t.iterations = a.iterations;
      t.epochs = (a.steps + a.iterations - 1) / a.iterations;
      t.val_fraction = 0;  // every case trains; the held-out test set scores
      t.lr = a.lr;
      t.momentum = a.momentum;
      t.workers = 1;
      t.seed = a.seed;
      t.quiet = true;
      const auto t0 = std::chrono::steady_clock::now();
      programs::run_training(t, false);
      r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      r.dice = programs::predict_and_score(fs::path(t.out) / "checkpoint_final.safetensors", test,
                                           out / "predictions" / tag, tag);
      double sum = 0;
      for (double v : r.dice) sum += std::isfinite(v) ? v : 0.0;
      r.mean_dice = sum / static_cast<double>(r.dice.size());
      std::fprintf(stderr, "  mean test Dice %.3f (%.0f s)\n", r.mean_dice, r.seconds);
      return r;
    };

    std::vector<StudyRow> by_size, by_cases;
    for (int w : a.widths) by_size.push_back(train_one("size", w, max_cases));
    for (int n : a.cases) {
      if (n == max_cases) {  // the size study already trained (middle width, all cases)
        for (const auto& r : by_size)
          if (r.width == mid_width) {
            by_cases.push_back(r);
            by_cases.back().experiment = "cases";
          }
        continue;
      }
      by_cases.push_back(train_one("cases", mid_width, n));
    }

    std::string csv = "experiment,width,dims,parameters,train_cases,steps,mean_dice";
    for (std::size_t k = 1; k < names.size(); ++k) csv += ",dice_" + names[k];
    csv += ",train_seconds\n";
    std::string table = fmt::format("{:<10} {:>6} {:>11} {:>6} {:>10}", "study", "width", "parameters", "cases",
                                    "mean Dice");
    for (std::size_t k = 1; k < names.size(); ++k) table += fmt::format(" {:>13}", names[k]);
    table += "\n";
    const int steps = (a.steps + a.iterations - 1) / a.iterations * a.iterations;
    for (const auto* rows : {&by_size, &by_cases})
      for (const auto& r : *rows) {
        const auto d = dims_of(r.width);
        csv += fmt::format("{},{},{} {} {} {} {} {},{},{},{},{:.4f}", r.experiment, r.width, d[0], d[1], d[2], d[3], d[4],
                           d[5], r.parameters, r.train_cases, steps, r.mean_dice);
        table += fmt::format("{:<10} {:>6} {:>11} {:>6} {:>10.3f}", r.experiment, r.width, r.parameters, r.train_cases,
                             r.mean_dice);
        for (double v : r.dice) {
          csv += fmt::format(",{:.4f}", v);
          table += fmt::format(" {:>13.3f}", v);
        }
        csv += fmt::format(",{:.1f}\n", r.seconds);
        table += "\n";
      }
    {
      std::ofstream f(out / "study.csv");
      f << csv;
      STUNET_CHECK(f.good(), "cannot write '{}'", (out / "study.csv").string());
    }
    plot_rows(out / "dice_vs_size.png", by_size);
    plot_rows(out / "dice_vs_cases.png", by_cases);
    std::printf("%s", table.c_str());
    std::printf("wrote %s, %s, %s\n", (out / "study.csv").string().c_str(), (out / "dice_vs_size.png").string().c_str(),
                (out / "dice_vs_cases.png").string().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "stunet-scaling-study: %s\n", e.what());
    return 1;
  }
}
