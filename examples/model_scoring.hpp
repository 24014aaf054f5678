#pragma once
// What stunet-demo and stunet-scaling-study share: predict held-out cases
// with a trained model and score them. A program file, not a library header.

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <stunet/data/dataset.hpp>
#include <stunet/eval/metrics.hpp>
#include <stunet/infer/predictor.hpp>
#include <stunet/io/preview.hpp>

namespace stunet::programs {

/// Predicts every case of `test` with the model at `weights` (fast mode: no
/// TTA, since these programs compare models, not test-time tricks), writes
/// OUT_DIR/<case>.nii.gz and a PNG preview (image | reference | prediction)
/// per case, and returns the Dice per foreground class averaged over cases.
inline std::vector<double> predict_and_score(const std::filesystem::path& weights, const data::Dataset& test,
                                             const std::filesystem::path& out_dir, const std::string& tag) {
  namespace fs = std::filesystem;
  const infer::Predictor predictor = infer::Predictor::load(weights);
  fs::create_directories(out_dir);
  std::vector<std::vector<eval::ClassMetrics>> per_case;
  std::vector<std::int64_t> classes;
  for (int k = 1; k < test.num_classes(); ++k) classes.push_back(k);
  const std::vector<eval::LabelGroup> groups = eval::identity_groups(classes, test.label_names);
  for (const auto& c : test.cases) {
    infer::PredictOptions o;
    o.fast = true;
    io::NiftiHeader header;
    data::Image image;
    const infer::CasePrediction p = predictor.predict_files(c.images, o, &header, &image);
    infer::write_prediction(out_dir / (c.id + ".nii.gz"), p.labels, test.num_classes(), &header);
    const data::Image ref = data::load_case_label(c, test.num_classes(), &image);
    io::PreviewOptions po;
    io::write_png(out_dir / (c.id + ".png"), io::render_comparison(image, &ref, &p.labels, po));
    per_case.push_back(eval::evaluate_images(p.labels, ref, groups, eval::MetricOptions{.surface = false}));
    std::fprintf(stderr, "  %s %s: predicted in %.1f s\n", tag.c_str(), c.id.c_str(), p.times.predict);
  }
  std::vector<double> dice;
  for (const auto& m : eval::mean_over_cases(per_case)) dice.push_back(m.dice);
  return dice;
}

}  // namespace stunet::programs
