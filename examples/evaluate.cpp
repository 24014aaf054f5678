// stunet-evaluate: Dice, normalised surface Dice (NSD) at a tolerance in mm
// and HD95 per class between predicted and reference label maps, spacing-
// aware, with per-case and mean rows in CSV and JSON.
//
//   stunet-evaluate predictions labelsTs --csv metrics.csv --json metrics.json
//   stunet-evaluate pred/ labelsTr/ --protocol AMOS22 --tolerance 2
//
// PRED and REF are two files or two folders; folder files are paired by name
// (CASE.nii.gz; a prediction named CASE_0000.nii.gz also matches CASE).
// Classes: every label present (default), --labels 1,2,3, a --map JSON
// ([{"name": "kidney", "pred": [38, 39], "ref": [2]}, ...]), or --protocol:
// the paper's direct-inference label mapping of a TotalSegmentator model's
// output onto an external dataset (kidney = kidney_left + kidney_right, ...).
//
// Any failure prints one line, "stunet-evaluate: <message>", and exits 1.

#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <stunet/eval/metrics.hpp>
#include <stunet/infer/predictor.hpp>
#include <stunet/io/nifti.hpp>

using namespace stunet;
namespace fs = std::filesystem;

namespace {

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

struct Pair {
  std::string id;
  fs::path pred, ref;
};

/// Prediction/reference pairs from two files or two folders.
std::vector<Pair> pair_files(const fs::path& pred, const fs::path& ref, bool quiet) {
  STUNET_CHECK(fs::exists(pred), "prediction '{}' does not exist", pred.string());
  STUNET_CHECK(fs::exists(ref), "reference '{}' does not exist", ref.string());
  const bool pd = fs::is_directory(pred), rd = fs::is_directory(ref);
  STUNET_CHECK(pd == rd, "give two files or two folders ('{}' is {}, '{}' is {})", pred.string(),
               pd ? "a folder" : "a file", ref.string(), rd ? "a folder" : "a file");
  if (!pd) {
    const std::string id = infer::nifti_stem(ref);
    STUNET_CHECK(!id.empty(), "reference '{}' is not a NIfTI file", ref.string());
    STUNET_CHECK(!infer::nifti_stem(pred).empty(), "prediction '{}' is not a NIfTI file", pred.string());
    return {{id, pred, ref}};
  }
  auto probabilities = [](const std::string& id) {  // stunet-predict's extra output, not a label map
    return id.size() > 14 && id.compare(id.size() - 14, 14, "_probabilities") == 0;
  };
  std::map<std::string, fs::path> refs;
  for (const auto& e : fs::directory_iterator(ref))
    if (e.is_regular_file() && !infer::nifti_stem(e.path()).empty() && !probabilities(infer::nifti_stem(e.path())))
      refs[infer::nifti_stem(e.path())] = e.path();
  std::vector<Pair> out;
  std::set<std::string> used;
  std::vector<fs::path> preds;
  for (const auto& e : fs::directory_iterator(pred))
    if (e.is_regular_file() && !infer::nifti_stem(e.path()).empty()) preds.push_back(e.path());
  std::sort(preds.begin(), preds.end());
  for (const auto& p : preds) {
    std::string id = infer::nifti_stem(p);
    if (probabilities(id)) continue;
    if (!refs.count(id) && id.size() > 5 && id[id.size() - 5] == '_') id = id.substr(0, id.size() - 5);
    STUNET_CHECK(refs.count(id), "prediction '{}' has no reference '{}.nii.gz' (or .nii) in '{}'", p.string(), id,
                 ref.string());
    used.insert(id);
    out.push_back({id, p, refs.at(id)});
  }
  STUNET_CHECK(!out.empty(), "no NIfTI predictions in '{}'", pred.string());
  if (!quiet)
    for (const auto& [id, path] : refs)
      if (!used.count(id)) std::fprintf(stderr, "stunet-evaluate: note: no prediction for reference case '%s'\n", id.c_str());
  return out;
}

data::Image read_labels(const fs::path& path) {
  const io::NiftiVolume v = io::read_nifti(path);
  STUNET_CHECK(v.header.channels() == 1, "'{}' holds {} volumes; a label map has one", path.string(),
               v.header.channels());
  return data::Image{v.labels(DType::i32), v.header.spacing(), v.header.affine()};
}

std::vector<std::int64_t> parse_labels(const std::string& s) {
  std::vector<std::int64_t> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    std::size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    STUNET_CHECK(used == item.size() && v >= 0, "--labels '{}': expected label values such as 1,2,3", s);
    out.push_back(v);
  }
  return out;
}

/// Label names from an nnU-Net dataset.json ({"labels": {"background": 0, "liver": 1}}).
std::vector<std::string> names_from_dataset_json(const fs::path& path) {
  std::ifstream in(path);
  STUNET_CHECK(in.good(), "cannot open '{}'", path.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    STUNET_FAIL("'{}' is not valid JSON: {}", path.string(), e.what());
  }
  STUNET_CHECK(j.contains("labels") && j.at("labels").is_object(), "'{}' has no 'labels' object", path.string());
  std::vector<std::string> names;
  for (const auto& [name, value] : j.at("labels").items()) {
    STUNET_CHECK(value.is_number_integer() && value.get<int>() >= 0 && value.get<int>() < 100000,
                 "'{}': label '{}' must map to one value (region labels are not supported)", path.string(), name);
    const auto v = static_cast<std::size_t>(value.get<int>());
    if (names.size() <= v) names.resize(v + 1);
    names[v] = name;
  }
  return names;
}

nlohmann::json num(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

nlohmann::json metrics_json(const eval::ClassMetrics& m) {
  return {{"dice", num(m.dice)}, {"nsd", num(m.nsd)}, {"hd95", num(m.hd95)}, {"tp", m.tp}, {"fp", m.fp},
          {"fn", m.fn}, {"pred_volume_ml", num(m.pred_volume_ml)}, {"ref_volume_ml", num(m.ref_volume_ml)}};
}

std::string csv_num(double v) { return std::isfinite(v) ? fmt::format("{:.6g}", v) : "nan"; }

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::string join_values(const std::vector<std::int64_t>& v) {
  std::string s;
  for (auto x : v) s += (s.empty() ? "" : "+") + std::to_string(x);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Compares predicted label maps with references: Dice, normalised surface Dice at a tolerance in mm "
               "and the 95th-percentile Hausdorff distance per class, with the voxel spacing of the reference. "
               "Writes per-case and mean rows as CSV and JSON.",
               "stunet-evaluate"};
  app.option_defaults()->always_capture_default();  // --help shows every default
  std::string pred, ref, labels, map_file, protocol, dataset_json, csv, json_out;
  double tolerance = 1.0;
  bool no_surface = false, quiet = false;
  app.add_option("PRED", pred, "predicted label map, or a folder of them")->required();
  app.add_option("REF", ref, "reference label map, or a folder of them (paired by file name)")->required();
  app.add_option("--labels", labels, "evaluate these label values (comma separated); default: every label present");
  app.add_option("--dataset-json", dataset_json, "nnU-Net dataset.json whose 'labels' name the classes");
  app.add_option("--map", map_file,
                 "JSON list of classes {\"name\", \"pred\": values or TotalSegmentator names, \"ref\": values}; "
                 "several values merge into one class");
  app.add_option("--protocol", protocol,
                 "the paper's direct-inference mapping of a TotalSegmentator model onto a dataset, e.g. AMOS22, "
                 "BTCV, FLARE22, WORD, AbdomenCT1K, KiTS2021, CT_ORG, VerSe2020, SegThor");
  app.add_option("--tolerance", tolerance, "NSD tolerance in mm")->check(CLI::NonNegativeNumber);
  app.add_flag("--no-surface", no_surface, "Dice and volumes only (no NSD, HD95; much faster)");
  app.add_option("--csv", csv, "write per-case and mean rows here");
  app.add_option("--json", json_out, "write per-case and mean metrics here");
  app.add_flag("-q,--quiet", quiet, "print nothing but errors");
  CLI11_PARSE(app, argc, argv);

  try {
    STUNET_CHECK(static_cast<int>(!labels.empty()) + static_cast<int>(!map_file.empty()) +
                         static_cast<int>(!protocol.empty()) <= 1,
                 "give at most one of --labels, --map and --protocol");
    const std::vector<Pair> pairs = pair_files(pred, ref, quiet);
    std::vector<std::string> names;
    if (!dataset_json.empty()) names = names_from_dataset_json(dataset_json);
    std::vector<eval::LabelGroup> groups;
    if (!protocol.empty()) {
      groups = eval::direct_inference_groups(protocol);
    } else if (!map_file.empty()) {
      std::ifstream in(map_file);
      STUNET_CHECK(in.good(), "cannot open --map '{}'", map_file);
      try {
        groups = eval::label_groups_from_json(nlohmann::json::parse(in));
      } catch (const nlohmann::json::exception& e) {
        STUNET_FAIL("--map '{}' is not valid JSON: {}", map_file, e.what());
      }
    } else if (!labels.empty()) {
      groups = eval::identity_groups(parse_labels(labels), names);
    } else if (names.size() > 1) {
      std::vector<std::int64_t> all;
      for (std::size_t k = 1; k < names.size(); ++k)
        if (!names[k].empty()) all.push_back(static_cast<std::int64_t>(k));
      groups = eval::identity_groups(all, names);
    } else {  // every label present in any file
      std::set<std::int64_t> present;
      for (const auto& p : pairs)
        for (const fs::path& f : {p.pred, p.ref}) {
          const data::Image l = read_labels(f);
          const std::int32_t* v = l.data.data<std::int32_t>();
          for (std::int64_t i = 0; i < l.data.numel(); ++i)
            if (v[i] > 0) present.insert(v[i]);
        }
      STUNET_CHECK(!present.empty(), "no foreground label in any prediction or reference");
      groups = eval::identity_groups(std::vector<std::int64_t>(present.begin(), present.end()), names);
    }
    eval::MetricOptions mo;
    mo.tolerance_mm = tolerance;
    mo.surface = !no_surface;

    std::vector<std::vector<eval::ClassMetrics>> results;
    for (const auto& p : pairs) {
      const data::Image a = read_labels(p.pred), b = read_labels(p.ref);
      try {
        results.push_back(eval::evaluate_images(a, b, groups, mo));
      } catch (const Error& e) {
        STUNET_FAIL("case '{}' ('{}' vs '{}'): {}", p.id, p.pred.string(), p.ref.string(), e.what());
      }
      if (!quiet) {
        double s = 0;
        int n = 0;
        for (const auto& m : results.back())
          if (!std::isnan(m.dice)) {
            s += m.dice;
            ++n;
          }
        std::printf("%s: mean Dice %s over %d class(es)\n", p.id.c_str(), csv_num(n ? s / n : std::nan("")).c_str(),
                    n);
      }
    }
    const std::vector<eval::ClassMetrics> mean = eval::mean_over_cases(results);
    // The mean over classes of the class means (nnU-Net's foreground_mean).
    std::vector<std::vector<eval::ClassMetrics>> per_class;
    for (const auto& c : mean) per_class.push_back({c});
    const eval::ClassMetrics fg = eval::mean_over_cases(per_class).front();

    if (!csv.empty()) {
      std::ofstream out(csv);
      STUNET_CHECK(out.good(), "cannot write --csv '{}'", csv);
      out << "case,class,pred_values,ref_values,dice,nsd,hd95,tp,fp,fn,pred_volume_ml,ref_volume_ml\n";
      auto row = [&](const std::string& c, const eval::LabelGroup* g, const eval::ClassMetrics& m) {
        out << csv_field(c) << ',' << csv_field(g ? g->name : "all") << ',' << (g ? join_values(g->pred_values) : "")
            << ',' << (g ? join_values(g->ref_values) : "") << ',' << csv_num(m.dice) << ',' << csv_num(m.nsd) << ','
            << csv_num(m.hd95) << ',' << m.tp << ',' << m.fp << ',' << m.fn << ',' << csv_num(m.pred_volume_ml)
            << ',' << csv_num(m.ref_volume_ml) << '\n';
      };
      for (std::size_t c = 0; c < pairs.size(); ++c)
        for (std::size_t g = 0; g < groups.size(); ++g) row(pairs[c].id, &groups[g], results[c][g]);
      for (std::size_t g = 0; g < groups.size(); ++g) row("mean", &groups[g], mean[g]);
      row("mean", nullptr, fg);
      STUNET_CHECK(out.good(), "writing --csv '{}' failed", csv);
    }
    if (!json_out.empty()) {
      nlohmann::json j;
      j["tolerance_mm"] = tolerance;
      j["classes"] = nlohmann::json::array();
      for (const auto& g : groups)
        j["classes"].push_back({{"name", g.name}, {"pred", g.pred_values}, {"ref", g.ref_values}});
      j["cases"] = nlohmann::json::array();
      for (std::size_t c = 0; c < pairs.size(); ++c) {
        nlohmann::json m = nlohmann::json::object();
        for (std::size_t g = 0; g < groups.size(); ++g) m[groups[g].name] = metrics_json(results[c][g]);
        j["cases"].push_back({{"case", pairs[c].id},
                              {"prediction", pairs[c].pred.string()},
                              {"reference", pairs[c].ref.string()},
                              {"metrics", m}});
      }
      nlohmann::json m = nlohmann::json::object();
      for (std::size_t g = 0; g < groups.size(); ++g) m[groups[g].name] = metrics_json(mean[g]);
      j["mean"] = m;
      j["foreground_mean"] = {{"dice", num(fg.dice)}, {"nsd", num(fg.nsd)}, {"hd95", num(fg.hd95)}};
      std::ofstream out(json_out);
      STUNET_CHECK(out.good(), "cannot write --json '{}'", json_out);
      out << j.dump(2) << "\n";
      STUNET_CHECK(out.good(), "writing --json '{}' failed", json_out);
    }
    if (!quiet) {
      std::printf("\n%-28s %8s %8s %9s   (%zu case(s), NSD at %.3g mm)\n", "class", "Dice", "NSD", "HD95 mm",
                  pairs.size(), tolerance);
      for (std::size_t g = 0; g < groups.size(); ++g)
        std::printf("%-28s %8s %8s %9s\n", groups[g].name.c_str(), csv_num(mean[g].dice).c_str(),
                    csv_num(mean[g].nsd).c_str(), csv_num(mean[g].hd95).c_str());
      std::printf("%-28s %8s %8s %9s\n", "mean", csv_num(fg.dice).c_str(), csv_num(fg.nsd).c_str(),
                  csv_num(fg.hd95).c_str());
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "stunet-evaluate: %s\n", one_line(e.what()).c_str());
  }
  return 1;
}
