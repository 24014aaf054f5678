// stunet-phantoms: writes a synthetic nnU-Net v2 raw dataset of trunk
// phantoms, stunet's default data for trying pretraining and fine-tuning
// without downloading anything.
//
//   stunet-phantoms --task pretrain --cases 20 --size 64 --out Dataset900_PhantomPretrain
//   stunet-phantoms --task downstream --cases 5 --size 48,96,96 --seed 7 --out Dataset901_PhantomDownstream --preview
//
// Any failure (bad argument, unwritable folder) prints one line,
// "stunet-phantoms: <message>", to stderr and exits 1.

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <stunet/data/phantoms.hpp>
#include <stunet/io/png.hpp>
#include <stunet/io/preview.hpp>

namespace {

void report(const std::string& message) {
  std::string line = message;
  std::replace(line.begin(), line.end(), '\n', ' ');
  std::fprintf(stderr, "stunet-phantoms: %s\n", line.c_str());
}

/// "D,H,W" or one number N, which means D = N / 2, H = W = N: like a CT,
/// fewer and thicker slices than in-plane voxels.
std::array<std::int64_t, 3> parse_size(const std::string& text) {
  std::vector<std::int64_t> v;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = text.find(',', start);
    const std::string part = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    std::size_t used = 0;
    long long n = 0;
    try {
      n = std::stoll(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    STUNET_CHECK(used == part.size() && !part.empty(), "--size '{}': '{}' is not a whole number", text, part);
    v.push_back(n);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  STUNET_CHECK(v.size() == 1 || v.size() == 3, "--size '{}': expected D,H,W or one number, got {} values", text,
               v.size());
  if (v.size() == 1) return {std::max<std::int64_t>(v[0] / 2, 8), v[0], v[0]};
  return {v[0], v[1], v[2]};
}

/// Axial mid-slice over a coronal one, each as image | image + labels.
stunet::io::Bitmap preview_of(const stunet::data::PhantomCase& c, bool ct) {
  using namespace stunet::io;
  PreviewOptions o;
  if (ct) o.window = kCtSoftTissue;
  std::vector<Bitmap> rows;
  o.axis = SliceAxis::axial;
  rows.push_back(render_comparison(c.image, &c.label, nullptr, o));
  o.axis = SliceAxis::coronal;
  rows.push_back(render_comparison(c.image, &c.label, nullptr, o));
  return vstack(rows);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "Writes a synthetic nnU-Net v2 raw dataset (dataset.json, imagesTr/*_0000.nii.gz as int16, labelsTr/*.nii.gz "
      "as uint8) of trunk phantoms: body with skin, fat and muscle, spine, ribs, lungs, heart and abdominal organs as "
      "smoothly deformed shapes that vary per case, sampled on a grid whose spacing varies per case. 'pretrain' is CT "
      "(Hounsfield units, random contrast phase) with 18 anatomical classes; 'downstream' is the same anatomy with an "
      "MR-like contrast and new targets (liver, kidney, liver tumours, kidney tumours), for fine-tuning experiments; 'downstream_ct' has "
      "the same patients and targets in CT. Case i depends only on (task, seed, i, size).",
      "stunet-phantoms"};
  std::string task = "pretrain", size_text = "64", out;
  int cases = 10;
  std::uint64_t seed = 0;
  bool preview = false, quiet = false;
  app.add_option("--task", task,
                 "pretrain (CT, 18 classes), downstream (MR-like, liver/kidney and their tumours) or downstream_ct "
                 "(the same targets in CT)")
      ->check(CLI::IsMember({"pretrain", "downstream", "downstream_ct"}))
      ->capture_default_str();
  app.add_option("--cases", cases, "number of training cases to write (1..1000000)")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  app.add_option("--size", size_text,
                 "voxel grid as D,H,W (slices, rows, columns), each 8..1024; one number N means N/2,N,N. The patient "
                 "is the same at every size: larger voxels at smaller sizes")
      ->capture_default_str();
  app.add_option("--seed", seed, "dataset seed; the same seed gives the same files")->capture_default_str();
  app.add_option("--out", out, "dataset folder to create or overwrite files in (e.g. Dataset900_PhantomPretrain)")
      ->required();
  app.add_flag("--preview", preview,
               "also write FOLDER/previews/<case>.png: axial and coronal mid-slices, image | image + label overlay");
  app.add_flag("-q,--quiet", quiet, "print nothing on success");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    report(e.what());
    return 1;
  }

  try {
    stunet::data::PhantomOptions options;
    options.task = stunet::data::parse_phantom_task(task);
    options.cases = cases;
    options.size = parse_size(size_text);
    options.seed = seed;
    const std::filesystem::path folder = out;
    if (preview) {
      std::error_code ec;
      std::filesystem::create_directories(folder / "previews", ec);
      STUNET_CHECK(!ec, "cannot create '{}': {}", (folder / "previews").string(), ec.message());
    }
    const bool ct = options.task != stunet::data::PhantomTask::downstream;
    const auto t0 = std::chrono::steady_clock::now();
    stunet::data::write_phantom_dataset(folder, options, [&](const stunet::data::PhantomCase& c) {
      if (preview) stunet::io::write_png(folder / "previews" / (c.name + ".png"), preview_of(c, ct));
      if (!quiet)
        std::printf("  %s  spacing %.2f x %.2f x %.2f mm\n", c.name.c_str(), c.image.spacing[0], c.image.spacing[1],
                    c.image.spacing[2]);
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!quiet)
      std::printf("stunet-phantoms: wrote %d %s cases (%lld x %lld x %lld voxels) to %s in %.1f s\n", cases,
                  task.c_str(), static_cast<long long>(options.size[0]), static_cast<long long>(options.size[1]),
                  static_cast<long long>(options.size[2]), folder.string().c_str(), seconds);
    return 0;
  } catch (const stunet::Error& e) {
    report(e.what());
  } catch (const std::exception& e) {  // out of memory, filesystem errors
    report(e.what());
  }
  return 1;
}
