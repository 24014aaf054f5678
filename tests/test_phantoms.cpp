// Synthetic phantoms (determinism, anatomy, intensities, lesions, spacing,
// the nnU-Net raw layout on disk), the PNG writer and slice previews.

#include <doctest/doctest.h>

#include <png.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <tuple>

#include <nlohmann/json.hpp>

#include "stunet/core/parallel.hpp"
#include "stunet/data/phantoms.hpp"
#include "stunet/io/nifti.hpp"
#include "stunet/io/png.hpp"
#include "stunet/io/preview.hpp"
#include "testing.hpp"

using namespace stunet;
using data::PhantomCase;
using data::PhantomTask;
using Size3 = std::array<std::int64_t, 3>;

namespace {

/// Cases are generated once per (task, size, index) for the whole suite.
const PhantomCase& cached_case(PhantomTask task, Size3 size, int index) {
  static std::map<std::tuple<int, Size3, int>, PhantomCase> cache;
  const auto key = std::make_tuple(static_cast<int>(task), size, index);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, data::generate_phantom(task, size, 0, index)).first;
  return it->second;
}

/// Voxel values of `image` grouped by the label at the same voxel.
std::vector<std::vector<double>> values_by_label(const PhantomCase& c, std::size_t classes) {
  const auto img = c.image.data.to_vector<double>();
  const auto lab = c.label.data.to_vector<std::int64_t>();
  std::vector<std::vector<double>> out(classes);
  for (std::size_t i = 0; i < img.size(); ++i) out.at(static_cast<std::size_t>(lab[i])).push_back(img[i]);
  return out;
}

double median(std::vector<double> v) {
  REQUIRE(!v.empty());
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0;
}

/// A fresh folder under the system temp directory, removed on destruction.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& name) {
    path = std::filesystem::temp_directory_path() / fmt::format("stunet_{}_{}", name, ::getpid());
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

std::vector<unsigned char> read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::uint32_t big_endian_u32(const unsigned char* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | std::uint32_t{p[3]};
}

}  // namespace

// ---------------------------------------------------------------------------
// Phantoms

TEST_CASE("phantoms: a case depends only on seed, index and size, not on the thread count") {
  const Size3 size{24, 48, 48};
  for (PhantomTask task : {PhantomTask::pretrain, PhantomTask::downstream, PhantomTask::downstream_ct}) {
    const PhantomCase a = data::generate_phantom(task, size, 7, 3);
    const PhantomCase b = data::generate_phantom(task, size, 7, 3);
    CHECK(same_bytes(a.image.data, b.image.data));
    CHECK(same_bytes(a.label.data, b.label.data));
    CHECK(a.image.spacing == b.image.spacing);
    CHECK(a.name == b.name);
    const PhantomCase other_index = data::generate_phantom(task, size, 7, 4);
    const PhantomCase other_seed = data::generate_phantom(task, size, 8, 3);
    CHECK_FALSE(same_bytes(a.image.data, other_index.image.data));
    CHECK_FALSE(same_bytes(a.label.data, other_index.label.data));
    CHECK_FALSE(same_bytes(a.image.data, other_seed.image.data));
    CHECK(a.image.spacing != other_index.image.spacing);
#if defined(_OPENMP)
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    const PhantomCase serial = data::generate_phantom(task, size, 7, 3);
    omp_set_num_threads(std::max(threads, 2));
    const PhantomCase parallel = data::generate_phantom(task, size, 7, 3);
    omp_set_num_threads(threads);
    CHECK(same_bytes(a.image.data, serial.image.data));
    CHECK(same_bytes(a.image.data, parallel.image.data));
    CHECK(same_bytes(a.label.data, serial.label.data));
#endif
  }
  const PhantomCase p = data::generate_phantom(PhantomTask::pretrain, size, 7, 3);
  const PhantomCase d = data::generate_phantom(PhantomTask::downstream, size, 7, 3);
  CHECK_FALSE(same_bytes(p.image.data, d.image.data));
  CHECK(p.name == "pretrain_0003");
  CHECK(d.name == "downstream_0003");
}

TEST_CASE("phantoms: every label of each task is present in every case at 48x96x96") {
  for (PhantomTask task : {PhantomTask::pretrain, PhantomTask::downstream, PhantomTask::downstream_ct}) {
    const auto names = data::phantom_labels(task);
    CHECK(names.front() == "background");
    CHECK(names.size() == (task == PhantomTask::pretrain ? 19u : 5u));
    CHECK(std::set<std::string>(names.begin(), names.end()).size() == names.size());
    for (int i = 0; i < 4; ++i) {
      const PhantomCase& c = cached_case(task, {48, 96, 96}, i);
      const auto by = values_by_label(c, names.size());
      for (std::size_t l = 0; l < names.size(); ++l)
        CHECK_MESSAGE(by[l].size() >= 10, names[l] << " has " << by[l].size() << " voxels in " << c.name);
    }
  }
}

TEST_CASE("phantoms: median CT value inside each organ lies in its tissue's Hounsfield range") {
  // What a radiologist reads off an abdominal CT (non-contrast to portal
  // venous), widened for partial volume at 4 x 4 x 8 mm voxels.
  const std::map<std::string, std::pair<double, double>> hu{
      {"spleen", {30, 140}},           {"kidney_right", {0, 220}},      {"kidney_left", {0, 220}},
      {"gallbladder", {-10, 40}},      {"liver", {45, 130}},            {"stomach", {-60, 60}},
      {"pancreas", {20, 130}},         {"aorta", {10, 250}},            {"inferior_vena_cava", {10, 200}},
      {"lung_right", {-900, -650}},    {"lung_left", {-900, -650}},     {"heart", {20, 230}},
      {"colon", {-700, 40}},           {"vertebrae", {200, 700}},       {"intervertebral_discs", {60, 200}},
      {"ribs", {150, 600}},            {"autochthon_right", {30, 80}},  {"autochthon_left", {30, 80}}};
  const auto names = data::phantom_labels(PhantomTask::pretrain);
  REQUIRE(hu.size() + 1 == names.size());
  for (int i = 0; i < 4; ++i) {
    const PhantomCase& c = cached_case(PhantomTask::pretrain, {48, 96, 96}, i);
    const auto by = values_by_label(c, names.size());
    for (std::size_t l = 1; l < names.size(); ++l) {
      const auto [lo, hi] = hu.at(names[l]);
      const double m = median(by[l]);
      CHECK_MESSAGE((m >= lo && m <= hi), names[l] << " median " << m << " HU outside [" << lo << ", " << hi
                                                   << "] in " << c.name);
    }
    // Outside the body: air, at the image corner.
    CHECK(c.image.data.at({0, 0, 0, 0}) < -900);
    CHECK(c.image.data.at({0, 47, 95, 95}) < -900);
  }
}

TEST_CASE("phantoms: downstream lesions lie inside their host organ and are T2-bright") {
  // liver 1, kidney 2, liver_tumour 3, kidney_tumour 4
  for (int ci = 0; ci < 4; ++ci) {
    const PhantomCase& c = cached_case(PhantomTask::downstream, {48, 96, 96}, ci);
    const auto lab = c.label.data.to_vector<std::int64_t>();
    const std::int64_t D = 48, H = 96, W = 96;
    // Of the non-lesion 6-neighbours of lesion voxels, count those in the host.
    std::int64_t host[5] = {0, 0, 0, 0, 0}, other[5] = {0, 0, 0, 0, 0};
    for (std::int64_t k = 0; k < D; ++k)
      for (std::int64_t j = 0; j < H; ++j)
        for (std::int64_t i = 0; i < W; ++i) {
          const std::int64_t v = lab[static_cast<std::size_t>((k * H + j) * W + i)];
          if (v < 3) continue;
          const std::int64_t want = v == 3 ? 1 : 2;
          const std::int64_t nb[6][3] = {{1, 0, 0}, {-1, 0, 0}, {0, 1, 0}, {0, -1, 0}, {0, 0, 1}, {0, 0, -1}};
          for (const auto& d : nb) {
            const std::int64_t kk = k + d[0], jj = j + d[1], ii = i + d[2];
            if (kk < 0 || jj < 0 || ii < 0 || kk >= D || jj >= H || ii >= W) continue;
            const std::int64_t u = lab[static_cast<std::size_t>((kk * H + jj) * W + ii)];
            if (u == v) continue;
            (u == want ? host : other)[v] += 1;
          }
        }
    for (int v : {3, 4}) {
      REQUIRE(host[v] + other[v] > 0);
      const double frac = static_cast<double>(host[v]) / static_cast<double>(host[v] + other[v]);
      CHECK_MESSAGE(frac >= 0.85, (v == 3 ? "liver" : "kidney") << " tumour of " << c.name << ": only " << frac
                                                                 << " of its border is host organ");
    }
    // MR-like contrast: tumours brighter than liver parenchyma, air dark.
    const auto by = values_by_label(c, 5);
    const double liver = median(by[1]);
    CHECK(median(by[3]) > 1.5 * liver);
    CHECK(median(by[4]) > liver);
    CHECK(c.image.data.at({0, 0, 0, 0}) < 0.25 * liver);
  }
}

TEST_CASE("phantoms: downstream_ct has the MR task's patients and lesions in CT, tumours hypodense") {
  for (int ci = 0; ci < 2; ++ci) {
    const PhantomCase& mr = cached_case(PhantomTask::downstream, {48, 96, 96}, ci);
    const PhantomCase& ct = cached_case(PhantomTask::downstream_ct, {48, 96, 96}, ci);
    CHECK(same_bytes(mr.label.data, ct.label.data));  // same anatomy, lesions and scan geometry
    CHECK(mr.image.affine == ct.image.affine);
    CHECK(ct.name == fmt::format("downstream_ct_{:04d}", ci));
    const auto by = values_by_label(ct, 5);
    const double liver = median(by[1]);
    CHECK(liver > 40);  // Hounsfield units: enhanced parenchyma
    CHECK(liver < 130);
    CHECK(median(by[3]) < liver - 10);  // liver tumours hypodense, as metastases in portal-venous CT
    CHECK(ct.image.data.at({0, 0, 0, 0}) < -900);  // air
  }
  CHECK(data::parse_phantom_task("downstream_ct") == PhantomTask::downstream_ct);
  CHECK(data::phantom_modality(PhantomTask::downstream_ct) == "CT");
  CHECK_THROWS_WITH_AS(data::parse_phantom_task("ct"), doctest::Contains("downstream_ct"), Error);
}

TEST_CASE("phantoms: spacing varies per case and is anisotropic, sizes and geometry are as requested") {
  std::vector<double> sz, sxy;
  for (int i = 0; i < 6; ++i) {
    const PhantomCase c = data::generate_phantom(PhantomTask::pretrain, {32, 64, 64}, 11, i);
    CHECK(c.image.data.shape() == Shape{1, 32, 64, 64});
    CHECK(c.label.data.shape() == Shape{1, 32, 64, 64});
    CHECK(c.image.data.dtype() == DType::f32);
    CHECK(c.label.data.dtype() == DType::u8);
    const auto& s = c.image.spacing;
    CHECK(s[1] == s[2]);
    CHECK(s[0] > 1.2 * s[1]);                           // thicker slices than in-plane voxels
    CHECK((s[0] * 32 >= 330 && s[0] * 32 <= 410));      // the trunk's z coverage in mm
    CHECK((s[1] * 64 >= 0.7 * 512 && s[1] * 64 <= 560));  // a scanner's field of view
    const auto& a = c.image.affine;
    CHECK(a[0][0] == doctest::Approx(-s[2]));
    CHECK(a[1][1] == doctest::Approx(-s[1]));
    CHECK(a[2][2] == doctest::Approx(s[0]));
    CHECK(a[0][1] == 0);
    CHECK(a[1][2] == 0);
    CHECK(a[3][3] == 1);
    CHECK(c.label.spacing == c.image.spacing);
    CHECK(c.label.affine == c.image.affine);
    for (double v : c.image.data.to_vector<double>()) {
      if (v != std::nearbyint(v) || v < -1024 || v > 3071) {
        FAIL_CHECK("value " << v << " is not a whole HU in [-1024, 3071]");
        break;
      }
    }
    sz.push_back(s[0]);
    sxy.push_back(s[1]);
  }
  CHECK(*std::max_element(sz.begin(), sz.end()) > 1.05 * *std::min_element(sz.begin(), sz.end()));
  CHECK(*std::max_element(sxy.begin(), sxy.end()) > 1.05 * *std::min_element(sxy.begin(), sxy.end()));
  CHECK(std::set<double>(sz.begin(), sz.end()).size() == sz.size());
  const PhantomCase odd = data::generate_phantom(PhantomTask::downstream, {9, 20, 33}, 0, 0);
  CHECK(odd.image.data.shape() == Shape{1, 9, 20, 33});
}

TEST_CASE("phantoms: the same case at two resolutions is the same patient") {
  // Liver volume (mL) and centre (world mm) from the label map and affine.
  auto liver = [](const PhantomCase& c) {
    const auto lab = c.label.data.to_vector<std::int64_t>();
    const auto sh = c.label.spatial_shape();
    const auto& a = c.label.affine;
    double n = 0, cx = 0, cy = 0, cz = 0;
    for (std::int64_t k = 0; k < sh[0]; ++k)
      for (std::int64_t j = 0; j < sh[1]; ++j)
        for (std::int64_t i = 0; i < sh[2]; ++i) {
          if (lab[static_cast<std::size_t>((k * sh[1] + j) * sh[2] + i)] != 5) continue;
          const double v[3] = {static_cast<double>(i), static_cast<double>(j), static_cast<double>(k)};
          n += 1;
          cx += a[0][0] * v[0] + a[0][1] * v[1] + a[0][2] * v[2] + a[0][3];
          cy += a[1][0] * v[0] + a[1][1] * v[1] + a[1][2] * v[2] + a[1][3];
          cz += a[2][0] * v[0] + a[2][1] * v[1] + a[2][2] * v[2] + a[2][3];
        }
    const double ml = n * c.label.spacing[0] * c.label.spacing[1] * c.label.spacing[2] / 1000.0;
    return std::array<double, 4>{ml, cx / n, cy / n, cz / n};
  };
  for (int i = 0; i < 2; ++i) {
    const auto lo = liver(data::generate_phantom(PhantomTask::pretrain, {32, 64, 64}, 0, i));
    const auto hi = liver(data::generate_phantom(PhantomTask::pretrain, {64, 128, 128}, 0, i));
    MESSAGE("case " << i << ": liver " << lo[0] << " mL at 64^2 vs " << hi[0] << " mL at 128^2");
    CHECK((hi[0] > 700 && hi[0] < 3500));  // an adult liver
    CHECK(std::abs(lo[0] - hi[0]) < 0.08 * hi[0]);
    CHECK(std::hypot(lo[1] - hi[1], lo[2] - hi[2], lo[3] - hi[3]) < 8.0);
  }
}

TEST_CASE("phantoms: bad arguments throw before allocating") {
  CHECK_THROWS_AS(data::generate_phantom(PhantomTask::pretrain, {4, 64, 64}, 0, 0), Error);
  CHECK_THROWS_AS(data::generate_phantom(PhantomTask::pretrain, {32, 2000, 64}, 0, 0), Error);
  CHECK_THROWS_WITH_AS(data::generate_phantom(PhantomTask::pretrain, {1024, 1024, 1024}, 0, 0),
                       doctest::Contains("2^27"), Error);
  CHECK_THROWS_AS(data::generate_phantom(PhantomTask::pretrain, {32, 64, 64}, 0, -1), Error);
  CHECK_THROWS_WITH_AS(data::parse_phantom_task("ct"), doctest::Contains("'ct'"), Error);
  CHECK(data::parse_phantom_task("downstream") == PhantomTask::downstream);
  TempDir dir("phantoms_bad");
  data::PhantomOptions o;
  o.cases = 0;
  CHECK_THROWS_AS(data::write_phantom_dataset(dir.path / "a", o), Error);
  CHECK_FALSE(std::filesystem::exists(dir.path / "a"));
  o.cases = 1;
  o.size = {16, 32, 32};
  std::ofstream(dir.path / "file") << "x";
  CHECK_THROWS_WITH_AS(data::write_phantom_dataset(dir.path / "file" / "ds", o), doctest::Contains("file"), Error);
}

TEST_CASE("phantoms: write_phantom_dataset writes an nnU-Net v2 raw dataset that reads back exactly") {
  TempDir dir("phantoms_ds");
  for (PhantomTask task : {PhantomTask::pretrain, PhantomTask::downstream, PhantomTask::downstream_ct}) {
    data::PhantomOptions o;
    o.task = task;
    o.cases = 2;
    o.size = {16, 32, 40};
    o.seed = 5;
    const auto folder = dir.path / std::string(data::phantom_task_name(task));
    std::vector<std::string> seen;
    data::write_phantom_dataset(folder, o, [&](const PhantomCase& c) { seen.push_back(c.name); });
    const std::string prefix(data::phantom_task_name(task));
    CHECK(seen == std::vector<std::string>{prefix + "_0000", prefix + "_0001"});

    std::ifstream in(folder / "dataset.json");
    const auto ds = nlohmann::json::parse(in);
    CHECK(ds["channel_names"]["0"] == (task == PhantomTask::downstream ? "MR" : "CT"));
    CHECK(ds["numTraining"] == 2);
    CHECK(ds["file_ending"] == ".nii.gz");
    CHECK(ds["reference"] == "stunet synthetic phantoms");
    CHECK(ds.contains("licence"));
    CHECK(ds.contains("name"));
    CHECK(ds.contains("description"));
    const auto names = data::phantom_labels(task);
    CHECK(ds["labels"].size() == names.size());
    for (std::size_t l = 0; l < names.size(); ++l) CHECK(ds["labels"][names[l]] == l);

    for (int i = 0; i < 2; ++i) {
      const PhantomCase c = data::generate_phantom(task, o.size, o.seed, i);
      const auto img_path = folder / "imagesTr" / (c.name + "_0000.nii.gz");
      const auto lab_path = folder / "labelsTr" / (c.name + ".nii.gz");
      REQUIRE(std::filesystem::exists(img_path));
      REQUIRE(std::filesystem::exists(lab_path));
      const io::NiftiHeader h = io::read_nifti_header(img_path);
      CHECK(h.datatype == io::NiftiDType::i16);
      CHECK(h.sform_code == 1);
      CHECK(io::read_nifti_header(lab_path).datatype == io::NiftiDType::u8);
      const data::Image img = io::read_image(img_path);
      const data::Image lab = io::read_image(lab_path);
      CHECK(testing::max_abs_diff(img.data, c.image.data) == 0);
      CHECK(testing::max_abs_diff(lab.data, c.label.data) == 0);
      for (int r = 0; r < 3; ++r) {
        CHECK(img.spacing[r] == doctest::Approx(c.image.spacing[r]).epsilon(1e-6));
        for (int k = 0; k < 4; ++k) CHECK(img.affine[r][k] == doctest::Approx(c.image.affine[r][k]).epsilon(1e-6));
      }
      CHECK(io::aff2axcodes(img.affine) == "LPS");
    }
  }
}

// ---------------------------------------------------------------------------
// PNG

TEST_CASE("png: the writer produces a valid PNG with the right header and pixels") {
  TempDir dir("png");
  for (int channels : {1, 3}) {
    const std::int64_t w = 5, h = 3;
    io::Bitmap b = io::Bitmap::filled(w, h, channels);
    for (std::size_t i = 0; i < b.pixels.size(); ++i) b.pixels[i] = static_cast<std::uint8_t>(i * 37 % 256);
    const auto path = dir.path / fmt::format("t{}.png", channels);
    io::write_png(path, b);
    CHECK_FALSE(std::filesystem::exists(path.string() + ".tmp"));
    const auto bytes = read_bytes(path);
    REQUIRE(bytes.size() > 33);
    const unsigned char signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    CHECK(std::memcmp(bytes.data(), signature, 8) == 0);
    CHECK(big_endian_u32(&bytes[8]) == 13);  // IHDR is the first chunk, 13 bytes
    CHECK(std::memcmp(&bytes[12], "IHDR", 4) == 0);
    CHECK(big_endian_u32(&bytes[16]) == w);
    CHECK(big_endian_u32(&bytes[20]) == h);
    CHECK(bytes[24] == 8);                        // bit depth
    CHECK(bytes[25] == (channels == 1 ? 0 : 2));  // colour type: gray / RGB

    // Decode with libpng and compare every byte.
    png_image img;
    std::memset(&img, 0, sizeof img);
    img.version = PNG_IMAGE_VERSION;
    REQUIRE(png_image_begin_read_from_file(&img, path.c_str()) != 0);
    img.format = channels == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
    std::vector<std::uint8_t> decoded(PNG_IMAGE_SIZE(img));
    REQUIRE(png_image_finish_read(&img, nullptr, decoded.data(), 0, nullptr) != 0);
    CHECK(decoded == b.pixels);
  }
  io::Bitmap bad = io::Bitmap::filled(4, 4, 3);
  bad.pixels.pop_back();
  CHECK_THROWS_AS(io::write_png(dir.path / "bad.png", bad), Error);
  CHECK_THROWS_AS(io::write_png(dir.path / "bad.png", std::span<const std::uint8_t>(), 0, 4, 3), Error);
  CHECK_THROWS_AS(io::Bitmap::filled(2, 2, 2), Error);
  CHECK_THROWS_WITH_AS(io::write_png(dir.path / "missing" / "x.png", io::Bitmap::filled(2, 2, 1)),
                       doctest::Contains("missing"), Error);
  CHECK_FALSE(std::filesystem::exists(dir.path / "bad.png"));
}

// ---------------------------------------------------------------------------
// Previews

TEST_CASE("preview: label colours are drawn exactly where the label is, in radiological orientation") {
  const std::int64_t D = 3, H = 4, W = 5;
  std::vector<float> v(static_cast<std::size_t>(D * H * W));
  std::vector<std::uint8_t> l(v.size(), 0);
  for (std::int64_t d = 0; d < D; ++d)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t w = 0; w < W; ++w) {
        const auto i = static_cast<std::size_t>((d * H + h) * W + w);
        v[i] = static_cast<float>(d * 20 + h * 5 + w) / 100.0f;
        if (h >= 1 && h <= 2 && w >= 3) l[i] = 3;
        if (h == 0 && w == 0) l[i] = 7;
      }
  data::Image img, lab;
  img.data = Tensor::from_vector<float>(v, {1, D, H, W});
  lab.data = Tensor::from_vector<std::uint8_t>(l, {1, D, H, W});
  io::PreviewOptions o;
  o.index = 1;
  o.window = io::Window{0.5, 1.0};  // value v -> gray 255 v
  o.alpha = 0.5;
  o.contours = false;
  o.min_width = 0;
  for (bool lps : {false, true}) {
    // Identity affine: i runs to the patient's right, j anterior: both flip.
    // LPS-like diag(-1, -1, 1): voxel order is already radiological.
    const data::Affine a = lps ? data::Affine{{{-1, 0, 0, 0}, {0, -1, 0, 0}, {0, 0, 1, 0}, {0, 0, 0, 1}}}
                               : data::identity_affine();
    img.affine = lab.affine = a;
    const io::Bitmap b = io::render_slice(img, &lab, o);
    REQUIRE(b.width == W);
    REQUIRE(b.height == H);
    for (std::int64_t y = 0; y < H; ++y)
      for (std::int64_t x = 0; x < W; ++x) {
        const std::int64_t h = lps ? y : H - 1 - y, w = lps ? x : W - 1 - x;
        const auto i = static_cast<std::size_t>((1 * H + h) * W + w);
        const double gray = std::round(255.0 * v[i]);
        const std::uint8_t* px = b.at(x, y);
        for (int c = 0; c < 3; ++c) {
          const double want =
              l[i] == 0 ? gray : std::round(0.5 * gray + 0.5 * io::label_color(l[i])[static_cast<std::size_t>(c)]);
          CHECK_MESSAGE(std::abs(px[c] - want) <= 1, "pixel (" << x << ", " << y << ") channel " << c << ": "
                                                               << int(px[c]) << " vs " << want);
        }
      }
  }
  // Coronal with 2 mm slices: twice as tall as deep, superior (last d) on top.
  img.spacing = lab.spacing = {2.0, 1.0, 1.0};
  img.affine = lab.affine = data::Affine{{{-1, 0, 0, 0}, {0, -1, 0, 0}, {0, 0, 2, 0}, {0, 0, 0, 1}}};
  o.axis = io::SliceAxis::coronal;
  o.index = 2;
  const io::Bitmap cor = io::render_slice(img, nullptr, o);
  REQUIRE(cor.width == W);
  REQUIRE(cor.height == 2 * D);
  for (std::int64_t x = 0; x < W; ++x) {
    CHECK(cor.at(x, 0)[0] == std::lround(255.0 * v[static_cast<std::size_t>(((D - 1) * H + 2) * W + x)]));
    CHECK(cor.at(x, 2 * D - 1)[0] == std::lround(255.0 * v[static_cast<std::size_t>((0 * H + 2) * W + x)]));
  }
  // Three panels side by side with 4-pixel gaps.
  const io::Bitmap cmp = io::render_comparison(img, &lab, &lab, o);
  CHECK(cmp.width == 3 * W + 2 * 4);
  CHECK_THROWS_AS(io::render_slice(img, &lab, [&] {
                    io::PreviewOptions bad = o;
                    bad.index = 99;
                    return bad;
                  }()),
                  Error);
}

TEST_CASE("preview: palette colours are distinct and percentile windows span the data") {
  for (int a = 1; a <= 20; ++a)
    for (int b = a + 1; b <= 20; ++b) {
      const auto ca = io::label_color(a), cb = io::label_color(b);
      int dist = 0;
      for (int c = 0; c < 3; ++c) dist += std::abs(int(ca[static_cast<std::size_t>(c)]) - int(cb[static_cast<std::size_t>(c)]));
      CHECK_MESSAGE(dist >= 40, "labels " << a << " and " << b << " look alike");
    }
  CHECK(io::label_color(105) == io::label_color(105));  // beyond the palette: still defined and stable
  std::vector<float> ramp(1000);
  for (std::size_t i = 0; i < ramp.size(); ++i) ramp[i] = static_cast<float>(i);
  const io::Window w = io::percentile_window(Tensor::from_vector<float>(ramp, {1, 10, 10, 10}), 1, 99);
  CHECK(w.center == doctest::Approx(499.5).epsilon(0.01));
  CHECK(w.width == doctest::Approx(979).epsilon(0.01));
}

TEST_CASE("preview: a phantom's liver covers as many preview pixels as its voxels' area") {
  const PhantomCase& c = cached_case(PhantomTask::pretrain, {48, 96, 96}, 0);
  io::PreviewOptions o;
  o.window = io::kCtSoftTissue;
  o.contours = false;
  o.alpha = 1.0;  // labelled pixels show the pure class colour
  const io::Bitmap b = io::render_slice(c.image, &c.label, o);
  REQUIRE(b.width == 256);
  const auto liver = io::label_color(5);
  std::int64_t pixels = 0;
  for (std::int64_t y = 0; y < b.height; ++y)
    for (std::int64_t x = 0; x < b.width; ++x)
      if (std::equal(liver.begin(), liver.end(), b.at(x, y))) ++pixels;
  std::int64_t voxels = 0;
  for (std::int64_t h = 0; h < 96; ++h)
    for (std::int64_t w = 0; w < 96; ++w) voxels += c.label.data.at({0, 24, h, w}) == 5;
  REQUIRE(voxels > 100);
  const double per_voxel = (256.0 / 96) * (256.0 / 96);  // square voxels, 96 -> 256 pixels
  CHECK(static_cast<double>(pixels) == doctest::Approx(static_cast<double>(voxels) * per_voxel).epsilon(0.05));
}
