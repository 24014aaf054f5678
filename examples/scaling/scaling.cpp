// stunet-scaling: the STU-Net paper's scaling tables (Huang et al. 2023,
// arXiv 2304.06716) computed from the architecture: Table 2 (the S/B/L/H
// sizes) and Table 7 (scaling B in depth, in width, or both), with parameter
// counts, forward MACs, the float32 activation memory a training step keeps
// for backward, and, with --measure, the CPU time of one real training step
// for the rows small enough to run here.
//
// Nothing is allocated for the counted columns: they follow from the
// configuration, so L and H (3.8 and 12.6 TMACs) are listed on any machine.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <CLI/CLI.hpp>

#include <stunet/core/parallel.hpp>
#include <stunet/core/rng.hpp>
#include <stunet/nn/stunet.hpp>
#include <stunet/train/deep_supervision.hpp>
#include <stunet/train/targets.hpp>
#include <stunet/train/trainer.hpp>

using namespace stunet;

namespace {

using Int3 = nn::Int3;

/// A figure as the paper prints it: value in `unit` with `decimals` digits
/// (e.g. 58.26 x 1e6 with 2 decimals). Kept with its precision so that
/// "agrees with the paper" means "rounds to the printed figure".
struct PaperFigure {
  double value = 0;
  double unit = 1;
  int decimals = 0;
  const char* text = "-";

  /// True when `ours`, rounded the way the paper rounded, is the paper's figure.
  bool matches(double ours) const {
    const double scale = std::pow(10.0, decimals);
    return std::llround(ours / unit * scale) == std::llround(value * scale);
  }
};

/// One line of a table: a configuration and what the paper printed for it
/// (absent where we do not know the paper's figures).
struct Row {
  std::string table;  ///< "2", "7" or "custom"
  std::string name;
  nn::STUNetConfig config;
  std::optional<PaperFigure> paper_params, paper_flops;  ///< flops in T (the paper's "FLOPs" are MACs)
};

/// The computed columns of a row.
struct RowResult {
  std::int64_t params = 0;
  std::int64_t macs = 0;            ///< conv multiply-accumulates of one forward pass at the patch, per sample
  std::int64_t bias_adds = 0;       ///< one add per conv output element (what some counters add to MACs)
  std::int64_t activation_bytes = 0;  ///< saved for backward at the patch and batch
  bool measured = false;
  std::string skipped;                ///< why --measure left the row out
  double step_seconds = 0;            ///< mean over the timed steps
  std::int64_t estimate_bytes_measure_patch = 0;  ///< the estimate at the measure patch, to compare with:
  std::int64_t held_bytes = -1;                   ///< heap growth over forward + loss (-1: not available)
};

/// Voxels per sample at each of the six stages for a patch.
std::array<std::int64_t, 6> stage_voxels(const nn::STUNetConfig& c, Int3 patch) {
  std::array<std::int64_t, 6> vox{};
  for (std::size_t s = 0; s < 6; ++s) {
    if (s > 0)
      for (std::size_t a = 0; a < 3; ++a) patch[a] /= c.pool[s - 1][a];
    vox[s] = static_cast<std::int64_t>(patch[0]) * patch[1] * patch[2];
  }
  return vox;
}

/// Output elements of every conv in one forward pass (per sample): the bias
/// additions. nn::forward_macs counts convolutions only; FLOP counters such
/// as ptflops also add one operation per output element for the bias, which
/// is enough to turn our L/H MACs into the paper's rounded figures.
std::int64_t conv_output_elements(const nn::STUNetConfig& c, Int3 patch) {
  const auto vox = stage_voxels(c, patch);
  std::int64_t n = 0;
  for (std::size_t s = 0; s < 6; ++s)  // first block: conv1, conv2 and the 1x1 shortcut; others: conv1, conv2
    n += (3 + 2 * static_cast<std::int64_t>(c.depth[s] - 1)) * c.dims[s] * vox[s];
  for (std::size_t t = 0; t < 5; ++t)  // decoder at stage t: upsample's 1x1 conv, blocks, seg head
    n += (1 + 3 + 2 * static_cast<std::int64_t>(c.depth[t] - 1)) * c.dims[t] * vox[t] +
         static_cast<std::int64_t>(c.num_classes) * vox[t];
  return n;
}

/// Bytes of the float32 (and int32) tensors that one training step keeps
/// alive from the forward pass until backward consumes them: the sum of the
/// sizes of the distinct tensors the autograd nodes save. It is what decides
/// whether a patch and batch fit in memory, and it grows with width and depth
/// differently from the parameter count. Read off the ops of this library:
///  - conv3d saves its input (and weight, a parameter, not counted here);
///  - instance_norm saves its input, which is the conv output;
///  - leaky_relu_ runs in place and saves its output, the same storage the
///    next conv then saves; add, concat and upsample_nearest save nothing;
///  so a residual block keeps 4 tensors of [Cout, voxels]: conv1's output,
///  the activated norm1 output (= conv2's input), conv2's output and the
///  activated block output (= the next block's input, or the skip). Norm2's
///  output and the shortcut's output feed only the add and are freed.
///  - decoder level: the upsampled tensor (saved by its 1x1 conv) and the
///  concat (saved by the first block's conv1 and shortcut);
///  - loss, for each output with a non-zero deep-supervision weight (all but
///  the coarsest): cross-entropy keeps the logits, the per-voxel log-sum-exp
///  and an int32 copy of the labels; softmax keeps its output for soft Dice,
///  which keeps its own int32 labels: (2 * classes + 3) values per voxel.
/// The input batch is not counted (the data loader made it), nor parameters,
/// gradients, momentum or the transient buffers of backward itself. Tensors
/// saved by several nodes share one storage and are counted once. The rule
/// is checked against the heap growth of a real forward pass by --measure.
std::int64_t saved_activation_bytes(const nn::STUNetConfig& c, Int3 patch, std::int64_t batch) {
  const auto vox = stage_voxels(c, patch);
  std::int64_t values = 0;
  for (std::size_t s = 0; s < 6; ++s) values += 4 * static_cast<std::int64_t>(c.depth[s]) * c.dims[s] * vox[s];
  for (std::size_t t = 0; t < 5; ++t)
    values += (static_cast<std::int64_t>(c.dims[t + 1]) + 2 * c.dims[t] + 4 * static_cast<std::int64_t>(c.depth[t]) * c.dims[t]) * vox[t];
  const auto weights = train::deep_supervision_weights(5);
  for (std::size_t t = 0; t < 5; ++t)
    if (weights[t] != 0.0) values += (2 * static_cast<std::int64_t>(c.num_classes) + 3) * vox[t];
  return values * batch * 4;  // float32 and int32 are both 4 bytes
}

/// Heap bytes in use (glibc: every arena plus mmapped chunks), or -1 where
/// the C library does not say.
std::int64_t heap_in_use() {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  const struct mallinfo2 m = mallinfo2();
  return static_cast<std::int64_t>(m.uordblks + m.hblkhd);
#else
  return -1;
#endif
}

/// Throws unless every extent of `patch` divides by the row's pooling product.
void check_patch(const Row& row, Int3 patch, const char* option) {
  for (std::size_t a = 0; a < 3; ++a) {
    int f = 1;
    for (const auto& p : row.config.pool) f *= p[a];
    STUNET_CHECK(patch[a] % f == 0, "{} {}x{}x{} does not suit row '{}': extent {} on axis {} is not divisible by {}",
                 option, patch[0], patch[1], patch[2], row.name, patch[a], a, f);
  }
}

/// Times `steps` training steps (after one untimed warm-up, which also
/// allocates gradients and momentum) of a freshly initialised network on a
/// random batch, through Trainer::train_step: forward, deep-supervision
/// DC+CE, backward, gradient clipping, SGD Nesterov. Then measures how much
/// the heap grows over a forward pass and loss, which is the saved
/// activations the estimate describes.
void measure(const nn::STUNetConfig& c, int edge, int batch, int steps, RowResult& out) {
  const Int3 patch{edge, edge, edge};
  nn::STUNet net(c);
  net.init_he(/*seed=*/0);
  Generator gen(1);
  Tensor image = Tensor::empty({batch, c.in_channels, edge, edge, edge});
  for (std::int64_t i = 0; i < image.numel(); ++i) image.data<float>()[i] = static_cast<float>(gen.normal());
  Tensor label = Tensor::empty({batch, 1, edge, edge, edge}, DType::i32);
  for (std::int64_t i = 0; i < label.numel(); ++i)
    label.data<std::int32_t>()[i] = static_cast<std::int32_t>(gen.uniform_int(static_cast<std::uint64_t>(c.num_classes)));

  // The trainer wants a case list for its own loop; train_step only takes the batch.
  auto cases = std::make_shared<std::vector<data::TrainingCase>>();
  cases->push_back(data::TrainingCase{"random", Tensor::zeros({c.in_channels, edge, edge, edge}),
                                       Tensor::zeros({1, edge, edge, edge}, DType::i32), {}});
  train::TrainerOptions options;
  options.epochs = 1;
  options.validation_batches = 0;
  options.progress = false;
  options.loader.batch_size = batch;
  options.loader.patch = {edge, edge, edge};
  train::Trainer trainer(net, cases, nullptr, options);
  data::Batch b;
  b.image = image;
  b.label = label;

  net.train();
  trainer.train_step(b);
  const auto t0 = std::chrono::steady_clock::now();
  double loss = 0;
  for (int i = 0; i < steps; ++i) loss = trainer.train_step(b);
  out.step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
  STUNET_CHECK(std::isfinite(loss), "--measure: the training step of this row gave a non-finite loss");

  // Heap growth while the graph of one step is alive, with the outputs and
  // targets dropped so that only what the nodes saved is left.
  const std::int64_t before = heap_in_use();
  {
    std::vector<Tensor> outputs = net.forward(image);
    std::vector<Tensor> targets = train::deep_supervision_targets(label, c);
    const Tensor loss_tensor =
        train::deep_supervision_loss(outputs, targets, train::deep_supervision_weights(static_cast<int>(outputs.size())));
    outputs.clear();
    targets.clear();
    const std::int64_t after = heap_in_use();
    out.held_bytes = before < 0 || after < 0 ? -1 : after - before;
  }
  out.estimate_bytes_measure_patch = saved_activation_bytes(c, patch, batch);
  out.measured = true;
}

std::string join(const std::array<int, 6>& v) { return fmt::format("{}", fmt::join(v, ",")); }

/// A text table with a header: name, depth and dims left-aligned, the figures right-aligned.
void print_table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width(header.size());
  for (std::size_t i = 0; i < header.size(); ++i) width[i] = header[i].size();
  for (const auto& r : rows)
    for (std::size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  auto line = [&](const std::vector<std::string>& cells) {
    std::string s;
    for (std::size_t i = 0; i < cells.size(); ++i) {
      if (i) s += "  ";
      s += i < 3 ? fmt::format("{:<{}}", cells[i], width[i]) : fmt::format("{:>{}}", cells[i], width[i]);
    }
    while (!s.empty() && s.back() == ' ') s.pop_back();
    std::printf("%s\n", s.c_str());
  };
  line(header);
  for (const auto& r : rows) line(r);
}

std::string gib(std::int64_t bytes) { return fmt::format("{:.2f}", static_cast<double>(bytes) / (1ull << 30)); }
std::string mib(std::int64_t bytes) { return fmt::format("{:.1f}", static_cast<double>(bytes) / (1ull << 20)); }

/// The first line of an error, without the " (file:line, check `...` failed)"
/// that STUNET_CHECK appends: users get the message, not our source layout.
std::string one_line(const std::string& what) {
  std::string s = what.substr(0, what.find('\n'));
  const auto check = s.rfind(", check `");
  if (check == std::string::npos) return s;
  const auto open = s.rfind(" (", check);
  return open == std::string::npos ? s : s.substr(0, open);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Prints the STU-Net paper's scaling tables (Table 2: sizes S/B/L/H; Table 7: scaling B in depth, "
               "width or both) computed from the architecture: parameters, forward MACs (the paper's 'FLOPs') and "
               "the activation memory of a training step. The paper's figures are printed beside ours where known, "
               "'-' where not. Nothing is allocated unless --measure is given.",
               "stunet-scaling"};
  std::vector<int> patch{128};
  int batch = 2, measure_patch = 32, measure_steps = 2;
  bool do_measure = false;
  std::int64_t max_params = 100'000'000;
  std::vector<int> depth, dims;
  std::string csv;
  app.add_option("--patch", patch,
                 "patch D H W (one value for a cube) for the MACs and activation-memory columns; the paper's is 128")
      ->expected(1, 3)
      ->check(CLI::PositiveNumber);
  app.add_option("--batch", batch, "batch size for the activation memory and --measure (nnU-Net's is 2)")
      ->check(CLI::PositiveNumber);
  app.add_flag("--measure", do_measure,
               "also time a real training step (forward, DC+CE, backward, clip, SGD) per row on this CPU at "
               "--measure-patch, and the heap the step's graph holds; off by default because it allocates the model");
  app.add_option("--measure-patch", measure_patch,
                 "cube edge for --measure; must divide by the pooling product (32 for the presets' 2x2x2 pools)")
      ->check(CLI::PositiveNumber);
  app.add_option("--measure-steps", measure_steps, "timed steps per row after one untimed warm-up step")
      ->check(CLI::PositiveNumber);
  app.add_option("--max-params", max_params,
                 "--measure only runs rows with fewer parameters than this (L and H need GiBs and minutes)")
      ->check(CLI::PositiveNumber);
  app.add_option("--depth", depth, "add a custom row: six residual-block counts (with --dims)")->expected(6);
  app.add_option("--dims", dims, "add a custom row: six stage widths (with --depth)")->expected(6);
  app.add_option("--csv", csv, "also write the rows as CSV to this file");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "stunet-scaling: %s (see --help)\n", one_line(e.what()).c_str());
    return 1;
  }

  try {
    const Int3 p3 = patch.size() == 1 ? Int3{patch[0], patch[0], patch[0]}
                    : patch.size() == 3 ? Int3{patch[0], patch[1], patch[2]}
                                        : Int3{0, 0, 0};
    STUNET_CHECK(p3[0] > 0, "--patch takes one value (a cube) or three (D H W), got {}", patch.size());

    // Table 2 and Table 7 (each starting from B). The paper's figures are the
    // ones Table 2 prints; for the depth-only and width-only rows of Table 7
    // we do not have the paper's figures, so those columns say "-". The
    // compound rows are L and H themselves, so Table 2's figures apply.
    const PaperFigure pS{14.6, 1e6, 1, "14.6M"}, pB{58.26, 1e6, 2, "58.26M"}, pL{440.30, 1e6, 2, "440.30M"},
        pH{1.46, 1e9, 2, "1.46B"};
    const PaperFigure fS{0.13, 1e12, 2, "0.13"}, fB{0.51, 1e12, 2, "0.51"}, fL{3.81, 1e12, 2, "3.81"},
        fH{12.60, 1e12, 2, "12.60"};
    std::vector<Row> rows{{"2", "S", nn::presets::small, pS, fS},
                          {"2", "B", nn::presets::base, pB, fB},
                          {"2", "L", nn::presets::large, pL, fL},
                          {"2", "H", nn::presets::huge, pH, fH}};
    auto scaled = [](int depth_factor, int width_factor) {
      nn::STUNetConfig c = nn::presets::base;
      for (auto& d : c.depth) d *= depth_factor;
      for (auto& w : c.dims) w *= width_factor;
      return c;
    };
    rows.push_back({"7", "B depth x2", scaled(2, 1), {}, {}});
    rows.push_back({"7", "B depth x3", scaled(3, 1), {}, {}});
    rows.push_back({"7", "B width x2", scaled(1, 2), {}, {}});
    rows.push_back({"7", "B width x3", scaled(1, 3), {}, {}});
    rows.push_back({"7", "B compound x2 (=L)", scaled(2, 2), pL, fL});
    rows.push_back({"7", "B compound x3 (=H)", scaled(3, 3), pH, fH});
    STUNET_CHECK(depth.empty() == dims.empty(), "--depth and --dims are given together, six values each");
    if (!depth.empty()) {
      nn::STUNetConfig c;
      std::copy(depth.begin(), depth.end(), c.depth.begin());
      std::copy(dims.begin(), dims.end(), c.dims.begin());
      nn::validate(c);
      rows.push_back({"custom", "custom", c, {}, {}});
    }
    for (const Row& r : rows) {
      check_patch(r, p3, "--patch");
      if (do_measure && nn::parameter_count(r.config) < max_params) check_patch(r, {measure_patch, measure_patch, measure_patch}, "--measure-patch");
    }

    std::vector<RowResult> results(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const nn::STUNetConfig& c = rows[i].config;
      RowResult& r = results[i];
      r.params = nn::parameter_count(c);
      r.macs = nn::forward_macs(c, p3);
      r.bias_adds = conv_output_elements(c, p3);
      r.activation_bytes = saved_activation_bytes(c, p3, batch);
      if (!do_measure) continue;
      if (r.params >= max_params) {
        r.skipped = "params >= --max-params";
        continue;
      }
      std::fprintf(stderr, "measuring %s ...\n", rows[i].name.c_str());
      measure(c, measure_patch, batch, measure_steps, r);
    }

    // ---- the text tables ----
    const std::string patch_text = fmt::format("{}x{}x{}", p3[0], p3[1], p3[2]);
    const bool paper_patch = p3 == Int3{128, 128, 128};  // the paper's FLOPs only compare at its patch
    std::printf("STU-Net scaling, 1 input channel, 105 classes (TotalSegmentator). MACs: multiply-accumulates of the "
                "convolutions\nin one forward pass of one %s patch (the paper's \"FLOPs\"); +bias also counts one add "
                "per conv output.\nact.: float32 tensors a training step saves for backward, batch %d, %s.\n",
                patch_text.c_str(), batch, patch_text.c_str());
    if (do_measure)
      std::printf("--measure: one training step on this CPU (%d threads), batch %d, %dx%dx%d, mean of %d after a "
                  "warm-up;\nheld: heap growth over forward + loss, est.: the act. rule at that patch.\n",
                  max_threads(), batch, measure_patch, measure_patch, measure_patch, measure_steps);
    std::vector<std::string> header{"row", "depth", "dims", "params", "paper", "MACs(T)", "+bias(T)", "paper(T)",
                                    "act.(GiB)"};
    const std::string mp = fmt::format("@{}^3", measure_patch);
    if (do_measure) header.insert(header.end(), {"step(s)" + mp, "held(MiB)", "est.(MiB)"});
    auto cells = [&](std::size_t i) {
      const Row& row = rows[i];
      const RowResult& r = results[i];
      std::vector<std::string> c{row.name,
                                 join(row.config.depth),
                                 join(row.config.dims),
                                 std::to_string(r.params),
                                 row.paper_params ? row.paper_params->text : "-",
                                 fmt::format("{:.3f}", static_cast<double>(r.macs) / 1e12),
                                 fmt::format("{:.3f}", static_cast<double>(r.macs + r.bias_adds) / 1e12),
                                 row.paper_flops && paper_patch ? row.paper_flops->text : "-",
                                 gib(r.activation_bytes)};
      if (do_measure) {
        if (r.measured) {
          c.push_back(fmt::format("{:.2f}", r.step_seconds));
          c.push_back(r.held_bytes < 0 ? "-" : mib(r.held_bytes));
          c.push_back(mib(r.estimate_bytes_measure_patch));
        } else {
          c.insert(c.end(), {"-", "-", "-"});
        }
      }
      return c;
    };
    for (const char* table : {"2", "7", "custom"}) {
      std::vector<std::vector<std::string>> lines;
      for (std::size_t i = 0; i < rows.size(); ++i)
        if (rows[i].table == table) lines.push_back(cells(i));
      if (lines.empty()) continue;
      if (std::string(table) == "2") std::printf("\nTable 2: the four sizes\n");
      if (std::string(table) == "7")
        std::printf("\nTable 7: scaling B in depth, width, or both (paper figures unknown to us: '-')\n");
      if (std::string(table) == "custom") std::printf("\nCustom row\n");
      print_table(header, lines);
    }

    // Agreement with the paper, computed: rounds to the printed figure or not.
    std::vector<std::string> params_ok, params_bad, macs_ok, macs_bad, bias_ok, bias_bad;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      if (rows[i].table != "2") continue;
      const RowResult& r = results[i];
      (rows[i].paper_params->matches(static_cast<double>(r.params)) ? params_ok : params_bad).push_back(rows[i].name);
      (rows[i].paper_flops->matches(static_cast<double>(r.macs)) ? macs_ok : macs_bad).push_back(rows[i].name);
      (rows[i].paper_flops->matches(static_cast<double>(r.macs + r.bias_adds)) ? bias_ok : bias_bad)
          .push_back(rows[i].name);
    }
    auto list = [](const std::vector<std::string>& v) { return v.empty() ? std::string("none") : fmt::format("{}", fmt::join(v, " ")); };
    if (paper_patch) {
      std::printf("\nRounded to the paper's precision: params agree for %s (differ: %s); MACs agree for %s "
                  "(differ: %s);\nMACs+bias agree for %s (differ: %s).\n",
                  list(params_ok).c_str(), list(params_bad).c_str(), list(macs_ok).c_str(), list(macs_bad).c_str(),
                  list(bias_ok).c_str(), list(bias_bad).c_str());
    } else {
      std::printf("\nThe paper's FLOPs are for 128x128x128; only the parameters compare at this patch.\n");
    }
    if (do_measure) {
      // The activation rule against the heap: a gap here means an op saves
      // more (or less) than the rule above says.
      for (std::size_t i = 0; i < rows.size(); ++i)
        if (results[i].measured && results[i].held_bytes >= 0)
          std::printf("%s: heap held %s MiB, rule %s MiB (%+.2f%%)\n", rows[i].name.c_str(),
                      mib(results[i].held_bytes).c_str(), mib(results[i].estimate_bytes_measure_patch).c_str(),
                      100.0 * static_cast<double>(results[i].held_bytes - results[i].estimate_bytes_measure_patch) /
                          static_cast<double>(results[i].estimate_bytes_measure_patch));
      for (std::size_t i = 0; i < rows.size(); ++i)
        if (!results[i].skipped.empty())
          std::printf("not measured: %s (%s, %s >= %s)\n", rows[i].name.c_str(), results[i].skipped.c_str(),
                      std::to_string(results[i].params).c_str(), std::to_string(max_params).c_str());
    }

    // ---- CSV: the same rows, unrounded ----
    if (!csv.empty()) {
      std::ofstream f(csv);
      STUNET_CHECK(f.good(), "cannot write --csv file '{}'", csv);
      f << "table,row,depth,dims,params,paper_params,macs,macs_with_bias,paper_tflops,patch,batch,activation_bytes,"
           "measure_patch,step_seconds,held_bytes,estimate_bytes_at_measure_patch\n";
      for (std::size_t i = 0; i < rows.size(); ++i) {
        const Row& row = rows[i];
        const RowResult& r = results[i];
        const std::string paper_params =
            row.paper_params ? fmt::format("{:.0f}", row.paper_params->value * row.paper_params->unit) : "";
        const std::string paper_flops = row.paper_flops && paper_patch ? std::string(row.paper_flops->text) : "";
        f << row.table << ',' << row.name << ",\"" << join(row.config.depth) << "\",\"" << join(row.config.dims)
          << "\"," << r.params << ',' << paper_params << ',' << r.macs << ',' << r.macs + r.bias_adds << ','
          << paper_flops << ',' << patch_text << ',' << batch << ',' << r.activation_bytes << ',';
        if (r.measured)
          f << measure_patch << ',' << fmt::format("{:.4f}", r.step_seconds) << ','
            << (r.held_bytes < 0 ? std::string() : std::to_string(r.held_bytes)) << ','
            << r.estimate_bytes_measure_patch;
        else
          f << ",,,";
        f << '\n';
      }
      f.close();
      STUNET_CHECK(f.good(), "writing --csv file '{}' failed", csv);
      std::printf("wrote %s\n", csv.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "stunet-scaling: %s\n", one_line(e.what()).c_str());
    return 1;
  }
  return 0;
}
