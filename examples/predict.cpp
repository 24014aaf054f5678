// stunet-predict: segments CT/MR volumes with an STU-Net, the way
// `nnUNet_predict` / TotalSegmentator users expect: NIfTI files or folders in
// (nnU-Net naming: CASE_0000.nii.gz, CASE_0001.nii.gz, ... are the channels
// of CASE), one label map per case out, in the input's geometry and header.
//
//   stunet-predict -i imagesTs -o predictions -m stunet_small.safetensors
//   stunet-predict -i ct.nii.gz -o out -m small_ep4k.model --plan totalsegmentator --fast
//
// The model is its weights (safetensors; official nnU-Net v1 .model / v2
// .pth when built with libzip) plus its plan: `<weights stem>.plan.json` or
// `plan.json` next to the weights, a file given with --plan, or the built-in
// plan of the released TotalSegmentator models (--plan totalsegmentator).
//
// Per case it prints a progress bar (tiles), the time of each stage, and
// writes OUT/CASE.nii.gz (uint8, uint16 beyond 256 classes), a PNG preview
// OUT/CASE.png (axial, coronal and sagittal mid-slices with the labels) and,
// with --save-probabilities, OUT/CASE_probabilities.nii.gz (4D float32).
//
// Any failure prints one line, "stunet-predict: <message>", and exits 1.

#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <CLI/CLI.hpp>

#include <stunet/core/parallel.hpp>
#include <stunet/infer/predictor.hpp>
#include <stunet/io/png.hpp>
#include <stunet/io/preview.hpp>
#include "device_options.hpp"

using namespace stunet;
namespace fs = std::filesystem;

namespace {

/// An error as one line: the message without the " (file:line, check ...)" suffix.
std::string one_line(std::string m) {
  const auto check = m.find(", check `");
  if (check != std::string::npos) {
    const auto open = m.rfind(" (", check);
    if (open != std::string::npos) m.erase(open);
  }
  for (char& c : m)
    if (c == '\n' || c == '\r') c = ' ';
  return m;
}

/// "1.5" -> (1.5, 1.5, 1.5); "3,1.5,1.5" -> (D, H, W).
data::Spacing parse_spacing(const std::string& s) {
  std::vector<double> v;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    std::size_t used = 0;
    double x = 0;
    try {
      x = std::stod(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    STUNET_CHECK(used == item.size() && !item.empty() && x > 0 && std::isfinite(x),
                 "--spacing '{}': expected one positive number or three (D,H,W) in mm", s);
    v.push_back(x);
  }
  STUNET_CHECK(v.size() == 1 || v.size() == 3, "--spacing '{}': expected one number or three (D,H,W)", s);
  return v.size() == 1 ? data::Spacing{v[0], v[0], v[0]} : data::Spacing{v[0], v[1], v[2]};
}

/// A one-line progress bar on stderr, redrawn in place on a terminal and
/// printed at quarters otherwise (logs stay short).
class ProgressBar {
 public:
  ProgressBar(std::string label, bool enabled) : label_(std::move(label)), enabled_(enabled), tty_(isatty(2) != 0) {}
  void update(std::int64_t done, std::int64_t total) {
    if (!enabled_ || total <= 0) return;
    const double f = static_cast<double>(done) / static_cast<double>(total);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const int quarter = static_cast<int>(f * 4);
    if (!tty_ && quarter == last_quarter_ && done != total) return;
    last_quarter_ = quarter;
    constexpr int width = 30;
    const int filled = static_cast<int>(f * width);
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(width, '.');
    const double eta = done > 0 ? secs / static_cast<double>(done) * static_cast<double>(total - done) : 0.0;
    std::fprintf(stderr, "%s%s [%s] %lld/%lld tiles, %.1f s, eta %.1f s%s", tty_ ? "\r" : "", label_.c_str(),
                 bar.c_str(), static_cast<long long>(done), static_cast<long long>(total), secs, eta,
                 tty_ && done != total ? "" : "\n");
    std::fflush(stderr);
  }

 private:
  std::string label_;
  bool enabled_, tty_;
  int last_quarter_ = -1;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

/// Axial | coronal | sagittal mid-slices of channel 0 with the labels on top.
void write_preview(const fs::path& path, const data::Image& image, const data::Image& labels, bool ct) {
  io::PreviewOptions o;
  if (ct) o.window = io::kCtSoftTissue;
  else o.window = io::percentile_window(image.data);
  std::vector<io::Bitmap> panels;
  for (io::SliceAxis axis : {io::SliceAxis::axial, io::SliceAxis::coronal, io::SliceAxis::sagittal}) {
    o.axis = axis;
    panels.push_back(io::render_slice(image, &labels, o));
  }
  io::write_png(path, io::hstack(panels));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Segments 3D medical images with an STU-Net: preprocessing with the model's plan (spacing, "
               "normalisation), sliding-window inference with Gaussian weighting (and mirror test-time augmentation "
               "unless --fast), and export in the input's geometry, as nnU-Net does.",
               "stunet-predict"};
  app.option_defaults()->always_capture_default();  // --help shows every default
  std::vector<std::string> inputs;
  std::string output, weights, plan, spacing, device = "cpu", precision = "fp32";
  bool fast = false, disable_tta = false, probabilities = false, no_preview = false, allow_labels = false,
       quiet = false, skip_existing = false;
  double step = 0;
  std::int64_t tile_batch = 1;
  int threads = 0;
  app.add_option("-i,--input", inputs,
                 "NIfTI files or folders of them; CASE_0000.nii.gz, CASE_0001.nii.gz, ... are the channels of "
                 "CASE (nnU-Net naming), any other name is a one-channel case")
      ->required();
  app.add_option("-o,--output", output, "output folder (created): CASE.nii.gz, CASE.png, CASE_probabilities.nii.gz")
      ->required();
  app.add_option("-m,--model", weights,
                 "weights: .safetensors (from stunet-convert, stunet-pretrain or stunet-finetune), or an official "
                 "nnU-Net v1 .model / v2 .pth checkpoint when built with libzip")
      ->required();
  app.add_option("--plan", plan,
                 "the model's plan: a JSON file or the JSON text itself; default: <weights stem>.plan.json or "
                 "plan.json next to the weights, else the plan inside a stunet training checkpoint; "
                 "'totalsegmentator' = the built-in plan of the released TotalSegmentator models (1.5 mm, 105 classes)");
  app.add_flag("--fast", fast,
               "fast mode: no mirroring, argmax at network spacing with a streamed sliding window (little memory), "
               "the label map resampled to the input grid");
  app.add_option("--spacing", spacing,
                 "predict at this spacing in mm instead of the plan's: one number (isotropic) or D,H,W; coarser is "
                 "faster and less accurate");
  app.add_flag("--disable-tta", disable_tta, "no mirror test-time augmentation (8x faster than the default)");
  app.add_option("--step-size", step, "tile step as a fraction of the patch, in (0, 1]; default: the plan's (0.5)");
  app.add_option("--tile-batch", tile_batch, "tiles per forward pass (more uses more memory)")->check(CLI::Range(1, 64));
  app.add_option("--device", device, "cpu, cuda or cuda:N");
  app.add_option("--precision", precision, "activations on CUDA: fp32, fp16 or bf16 (weights stay float32)")
      ->check(CLI::IsMember({"fp32", "fp16", "bf16"}));
  app.add_option("--threads", threads, "CPU threads (default: OpenMP's, i.e. all cores)")->check(CLI::Range(1, 1024));
  app.add_flag("--save-probabilities", probabilities,
               "also write the softmax probabilities on the input grid as a 4D float32 NIfTI (large: one volume "
               "per class)");
  app.add_flag("--no-preview", no_preview, "do not write the PNG preview");
  app.add_flag("--skip-existing", skip_existing, "skip cases whose CASE.nii.gz already exists");
  app.add_flag("--allow-label-input", allow_labels,
               "accept inputs that look like label maps (integer values only, few of them)");
  app.add_flag("-q,--quiet", quiet, "no progress bar and no per-case lines");
  CLI11_PARSE(app, argc, argv);

  try {
#if defined(_OPENMP)
    if (threads > 0) omp_set_num_threads(threads);
#endif
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<fs::path> in_paths(inputs.begin(), inputs.end());
    const std::vector<infer::CaseFiles> cases = infer::group_case_files(in_paths);
    infer::PredictOptions o;
    o.fast = fast;
    if (disable_tta) o.mirroring = false;
    if (!spacing.empty()) o.spacing = parse_spacing(spacing);
    if (step != 0) o.step_size = step;
    o.tile_batch = tile_batch;
    o.probabilities = probabilities;
    o.allow_label_like_input = allow_labels;
    o.device = programs::parse_device(device);
    o.compute_dtype = programs::parse_precision(precision);
    // Contradictions first, before minutes of loading.
    STUNET_CHECK(!(fast && probabilities), "--save-probabilities needs the normal mode (--fast takes the argmax at "
                 "network spacing and never has probabilities on the input grid)");
    programs::check_device_and_precision(o.device, o.compute_dtype);
    const infer::Predictor predictor = infer::Predictor::load(weights, plan);
    const infer::ModelPlan& mp = predictor.plan();
    const bool ct = mp.preprocess.normalization == data::Normalization::ct ||
                    (!mp.channel_names.empty() && (mp.channel_names[0] == "CT" || mp.channel_names[0] == "ct"));
    fs::create_directories(output);
    if (!quiet)
      std::printf("stunet-predict: %zu case(s), model %s (%d -> %d classes, patch %lldx%lldx%lld, %.3g x %.3g x %.3g "
                  "mm), %s mode%s, %d thread(s)\n",
                  cases.size(), weights.c_str(), mp.network.in_channels, mp.network.num_classes,
                  static_cast<long long>(mp.patch[0]), static_cast<long long>(mp.patch[1]),
                  static_cast<long long>(mp.patch[2]), o.spacing ? (*o.spacing)[0] : mp.preprocess.target_spacing[0],
                  o.spacing ? (*o.spacing)[1] : mp.preprocess.target_spacing[1],
                  o.spacing ? (*o.spacing)[2] : mp.preprocess.target_spacing[2], fast ? "fast" : "normal",
                  predictor.window_options(o).mirror_axes.empty() ? ", no TTA" : ", mirror TTA", max_threads());
    std::size_t index = 0;
    for (const auto& c : cases) {
      ++index;
      const fs::path out = fs::path(output) / (c.id + ".nii.gz");
      if (skip_existing && fs::exists(out)) {
        if (!quiet) std::printf("%s: exists, skipped\n", c.id.c_str());
        continue;
      }
      ProgressBar bar(fmt::format("[{}/{}] {}", index, cases.size(), c.id), !quiet);
      o.progress = [&bar](std::int64_t done, std::int64_t total) { bar.update(done, total); };
      io::NiftiHeader like;
      data::Image image;
      infer::CasePrediction p = predictor.predict_files(c.files, o, &like, &image);
      auto te = std::chrono::steady_clock::now();
      infer::write_prediction(out, p.labels, mp.network.num_classes, &like);
      if (p.probabilities)
        infer::write_probabilities(fs::path(output) / (c.id + "_probabilities.nii.gz"), *p.probabilities, &like);
      const double write_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - te).count();
      double preview_s = 0;
      if (!no_preview) {
        const auto tp = std::chrono::steady_clock::now();
        write_preview(fs::path(output) / (c.id + ".png"), image, p.labels, ct);
        preview_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - tp).count();
      }
      if (!quiet) {
        const auto s = image.spatial_shape();
        std::printf("%s: %lldx%lldx%lld -> network grid %lldx%lldx%lld, %lld tiles | read %.2f s, preprocess %.2f s, "
                    "predict %.2f s, restore %.2f s, write %.2f s, preview %.2f s -> %s\n",
                    c.id.c_str(), static_cast<long long>(s[0]), static_cast<long long>(s[1]),
                    static_cast<long long>(s[2]), static_cast<long long>(p.network_shape[0]),
                    static_cast<long long>(p.network_shape[1]), static_cast<long long>(p.network_shape[2]),
                    static_cast<long long>(p.tiles), p.times.read, p.times.preprocess, p.times.predict,
                    p.times.export_, write_s, preview_s, out.string().c_str());
        std::fflush(stdout);
      }
    }
    if (!quiet)
      std::printf("stunet-predict: done in %.1f s\n",
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "stunet-predict: %s\n", one_line(e.what()).c_str());
  }
  return 1;
}
