#pragma once
/// \file
/// Synthetic CT (and MR-like) phantoms of the trunk: stunet's embedded
/// default data, written as an nnU-Net v2 raw dataset.
///
/// A case is a patient built in a continuous frame (millimetres; +x patient
/// left, +y posterior, +z superior, z = 0 at the right diaphragm dome):
/// body with skin, subcutaneous fat and muscle wall, a spine of vertebrae
/// and discs with ribs, lungs above the diaphragm around the heart, and the
/// abdominal organs as ellipsoids deformed by smooth gradient noise, with
/// per-case scale, position and orientation. The patient is then placed in a
/// scanner field of view whose spacing varies per case and sampled at the
/// voxel centres of the requested grid, so the same (seed, case) at 64^3 or
/// 256^3 is the same patient at another resolution. Intensities come from a
/// per-tissue table (CT: Hounsfield-like, with a random contrast phase; MR:
/// a T2-like mapping that is tissue-dependent and not monotonic in HU, with
/// a bias field and Rician noise), plus smooth texture, blur and noise.
///
/// Tasks: `pretrain` (CT, 18 anatomical classes), `downstream` (MR-like,
/// liver, kidney, liver tumours and kidney tumours: new targets and another
/// contrast on the same anatomy) and `downstream_ct` (the same new targets
/// in CT, as the paper's CT lesion sets: FLARE, KiTS, LiTS). The two
/// downstream tasks draw the same patients and lesions for the same seed.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numbers>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "stunet/core/error.hpp"
#include "stunet/core/parallel.hpp"
#include "stunet/core/rng.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/data/image.hpp"
#include "stunet/io/nifti.hpp"

namespace stunet::data {

/// Which synthetic dataset: many-class CT pretraining, or a shifted
/// fine-tuning task with lesion targets, in an MR-like contrast or in CT.
enum class PhantomTask { pretrain, downstream, downstream_ct };

/// What write_phantom_dataset produces.
struct PhantomOptions {
  PhantomTask task = PhantomTask::pretrain;
  int cases = 10;                                 ///< number of training cases (>= 1)
  std::array<std::int64_t, 3> size{32, 64, 64};   ///< voxel grid (D, H, W), each 8..1024
  std::uint64_t seed = 0;                         ///< dataset seed; case i depends on (seed, i) only
};

/// One generated case.
struct PhantomCase {
  Image image;       ///< data [1, D, H, W] f32 holding whole numbers (CT: HU, MR: arbitrary units); int16 on disk
  Image label;       ///< data [1, D, H, W] u8, values index phantom_labels(task)
  std::string name;  ///< case identifier, e.g. "pretrain_0003"
};

/// "pretrain", "downstream" or "downstream_ct".
inline std::string_view phantom_task_name(PhantomTask task) {
  return task == PhantomTask::pretrain ? "pretrain" : task == PhantomTask::downstream ? "downstream" : "downstream_ct";
}

/// Parses "pretrain" / "downstream" / "downstream_ct"; throws stunet::Error
/// naming the text otherwise.
inline PhantomTask parse_phantom_task(std::string_view text) {
  if (text == "pretrain") return PhantomTask::pretrain;
  if (text == "downstream") return PhantomTask::downstream;
  if (text == "downstream_ct") return PhantomTask::downstream_ct;
  STUNET_FAIL("unknown phantom task '{}' (expected 'pretrain', 'downstream' or 'downstream_ct')", text);
}

/// The imaging modality of a task, as nnU-Net's channel name: "CT" or "MR".
inline std::string_view phantom_modality(PhantomTask task) { return task == PhantomTask::downstream ? "MR" : "CT"; }

/// Class names of a task; index = label value, index 0 is "background".
inline std::vector<std::string> phantom_labels(PhantomTask task) {
  if (task == PhantomTask::pretrain)
    return {"background", "spleen",   "kidney_right", "kidney_left", "gallbladder", "liver",
            "stomach",    "pancreas", "aorta",        "inferior_vena_cava", "lung_right", "lung_left",
            "heart",      "colon",    "vertebrae",    "intervertebral_discs", "ribs", "autochthon_right",
            "autochthon_left"};
  return {"background", "liver", "kidney", "liver_tumour", "kidney_tumour"};
}

namespace phantom_detail {

// ---------------------------------------------------------------------------
// Small geometry helpers.

struct Vec3 {
  double x = 0, y = 0, z = 0;
};
inline Vec3 operator+(Vec3 a, Vec3 b) { return {a.x + b.x, a.y + b.y, a.z + b.z}; }
inline Vec3 operator-(Vec3 a, Vec3 b) { return {a.x - b.x, a.y - b.y, a.z - b.z}; }
inline Vec3 operator*(Vec3 a, double s) { return {a.x * s, a.y * s, a.z * s}; }

inline double sq(double x) { return x * x; }
inline double clamp01(double x) { return x < 0 ? 0 : (x > 1 ? 1 : x); }
/// 0 below e0, 1 above e1 (e0 > e1 allowed: then it falls), C1 in between.
inline double smoothstep(double e0, double e1, double x) {
  const double t = clamp01((x - e0) / (e1 - e0));
  return t * t * (3 - 2 * t);
}
inline double deg(double degrees) { return degrees * std::numbers::pi / 180.0; }

/// Row-major 3x3 matrix (rotations).
struct Mat3 {
  std::array<double, 9> m{1, 0, 0, 0, 1, 0, 0, 0, 1};
  Vec3 apply(Vec3 v) const {
    return {m[0] * v.x + m[1] * v.y + m[2] * v.z, m[3] * v.x + m[4] * v.y + m[5] * v.z,
            m[6] * v.x + m[7] * v.y + m[8] * v.z};
  }
  Mat3 transposed() const { return {{m[0], m[3], m[6], m[1], m[4], m[7], m[2], m[5], m[8]}}; }
};
inline Mat3 operator*(const Mat3& a, const Mat3& b) {
  Mat3 r;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) r.m[i * 3 + j] = a.m[i * 3] * b.m[j] + a.m[i * 3 + 1] * b.m[3 + j] + a.m[i * 3 + 2] * b.m[6 + j];
  return r;
}
/// Rotation Rz(az) * Ry(ay) * Rx(ax) (radians).
inline Mat3 rotation_xyz(double ax, double ay, double az) {
  const double cx = std::cos(ax), sx = std::sin(ax), cy = std::cos(ay), sy = std::sin(ay), cz = std::cos(az),
               sz = std::sin(az);
  const Mat3 rx{{1, 0, 0, 0, cx, -sx, 0, sx, cx}};
  const Mat3 ry{{cy, 0, sy, 0, 1, 0, -sy, 0, cy}};
  const Mat3 rz{{cz, -sz, 0, sz, cz, 0, 0, 0, 1}};
  return rz * ry * rx;
}

/// splitmix64: decorrelates (seed, task, index) into one engine seed, so
/// neighbouring seeds and indices give unrelated cases.
inline std::uint64_t mix_seed(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// ---------------------------------------------------------------------------
// Smooth random fields.

/// Ken Perlin's improved gradient noise on a 256-periodic lattice whose
/// permutation is drawn from the case generator. Gradient noise (rather than
/// value noise) has no lattice-aligned variance, so thresholded patterns
/// (bowel loops, vessels) do not look like a grid.
class GradientNoise {
 public:
  explicit GradientNoise(Generator& g) {
    std::array<int, 256> p;
    std::iota(p.begin(), p.end(), 0);
    for (int i = 255; i > 0; --i) std::swap(p[i], p[g.uniform_int(static_cast<std::uint64_t>(i) + 1)]);
    for (int i = 0; i < 512; ++i) perm_[i] = p[i & 255];
  }
  /// Noise at lattice coordinates; within [-1, 1], standard deviation ~0.27.
  double operator()(double x, double y, double z) const {
    // Inline floor: std::floor is a libm call on baseline x86-64.
    const double fx = fast_floor(x), fy = fast_floor(y), fz = fast_floor(z);
    const int X = static_cast<int>(fx) & 255, Y = static_cast<int>(fy) & 255, Z = static_cast<int>(fz) & 255;
    x -= fx;
    y -= fy;
    z -= fz;
    const double u = fade(x), v = fade(y), w = fade(z);
    const int A = perm_[X] + Y, AA = perm_[A] + Z, AB = perm_[A + 1] + Z;
    const int B = perm_[X + 1] + Y, BA = perm_[B] + Z, BB = perm_[B + 1] + Z;
    const double x1 = lerp(u, grad(perm_[AA], x, y, z), grad(perm_[BA], x - 1, y, z));
    const double x2 = lerp(u, grad(perm_[AB], x, y - 1, z), grad(perm_[BB], x - 1, y - 1, z));
    const double x3 = lerp(u, grad(perm_[AA + 1], x, y, z - 1), grad(perm_[BA + 1], x - 1, y, z - 1));
    const double x4 = lerp(u, grad(perm_[AB + 1], x, y - 1, z - 1), grad(perm_[BB + 1], x - 1, y - 1, z - 1));
    return lerp(w, lerp(v, x1, x2), lerp(v, x3, x4));
  }

 private:
  static double fast_floor(double v) {
    const double t = static_cast<double>(static_cast<std::int64_t>(v));
    return t > v ? t - 1.0 : t;
  }
  static double fade(double t) { return t * t * t * (t * (t * 6 - 15) + 10); }
  static double lerp(double t, double a, double b) { return a + t * (b - a); }
  static double grad(int hash, double x, double y, double z) {
    const int h = hash & 15;
    const double u = h < 8 ? x : y;
    const double v = h < 4 ? y : (h == 12 || h == 14 ? x : z);
    return ((h & 1) ? -u : u) + ((h & 2) ? -v : v);
  }
  std::array<int, 512> perm_{};
};

/// A field in millimetres: the case's gradient noise at p / cell + offset,
/// scaled to about unit standard deviation. Distinct offsets make the
/// fields of one case independent.
struct Field {
  double inv_cell = 1;
  Vec3 offset;
  static Field make(Generator& g, double cell_mm) {
    return {1.0 / cell_mm, {g.uniform(0, 256), g.uniform(0, 256), g.uniform(0, 256)}};
  }
  double at(const GradientNoise& n, Vec3 p) const {
    return n(p.x * inv_cell + offset.x, p.y * inv_cell + offset.y, p.z * inv_cell + offset.z) * (1.0 / 0.27);
  }
};

// ---------------------------------------------------------------------------
// Tissues and structures.

/// What a point is made of: selects its intensity in each modality.
enum class Tissue : std::uint8_t {
  air, table_shell, table_foam, lung, lung_vessel, skin, fat, muscle, cortical_bone, marrow, disc, csf, cord,
  liver, liver_vessel, spleen, kidney_cortex, kidney_medulla, artery, vein, myocardium, heart_blood, stomach_wall,
  fluid, gas, bile, pancreas, bowel_wall, bowel_content, colon_wall, stool, liver_tumour, kidney_tumour,
  tumour_necrosis, count
};
inline constexpr int kTissues = static_cast<int>(Tissue::count);

/// Which labelled structure a point belongs to; values 1..18 are the
/// pretraining labels, the tumours exist only in the downstream task.
enum class Organ : std::uint8_t {
  none, spleen, kidney_right, kidney_left, gallbladder, liver, stomach, pancreas, aorta, ivc, lung_right, lung_left,
  heart, colon, vertebrae, discs, ribs, autochthon_right, autochthon_left, liver_tumour, kidney_tumour, count
};
inline constexpr int kOrgans = static_cast<int>(Organ::count);

/// Label value of each Organ in a task's label map.
inline std::array<std::uint8_t, kOrgans> label_of_organ(PhantomTask task) {
  std::array<std::uint8_t, kOrgans> map{};
  if (task == PhantomTask::pretrain) {
    for (int o = 1; o <= static_cast<int>(Organ::autochthon_left); ++o) map[o] = static_cast<std::uint8_t>(o);
  } else {
    map[static_cast<int>(Organ::liver)] = 1;
    map[static_cast<int>(Organ::kidney_right)] = 2;
    map[static_cast<int>(Organ::kidney_left)] = 2;
    map[static_cast<int>(Organ::liver_tumour)] = 3;
    map[static_cast<int>(Organ::kidney_tumour)] = 4;
  }
  return map;
}

/// Per-tissue intensity: CT HU = ct + ct_enh * contrast phase, MR in
/// arbitrary units (T2-like: fat and fluid bright, flowing blood, air and
/// cortical bone dark); texture amplitudes in the same units.
struct TissueLook {
  double ct, ct_enh, ct_tex, mr, mr_tex;
};
inline const std::array<TissueLook, kTissues>& tissue_looks() {
  static const std::array<TissueLook, kTissues> looks{{
      {-1000, 0, 0, 0, 0},        // air
      {180, 0, 20, 0, 0},         // table_shell
      {-600, 0, 10, 0, 0},        // table_foam
      {-860, 0, 25, 15, 8},       // lung
      {30, 80, 20, 70, 20},       // lung_vessel
      {35, 0, 8, 260, 25},        // skin
      {-100, 0, 10, 760, 40},     // fat
      {48, 8, 8, 160, 18},        // muscle
      {850, 0, 90, 15, 8},        // cortical_bone
      {250, 0, 45, 480, 45},      // marrow
      {85, 0, 10, 560, 40},       // disc
      {8, 0, 4, 1100, 40},        // csf
      {32, 0, 4, 420, 25},        // cord
      {58, 55, 6, 230, 18},       // liver
      {40, 150, 10, 70, 20},      // liver_vessel (portal/hepatic veins; flow voids on T2)
      {48, 75, 7, 470, 28},       // spleen
      {32, 160, 10, 520, 30},     // kidney_cortex
      {30, 90, 10, 660, 35},      // kidney_medulla
      {42, 190, 8, 45, 15},       // artery
      {42, 130, 8, 95, 20},       // vein
      {45, 55, 8, 210, 20},       // myocardium
      {42, 175, 8, 65, 20},       // heart_blood
      {42, 45, 8, 300, 25},       // stomach_wall
      {12, 0, 6, 1050, 50},       // fluid
      {-1000, 0, 15, 0, 0},       // gas
      {10, 0, 4, 1000, 40},       // bile
      {42, 70, 14, 330, 35},      // pancreas
      {38, 50, 10, 330, 30},      // bowel_wall
      {18, 0, 10, 820, 60},       // bowel_content
      {40, 40, 8, 300, 25},       // colon_wall
      {-120, 0, 140, 350, 120},   // stool
      {30, 25, 10, 690, 45},      // liver_tumour (hypodense CT, T2 bright)
      {38, 75, 22, 560, 70},      // kidney_tumour
      {15, 5, 8, 950, 60},        // tumour_necrosis
  }};
  return looks;
}

/// A point's content.
struct Sample {
  Organ organ = Organ::none;
  Tissue tissue = Tissue::air;
};

/// An ellipsoid deformed by smooth noise and sheared along z: inside where
/// the normalised radius |to_local (a - c(z)) / axes| + amp * field(a) < 1,
/// with c(z) = centre + shear * (z - centre.z) (e.g. the liver's right lobe
/// tapering to a lateral tip).
struct Blob {
  Vec3 centre;
  Vec3 shear;
  Mat3 to_local;
  Vec3 inv_axes;
  double amp = 0.08;
  Field field;
  Vec3 lo, hi;  // axis-aligned bounds, for a cheap rejection
};

/// A lesion: a noisy sphere inside its host organ.
struct Lesion {
  Vec3 centre;
  double radius = 10;
  Organ host = Organ::liver;  // liver, kidney_right or kidney_left
  Field field;
};

/// Vertebra z extents, bottom (L5) first; the disc above body i spans
/// [body_hi[i], body_lo[i + 1]].
struct Spine {
  std::vector<double> body_lo, body_hi;
  std::vector<int> thoracic_number;  // 1..12 for thoracic bodies, 0 for lumbar
};

// ---------------------------------------------------------------------------
// The patient model.

/// One synthetic patient and its scan: anatomy, placement in the scanner,
/// spacing and intensity model, all drawn from one generator in a fixed
/// order (so a case depends only on its seed).
class PatientModel {
 public:
  PatientModel(PhantomTask task, std::uint64_t case_seed)
      : task_(task), rng_(case_seed), noise_(rng_) {
    draw_fields();
    draw_body();
    draw_spine();
    draw_organs();
    if (task_ != PhantomTask::pretrain) draw_lesions();
    draw_scan();
    draw_intensities();
    build_deformation();
  }

  PhantomTask task() const { return task_; }

  /// Content of a point in the anatomy frame (mm).
  Sample classify(const Vec3& a) const {
    const double x = a.x, y = a.y, z = a.z;
    // Body outline: an ellipse, flatter at the back, with a noisy rim.
    const double hw = half_width(z);
    const double by = y < 0 ? b_ant_ * (z < 0 ? belly_ : 1.0) : b_post_;
    const double u = x / hw, v = y / by;
    double rho = std::sqrt(u * u + v * v);
    if (y > 0) rho = 0.5 * (rho + std::sqrt(std::sqrt(u * u * u * u + v * v * v * v)));
    if (rho > 0.7) rho *= 1.0 - 0.018 * body_field_.at(noise_, a);
    if (rho >= 1.0) return {};
    const double r = std::sqrt(x * x + y * y);
    const double depth = (1.0 - rho) * (r / std::max(rho, 1e-6));
    const double sin_t = r > 1e-9 ? y / r : 0.0, cos_t = r > 1e-9 ? x / r : 1.0;

    constexpr double skin = 2.5;
    if (depth < skin) return {Organ::none, Tissue::skin};
    const double fat0 = fat_factor_ * (8.0 + 14.0 * std::max(0.0, -sin_t) + 7.0 * cos_t * cos_t) * (z > 0 ? 0.8 : 1.0);
    // The fat noise (+-25%, clamped) only matters near the fat's inner edge.
    const double fat = depth < skin + 1.7 * fat0
                           ? fat0 * (1.0 + 0.25 * std::clamp(fat_field_.at(noise_, a), -2.5, 2.5))
                           : fat0 * 1.7;
    if (depth < skin + fat) return {Organ::none, Tissue::fat};

    const double yc = spine_y(z);
    if (std::abs(x) < 75 && y > yc - 40) {
      Sample s = classify_spine(a, yc);
      if (s.tissue != Tissue::air) return s;
      s = classify_autochthon(a, yc);
      if (s.tissue != Tissue::air) return s;
    }
    if (z < iliac_crest_ + 10) {
      Sample s = classify_iliac(a, yc);
      if (s.tissue != Tissue::air) return s;
    }
    const double sp = std::max(0.0, sin_t), sp2 = sp * sp, sp4 = sp2 * sp2, sin8 = sp4 * sp4;
    const double wall = muscle_factor_ * (10.0 + 4.0 * cos_t * cos_t) + 24.0 * sin8 +
                        26.0 * smoothstep(iliac_crest_, iliac_crest_ - 70, z) * (1.0 - std::abs(sin_t));
    if (depth < skin + fat + wall) {
      if (z > ribs_bottom_) {
        const double rib_depth = depth - (skin + fat + 2.0 + 0.35 * wall);
        Sample s = classify_ribs(a, sin_t, cos_t, rib_depth);
        if (s.tissue != Tissue::air) return s;
      }
      return {Organ::none, Tissue::muscle};
    }
    return classify_cavity(a, yc);
  }

  /// Content of a point of the scanner frame (mm): the table, or the
  /// patient after the rigid placement, the smooth deformation and the
  /// body scale.
  Sample sample_scanner(const Vec3& s, Vec3* anatomy_point) const {
    const Vec3 p = to_patient_.apply(s - shift_) + deformation(s);
    const Vec3 a{p.x * inv_scale_.x, p.y * inv_scale_.y, p.z * inv_scale_.z};
    *anatomy_point = a;
    Sample smp = classify(a);
    if (smp.tissue == Tissue::air && modality_ct_) {
      // The CT table: a curved carbon-fibre shell with a foam core.
      const double top = table_y_ - 0.0011 * s.x * s.x;
      if (std::abs(s.x) < 220 && s.y > top && s.y < top + 36) {
        const double d1 = s.y - top, d2 = top + 36 - s.y;
        smp.tissue = (d1 < 5 || d2 < 5) ? Tissue::table_shell : Tissue::table_foam;
      }
    }
    return smp;
  }

  /// Intensity of a tissue at an anatomy point (before blur and noise).
  double intensity(Tissue t, const Vec3& a) const {
    const int i = static_cast<int>(t);
    if (tex_amp_[i] == 0.0) return base_[i];
    const double tex = 0.8 * tex_coarse_.at(noise_, a) + 0.5 * tex_fine_.at(noise_, a);
    return base_[i] + tex_amp_[i] * tex;
  }

  /// MR receive-coil bias (multiplicative, ~0.75..1.3) at an anatomy point.
  double bias(const Vec3& a) const {
    return std::max(0.3, 1.0 + bias_amp_ * bias_field_.at(noise_, a) + bias_grad_.x * a.x * 1e-3 +
                             bias_grad_.y * a.y * 1e-3 + bias_grad_.z * a.z * 1e-3);
  }

  bool is_ct() const { return modality_ct_; }
  double in_plane_fov() const { return fov_xy_; }
  double fov_z() const { return fov_z_; }
  double top_z() const { return top_z_; }
  double table_z() const { return table_z_; }
  double fov_center_y() const { return fov_cy_; }
  double blur_in_plane() const { return blur_xy_; }
  double blur_z() const { return blur_z_; }
  double noise_sigma() const { return noise_sigma_; }
  std::uint64_t acquisition_seed() const { return acquisition_seed_; }
  const std::vector<Lesion>& lesions() const { return lesions_; }

 private:
  // ---- drawing -----------------------------------------------------------
  double jitter(double lo, double hi) { return rng_.uniform(lo, hi); }

  void draw_fields() {
    for (auto& f : deform_) f = Field::make(rng_, 130);
    body_field_ = Field::make(rng_, 80);
    fat_field_ = Field::make(rng_, 110);
    tex_coarse_ = Field::make(rng_, 11);
    tex_fine_ = Field::make(rng_, 4);
    bowel_ = Field::make(rng_, 30);
    bowel2_ = Field::make(rng_, 34);
    bowel_gas_ = Field::make(rng_, 10);
    lung_v1_ = Field::make(rng_, 24);
    lung_v2_ = Field::make(rng_, 27);
    liver_v1_ = Field::make(rng_, 30);
    liver_v2_ = Field::make(rng_, 34);
    stool_ = Field::make(rng_, 9);
    bias_field_ = Field::make(rng_, 220);
  }

  void draw_body() {
    b_ant_ = 115 * jitter(0.95, 1.05);
    b_post_ = 108 * jitter(0.96, 1.04);
    half_width_scale_ = jitter(0.95, 1.05);
    belly_ = jitter(0.95, 1.15);
    fat_factor_ = std::exp(jitter(std::log(0.5), std::log(2.0)));
    muscle_factor_ = jitter(0.8, 1.25);
    dia_shift_ = jitter(-15, 15);
    spine_shift_ = jitter(-4, 4);
  }

  void draw_spine() {
    // Bodies and discs from L5 upwards; the T12/L1 disc sits near z = -85.
    const double anchor = -85 + jitter(-12, 12);
    const double lumbar_h[5] = {27, 28, 28, 28, 27};     // L5..L1
    const double lumbar_disc[5] = {11, 11, 10, 10, 10};  // above L5..above L1 (the last is T12/L1)
    const double scale = jitter(0.93, 1.07);
    double total = 0;
    for (int i = 0; i < 5; ++i) total += (lumbar_h[i] + lumbar_disc[i]) * scale;
    double z = anchor - total;
    for (int i = 0; i < 5; ++i) {
      spine_.body_lo.push_back(z);
      z += lumbar_h[i] * scale;
      spine_.body_hi.push_back(z);
      spine_.thoracic_number.push_back(0);
      z += lumbar_disc[i] * scale;
    }
    for (int t = 12; t >= 1; --t) {
      const double h = (17.0 + 7.0 * (t - 1) / 11.0) * scale;
      const double disc = (4.5 + 2.5 * (t - 1) / 11.0) * scale;
      spine_.body_lo.push_back(z);
      z += h;
      spine_.body_hi.push_back(z);
      spine_.thoracic_number.push_back(t);
      z += disc;
    }
    iliac_crest_ = spine_.body_hi[1] - 6 + jitter(-8, 8);  // about the L4 body
    ribs_bottom_ = anchor - 70;
  }

  Blob make_blob(Vec3 centre, Vec3 axes, Vec3 angles_deg, double amp_lo = 0.06, double amp_hi = 0.10,
                 double cell = 45, Vec3 shear = {}) {
    Blob b;
    b.shear = shear;
    const double s = jitter(0.87, 1.13);
    axes = {axes.x * s * jitter(0.95, 1.05), axes.y * s * jitter(0.95, 1.05), axes.z * s * jitter(0.95, 1.05)};
    b.centre = centre + Vec3{jitter(-6, 6), jitter(-6, 6), jitter(-6, 6)};
    const Mat3 rot = rotation_xyz(deg(angles_deg.x + jitter(-5, 5)), deg(angles_deg.y + jitter(-5, 5)),
                                  deg(angles_deg.z + jitter(-5, 5)));
    b.to_local = rot.transposed();
    b.inv_axes = {1 / axes.x, 1 / axes.y, 1 / axes.z};
    b.amp = jitter(amp_lo, amp_hi);
    b.field = Field::make(rng_, cell);
    const double reach = std::max({axes.x, axes.y, axes.z}) * (1 + 2.5 * b.amp);
    const Vec3 spread{reach * (1 + std::abs(shear.x)), reach * (1 + std::abs(shear.y)), reach};
    b.lo = b.centre - spread;
    b.hi = b.centre + spread;
    return b;
  }

  void draw_organs() {
    const double dz = 0.6 * dia_shift_;
    liver_r_ = make_blob({-60, -5, -62 + dz}, {85, 88, 95}, {0, 0, 0}, 0.05, 0.08, 60, {0.45, 0.15, 0});
    liver_l_ = make_blob({18, -52, -40 + dz}, {62, 34, 42}, {0, 0, 12}, 0.05, 0.09, 45);
    spleen_ = make_blob({88, 42, -58 + dz}, {22, 55, 46}, {0, 0, 24});
    kidney_r_ = make_blob({-74, 47, -150 + dz}, {24, 20, 52}, {0, 15, -28}, 0.04, 0.07);
    kidney_l_ = make_blob({74, 47, -135 + dz}, {24, 20, 52}, {0, -15, 28}, 0.04, 0.07);
    gallbladder_ = make_blob({-45, -52, -108 + dz}, {17, 17, 36}, {35, 0, 0}, 0.04, 0.08, 30);
    stomach_body_ = make_blob({58, -25, -48 + dz}, {40, 42, 60}, {0, 20, 0}, 0.06, 0.10, 50);
    stomach_antrum_ = make_blob({12, -62, -104 + dz}, {50, 20, 22}, {0, 0, -25}, 0.06, 0.10, 40);
    heart_ = make_blob({20, -30, 48 + dia_shift_}, {62, 48, 56}, {10, 0, -30}, 0.03, 0.06, 60);
    aorta_radius_ = 11 * jitter(0.85, 1.2);
    aorta_dx_ = jitter(-4, 4);
    ivc_scale_ = jitter(0.85, 1.2);
    ivc_dx_ = jitter(-4, 4);
    pancreas_shift_ = {jitter(-6, 6), jitter(-6, 6), jitter(-6, 6) + dz};
    pancreas_scale_ = jitter(0.8, 1.2);
    colon_radius_ = 22 * jitter(0.85, 1.15);
    colon_shift_ = {jitter(-8, 8), jitter(-8, 8), jitter(-10, 10)};
  }

  /// True when the lesion-free anatomy at c and at 14 points at `reach`
  /// around it is the host organ (kidney: either side).
  bool deep_inside(Vec3 c, double reach, Organ host) const {
    auto is_host = [&](Vec3 p) {
      const Organ o = classify(p).organ;
      return o == host;
    };
    if (!is_host(c)) return false;
    static const double dirs[14][3] = {{1, 0, 0},  {-1, 0, 0}, {0, 1, 0},   {0, -1, 0},  {0, 0, 1},
                                       {0, 0, -1}, {1, 1, 1},  {1, 1, -1},  {1, -1, 1},  {1, -1, -1},
                                       {-1, 1, 1}, {-1, 1, -1}, {-1, -1, 1}, {-1, -1, -1}};
    for (const auto& d : dirs) {
      const double n = std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
      for (double f : {0.5, 1.0})
        if (!is_host(c + Vec3{d[0], d[1], d[2]} * (f * reach / n))) return false;
    }
    return true;
  }

  /// Places lesions by rejection sampling inside their host, deep enough
  /// that the whole lesion lies in the organ. Radii shrink after 300 failed
  /// draws (down to 0.44x), so every case gets at least one lesion of each
  /// kind unless its host is smaller than a 5 mm sphere.
  void draw_lesions() {
    auto place = [&](const Blob& host_blob, Organ host, double r_lo, double r_hi, double margin) -> void {
      for (int shrink = 0; shrink < 6; ++shrink) {
        const double r = jitter(r_lo, r_hi) * std::pow(0.85, shrink);
        for (int attempt = 0; attempt < 300; ++attempt) {
          const Vec3 c{jitter(host_blob.lo.x, host_blob.hi.x), jitter(host_blob.lo.y, host_blob.hi.y),
                       jitter(host_blob.lo.z, host_blob.hi.z)};
          if (deep_inside(c, r + margin, host)) {
            lesions_.push_back({c, r, host, Field::make(rng_, 12)});
            return;
          }
        }
      }
    };
    const int liver_lesions = 1 + static_cast<int>(rng_.uniform_int(3));
    for (int i = 0; i < liver_lesions; ++i) place(liver_r_, Organ::liver, 11, 22, 4.0);
    // A tumour-bearing kidney is enlarged (as real ones are), which leaves
    // room for a tumour of 1..3 cm inside it.
    const bool right = rng_.uniform() < 0.5;
    Blob& kidney = right ? kidney_r_ : kidney_l_;
    constexpr double grow = 1.3;
    kidney.inv_axes = kidney.inv_axes * (1.0 / grow);
    kidney.lo = kidney.centre - (kidney.centre - kidney.lo) * grow;
    kidney.hi = kidney.centre + (kidney.hi - kidney.centre) * grow;
    place(kidney, right ? Organ::kidney_right : Organ::kidney_left, 11, 15, 2.0);
  }

  void draw_scan() {
    modality_ct_ = task_ != PhantomTask::downstream;
    const Vec3 scale{jitter(0.9, 1.1), 0, jitter(0.92, 1.08)};
    const double sy = scale.x * jitter(0.92, 1.08);
    inv_scale_ = {1 / scale.x, 1 / sy, 1 / scale.z};
    to_patient_ = rotation_xyz(deg(jitter(-3, 3)), deg(jitter(-2, 2)), deg(jitter(-3, 3)));
    shift_ = {jitter(-12, 12), jitter(-8, 8), 0};
    deform_amp_ = jitter(2, 6);
    // Field of view: a scanner's 512 grid at 0.7..1.0 mm, widened when the
    // body would not fit; 330..410 mm of the trunk from above the domes.
    fov_xy_ = std::max(jitter(0.7, 1.0) * 512, 2 * 170 * scale.x * half_width_scale_ + 30);
    top_z_ = jitter(110, 160) * scale.z;
    fov_z_ = jitter(330, 410);
    fov_cy_ = 12 + shift_.y;
    table_y_ = b_post_ * sy + shift_.y + 4;
    table_z_ = -jitter(350, 650);
    acquisition_seed_ = rng_.engine()();
    blur_xy_ = jitter(0.5, 0.8);
    blur_z_ = jitter(0.4, 0.6);
  }

  void draw_intensities() {
    const auto& looks = tissue_looks();
    if (modality_ct_) {
      // Contrast phase: 30% of cases without contrast, else portal-venous-like.
      const double phase = rng_.uniform() < 0.3 ? 0.0 : jitter(0.55, 1.0);
      for (int i = 0; i < kTissues; ++i) {
        const double jit = i == static_cast<int>(Tissue::air) || i == static_cast<int>(Tissue::gas)
                               ? 0.0
                               : rng_.normal(0.0, 0.03 * std::abs(looks[i].ct) + 2.0);
        base_[i] = looks[i].ct + looks[i].ct_enh * phase + jit;
        tex_amp_[i] = looks[i].ct_tex;
      }
      noise_sigma_ = jitter(8, 18);
    } else {
      const double gain = jitter(0.8, 1.25);
      for (int i = 0; i < kTissues; ++i) {
        base_[i] = looks[i].mr * gain * jitter(0.9, 1.1);
        tex_amp_[i] = looks[i].mr_tex * gain;
      }
      noise_sigma_ = jitter(10, 22) * gain;
      bias_amp_ = jitter(0.06, 0.14);
      bias_grad_ = {jitter(-0.6, 0.6), jitter(-0.9, 0.9), jitter(-0.5, 0.5)};
    }
  }

  /// Tabulates the smooth deformation (3 noise fields, 130 mm cells) on a
  /// 16 mm lattice over the field of view: trilinear lookups are far cheaper
  /// than 3 noise evaluations per voxel, and the lattice is in millimetres,
  /// so every voxel grid sees the same deformation.
  void build_deformation() {
    constexpr double step = 16.0;
    def_lo_ = {-0.5 * fov_xy_ - 2 * step, fov_cy_ - 0.5 * fov_xy_ - 2 * step, top_z_ - fov_z_ - 2 * step};
    def_n_[0] = static_cast<int>(std::ceil((fov_xy_ + 4 * step) / step)) + 1;
    def_n_[1] = def_n_[0];
    def_n_[2] = static_cast<int>(std::ceil((fov_z_ + 4 * step) / step)) + 1;
    def_.resize(static_cast<std::size_t>(3 * def_n_[0] * def_n_[1] * def_n_[2]));
    STUNET_OMP(parallel for schedule(static))
    for (int iz = 0; iz < def_n_[2]; ++iz)
      for (int iy = 0; iy < def_n_[1]; ++iy)
        for (int ix = 0; ix < def_n_[0]; ++ix) {
          const Vec3 p = def_lo_ + Vec3{ix * step, iy * step, iz * step};
          const std::size_t at = 3 * static_cast<std::size_t>((iz * def_n_[1] + iy) * def_n_[0] + ix);
          for (int c = 0; c < 3; ++c) def_[at + static_cast<std::size_t>(c)] = static_cast<float>(deform_amp_ * deform_[c].at(noise_, p));
        }
  }

  /// Displacement (mm) at scanner point s, trilinear in the lattice.
  Vec3 deformation(const Vec3& s) const {
    constexpr double inv_step = 1.0 / 16.0;
    const double f[3] = {(s.x - def_lo_.x) * inv_step, (s.y - def_lo_.y) * inv_step, (s.z - def_lo_.z) * inv_step};
    int i0[3];
    double t[3];
    for (int a = 0; a < 3; ++a) {
      const double c = std::clamp(f[a], 0.0, static_cast<double>(def_n_[a] - 1) - 1e-9);
      i0[a] = static_cast<int>(c);
      t[a] = c - i0[a];
    }
    double out[3] = {0, 0, 0};
    for (int corner = 0; corner < 8; ++corner) {
      const int dx = corner & 1, dy = (corner >> 1) & 1, dz = corner >> 2;
      const double w = (dx ? t[0] : 1 - t[0]) * (dy ? t[1] : 1 - t[1]) * (dz ? t[2] : 1 - t[2]);
      const std::size_t at =
          3 * static_cast<std::size_t>(((i0[2] + dz) * def_n_[1] + i0[1] + dy) * def_n_[0] + i0[0] + dx);
      for (int c = 0; c < 3; ++c) out[c] += w * def_[at + static_cast<std::size_t>(c)];
    }
    return {out[0], out[1], out[2]};
  }

  // ---- anatomy -------------------------------------------------------------
  double half_width(double z) const {
    const double t = z / 100.0;
    return half_width_scale_ * (158.0 - 8.0 * t / std::sqrt(1.0 + t * t) + 10.0 * smoothstep(-230, -320, z));
  }
  /// Vertebral body centre (y) along the spine: lumbar lordosis, thoracic kyphosis.
  double spine_y(double z) const {
    return 45.0 + spine_shift_ - 12.0 / (1.0 + sq((z + 200.0) / 90.0)) + 5.0 / (1.0 + sq((z - 150.0) / 110.0));
  }

  double diaphragm_z(double x, double y) const {
    // Two domes (the right one higher, over the liver) meeting low in the
    // middle under the heart; lower towards the back (costophrenic recesses).
    const double dome = std::max(-0.008 * sq(x + 55.0), -12.0 - 0.008 * sq(x - 55.0));
    return dia_shift_ + dome - 20.0 * sq(std::max(0.0, (std::abs(x) - 90.0) / 60.0)) -
           45.0 * sq(std::max(0.0, (y + 10.0) / 90.0)) - 10.0 * sq(std::max(0.0, (-y - 10.0) / 90.0));
  }

  /// Normalised radius of `a` in blob b (< 1 inside), 9 when outside its
  /// bounds; `q` receives the undeformed local coordinates / axes.
  double blob_radius(const Blob& b, const Vec3& a, Vec3* q = nullptr) const {
    if (a.x < b.lo.x || a.x > b.hi.x || a.y < b.lo.y || a.y > b.hi.y || a.z < b.lo.z || a.z > b.hi.z) return 9.0;
    const Vec3 l = b.to_local.apply(a - b.centre - b.shear * (a.z - b.centre.z));
    const Vec3 n{l.x * b.inv_axes.x, l.y * b.inv_axes.y, l.z * b.inv_axes.z};
    if (q) *q = n;
    const double r2 = n.x * n.x + n.y * n.y + n.z * n.z;
    const double band = 1.0 + 2.5 * b.amp;
    if (r2 > band * band) return 9.0;
    return std::sqrt(r2) + b.amp * std::clamp(b.field.at(noise_, a), -2.5, 2.5);
  }

  Sample classify_spine(const Vec3& a, double yc) const {
    const double x = a.x, y = a.y, z = a.z;
    const double rx = 18.0 + 7.0 * smoothstep(-40, -150, z), ry = 0.72 * rx;
    const double canal_y = yc + ry + 9.0;
    const double dy = y - yc;
    // Which level: index of the body containing z, or the disc above it.
    const auto& lo = spine_.body_lo;
    const auto& hi = spine_.body_hi;
    int level = -1;
    bool in_body = false;
    for (std::size_t i = 0; i < lo.size(); ++i) {
      if (z < lo[i]) break;
      level = static_cast<int>(i);
      in_body = z <= hi[i];
    }
    const double e = std::sqrt(sq(x / rx) + sq(dy / ry));
    if (e < 1.0 && level >= 0) {
      if (in_body) {
        const double to_plate = std::min(z - lo[level], hi[level] - z);
        const bool shell = (1.0 - e) * ry < 2.5 || to_plate < 1.8;
        return {Organ::vertebrae, shell ? Tissue::cortical_bone : Tissue::marrow};
      }
      if (static_cast<std::size_t>(level) + 1 < lo.size()) return {Organ::discs, Tissue::disc};
    }
    // Spinal canal: cord in CSF.
    const double dc = std::sqrt(x * x + sq(y - canal_y));
    if (dc < 9.0) return {Organ::none, dc < 5.0 ? Tissue::cord : Tissue::csf};
    if (level < 0) return {};
    // Posterior elements over the body's height (spinous processes project
    // downwards): arch ring, spinous and transverse processes.
    const bool lumbar = spine_.thoracic_number[static_cast<std::size_t>(level)] == 0;
    const double arch_lo = lo[level] - 3.0, arch_hi = hi[level] + 3.0;
    if (z >= arch_lo && z <= arch_hi && dc < 15.5 && y > yc) {
      const bool thin = dc < 10.8 || dc > 13.7;
      return {Organ::vertebrae, thin ? Tissue::cortical_bone : Tissue::marrow};
    }
    const double drop = lumbar ? 2.0 : 10.0;
    if (z >= arch_lo - drop && z <= arch_hi - drop && std::abs(x) < 3.8 && y > canal_y + 12 &&
        y < canal_y + (lumbar ? 30.0 : 27.0))
      return {Organ::vertebrae, Tissue::cortical_bone};
    const double tlen = lumbar ? 27.0 : 24.0;
    if (z >= arch_lo + 5 && z <= arch_hi - 5 && std::abs(y - (canal_y - 4.0)) < 3.8 && std::abs(x) > 9.0 &&
        std::abs(x) < 9.0 + tlen)
      return {Organ::vertebrae, Tissue::cortical_bone};
    return {};
  }

  Sample classify_autochthon(const Vec3& a, double yc) const {
    const double z = a.z;
    const double big = smoothstep(40, -120, z);
    const double rx = 19.0 + 10.0 * big, ry = 15.0 + 6.0 * big;
    const double cx = 26.0 + 10.0 * big, cy = yc + 33.0 + 2.0 * big;
    const double ex = (std::abs(a.x) - cx) / rx, ey = (a.y - cy) / ry;
    if (ex * ex + ey * ey < 1.0)
      return {a.x < 0 ? Organ::autochthon_right : Organ::autochthon_left, Tissue::muscle};
    return {};
  }

  Sample classify_iliac(const Vec3& a, double yc) const {
    // Each wing: a plate from the sacroiliac joint forwards and outwards,
    // below a crest that is highest in its middle.
    for (int side = -1; side <= 1; side += 2) {
      const double px = side * 48.0, py = yc + 30.0, qx = side * 128.0, qy = yc - 28.0;
      const double vx = qx - px, vy = qy - py;
      const double t = std::clamp(((a.x - px) * vx + (a.y - py) * vy) / (vx * vx + vy * vy), 0.0, 1.0);
      const double dist = std::hypot(a.x - (px + t * vx), a.y - (py + t * vy));
      const double crest = iliac_crest_ - 30.0 * sq(t - 0.55);
      const double th = 6.0 + 6.0 * smoothstep(crest - 10, crest - 80, a.z);
      if (a.z < crest && dist < th) return {Organ::none, dist > th - 2.5 ? Tissue::cortical_bone : Tissue::marrow};
    }
    return {};
  }

  Sample classify_ribs(const Vec3& a, double sin_t, double cos_t, double rib_depth) const {
    // Ribs leave the spine posteriorly and drop ~85 mm towards the front;
    // lower ribs end further back (floating ribs 11 and 12).
    if (std::abs(cos_t) < 0.22 && sin_t > 0) return {};
    if (std::abs(rib_depth) > 6.0) return {};
    const double drop = 125.0 * (1.0 - sin_t) * 0.5;
    static const double front_end[13] = {0, -0.95, -0.95, -0.95, -0.95, -0.95, -0.9, -0.88, -0.75, -0.55, -0.3, 0.15,
                                         0.45};
    for (std::size_t i = 0; i < spine_.body_lo.size(); ++i) {
      const int n = spine_.thoracic_number[i];
      if (n == 0) continue;
      if (sin_t < front_end[n]) continue;
      const double z_att = 0.5 * (spine_.body_lo[i] + spine_.body_hi[i]) + 6.0;
      const double dz = a.z - (z_att - drop);
      const double e = sq(rib_depth / 5.5) + sq(dz / 5.5);
      if (e < 1.0) return {Organ::ribs, e > 0.45 ? Tissue::cortical_bone : Tissue::marrow};
    }
    // Sternum: a flat bone at the front of the chest.
    if (sin_t < -0.93 && std::abs(a.x) < 16 && a.z > spine_.body_lo[5] && std::abs(rib_depth) < 5.0)
      return {Organ::none, std::abs(rib_depth) > 3.0 ? Tissue::cortical_bone : Tissue::marrow};
    return {};
  }

  /// Aorta centre and radius at height z (x, y), thoracic part more lateral.
  void aorta_at(double z, double yc, double* cx, double* cy, double* r) const {
    const double t = smoothstep(-20, 60, z);
    *cx = 15.0 + aorta_dx_ + 13.0 * t;
    *cy = yc - 30.0 + 10.0 * t;
    *r = aorta_radius_ * (1.0 + 0.15 * t) * (1.0 - 0.15 * smoothstep(bifurcation_z() + 60, bifurcation_z(), z));
  }
  double bifurcation_z() const { return 0.5 * (spine_.body_lo[1] + spine_.body_hi[1]); }

  Sample classify_vessels(const Vec3& a, double yc, double z_dia) const {
    const double x = a.x, y = a.y, z = a.z;
    const double zb = bifurcation_z();
    double cx, cy, r;
    aorta_at(std::max(z, zb), yc, &cx, &cy, &r);
    if (z >= zb) {
      if (sq(x - cx) + sq(y - cy) < r * r) return {Organ::aorta, Tissue::artery};
    } else {
      const double spread = 0.45 * (zb - z);
      for (int side = -1; side <= 1; side += 2)
        if (sq(x - (cx + side * spread)) + sq(y - cy - 0.2 * (zb - z)) < sq(0.68 * r))
          return {Organ::none, Tissue::artery};
    }
    // Inferior vena cava: right of the spine, forward through the liver into
    // the right atrium; common iliac veins below the confluence.
    const double zc = zb - 10.0;
    if (z < 15.0 + dia_shift_) {
      const double t = smoothstep(-80, 10, z);
      const double vx = -22.0 + ivc_dx_ + 8.0 * t, vy = yc - 28.0 - 22.0 * t;
      const double rx = 13.0 * ivc_scale_, ry = 10.0 * ivc_scale_;
      if (z >= zc) {
        if (sq((x - vx) / rx) + sq((y - vy) / ry) < 1.0) return {Organ::ivc, Tissue::vein};
      } else {
        const double spread = 0.45 * (zc - z);
        for (int side = -1; side <= 1; side += 2)
          if (sq((x - (vx + 10 + side * spread)) / (0.7 * rx)) + sq((y - vy - 0.2 * (zc - z)) / (0.7 * ry)) < 1.0)
            return {Organ::none, Tissue::vein};
      }
    }
    // Oesophagus: behind the heart, bending left into the stomach.
    if (z > z_dia - 40.0) {
      const double t = smoothstep(10, -40, z - dia_shift_);
      const double ex = 6.0 + 30.0 * t, ey = yc - 24.0 - 22.0 * t;
      const double d2 = sq(x - ex) + sq(y - ey);
      if (d2 < 64.0) return {Organ::none, d2 < 4.0 ? Tissue::gas : Tissue::muscle};
    }
    return {};
  }

  Sample classify_cavity(const Vec3& a, double yc) const {
    const double x = a.x, y = a.y, z = a.z;
    const double z_dia = diaphragm_z(x, y);
    Sample s = classify_vessels(a, yc, z_dia);
    if (s.tissue != Tissue::air) return s;
    if (z > z_dia) return classify_thorax(a, yc);
    if (z > z_dia - 5.0) return {Organ::none, Tissue::muscle};  // the diaphragm
    return classify_abdomen(a, yc);
  }

  Sample classify_thorax(const Vec3& a, double yc) const {
    const double x = a.x, y = a.y, z = a.z;
    const double rh = blob_radius(heart_, a);
    if (rh < 1.0) return {Organ::heart, rh > 0.8 ? Tissue::myocardium : Tissue::heart_blood};
    if (rh < 1.1) return {Organ::none, Tissue::fat};
    double cx, cy, r;
    aorta_at(z, yc, &cx, &cy, &r);
    if (sq(x - cx) + sq(y - cy) < sq(r + 7.0)) return {Organ::none, Tissue::fat};
    if (std::abs(x - 5.0) < 20.0 && y < yc - 12.0) return {Organ::none, Tissue::fat};  // mediastinum
    // Lung parenchyma; vessels where two noise iso-surfaces meet, thicker
    // towards the hilum.
    const double hilum = 1.0 / (1.0 + sq((std::abs(x - 5.0) - 40.0) / 45.0) + sq((z - 70.0 - dia_shift_) / 60.0));
    const double eps = 0.16 + 0.3 * hilum;
    const double v1 = lung_v1_.at(noise_, a);
    if (std::abs(v1) < eps && std::abs(lung_v2_.at(noise_, a)) < eps)
      return {x < 5.0 ? Organ::lung_right : Organ::lung_left, Tissue::lung_vessel};
    return {x < 5.0 ? Organ::lung_right : Organ::lung_left, Tissue::lung};
  }

  Sample lesion_at(const Vec3& a, Organ host, Sample healthy) const {
    for (const Lesion& l : lesions_) {
      if (l.host != host) continue;
      const Vec3 d = a - l.centre;
      const double rr = std::sqrt(d.x * d.x + d.y * d.y + d.z * d.z) / l.radius;
      if (rr > 1.3) continue;
      if (rr + 0.08 * std::clamp(l.field.at(noise_, a), -2.5, 2.5) < 1.0) {
        if (host == Organ::liver) return {Organ::liver_tumour, Tissue::liver_tumour};
        return {Organ::kidney_tumour, rr < 0.45 ? Tissue::tumour_necrosis : Tissue::kidney_tumour};
      }
    }
    return healthy;
  }

  Sample classify_abdomen(const Vec3& a, double yc) const {
    const double x = a.x, y = a.y, z = a.z;
    // Kidneys with a medial hilum (renal sinus fat), cortex around medulla.
    for (int side = 0; side < 2; ++side) {
      const Blob& k = side == 0 ? kidney_r_ : kidney_l_;
      Vec3 q;
      const double rk = blob_radius(k, a, &q);
      if (rk < 1.0) {
        const double medial = side == 0 ? q.x : -q.x;
        if (medial > 0.45 && std::abs(q.z) < 0.35 && q.y < 0.3) return {Organ::none, Tissue::fat};
        const Organ o = side == 0 ? Organ::kidney_right : Organ::kidney_left;
        const Sample healthy{o, rk > 0.72 ? Tissue::kidney_cortex : Tissue::kidney_medulla};
        return lesions_.empty() ? healthy : lesion_at(a, o, healthy);
      }
    }
    if (blob_radius(spleen_, a) < 1.0) return {Organ::spleen, Tissue::spleen};
    if (blob_radius(gallbladder_, a) < 1.0) return {Organ::gallbladder, Tissue::bile};
    if (Sample s = classify_pancreas(a, yc); s.tissue != Tissue::air) return s;
    if (blob_radius(liver_r_, a) < 1.0 || blob_radius(liver_l_, a) < 1.0) {
      const double eps = 0.075;
      Sample healthy{Organ::liver, Tissue::liver};
      if (std::abs(liver_v1_.at(noise_, a)) < eps && std::abs(liver_v2_.at(noise_, a)) < eps)
        healthy.tissue = Tissue::liver_vessel;
      return lesions_.empty() ? healthy : lesion_at(a, Organ::liver, healthy);
    }
    const double rs = std::min(blob_radius(stomach_body_, a), blob_radius(stomach_antrum_, a));
    if (rs < 1.0) {
      if (rs > 0.86) return {Organ::stomach, Tissue::stomach_wall};
      // Supine: gas rises to the front (smaller y).
      const bool gas = y < stomach_body_.centre.y - 20.0 && z > stomach_body_.centre.z - 30.0;
      return {Organ::stomach, gas ? Tissue::gas : Tissue::fluid};
    }
    if (Sample s = classify_colon(a); s.tissue != Tissue::air) return s;
    // Psoas muscles beside the lumbar spine.
    const double grow = smoothstep(-90, -300, z);
    if (grow > 0) {
      const double rp = 6.0 + 17.0 * grow;
      const double px = 22.0 + 0.9 * rp;
      if (sq((std::abs(x) - px) / rp) + sq((y - yc - 2.0) / (0.9 * rp)) < 1.0) return {Organ::none, Tissue::muscle};
    }
    // Everything else: small-bowel loops in mesenteric fat, sparse in the
    // upper abdomen and the retroperitoneum.
    const double loops = smoothstep(-70, -160, z) * (1.0 - smoothstep(yc - 30, yc + 5, y));
    if (loops > 0.05) {
      // Loops are tubes where two noise iso-surfaces meet: round and
      // elongated sections in a slice, wall around fluid, a little gas.
      const double t = 0.85 * loops;
      const double n1 = std::abs(bowel_.at(noise_, a));
      if (n1 < t) {
        const double n = std::max(n1, std::abs(bowel2_.at(noise_, a)));
        if (n < t) {
          if (n < 0.6 * t) {
            if (bowel_gas_.at(noise_, a) > 1.8) return {Organ::none, Tissue::gas};
            return {Organ::none, Tissue::bowel_content};
          }
          return {Organ::none, Tissue::bowel_wall};
        }
      }
    }
    return {Organ::none, Tissue::fat};
  }

  Sample classify_pancreas(const Vec3& a, double yc) const {
    const double x = (a.x - pancreas_shift_.x), y = a.y - pancreas_shift_.y, z = a.z - pancreas_shift_.z;
    if (x < -60 || x > 115) return {};
    const double xc = std::clamp(x, -40.0, 95.0);
    const double py = yc - 60.0 + 40.0 * sq(clamp01(xc / 95.0));
    const double pz = -120.0 + 0.25 * (xc + 40.0);
    const double r = pancreas_scale_ * (9.5 + 7.0 * smoothstep(-5, -30, xc));
    const double e = sq((x - xc) / r) + sq((y - py) / r) + sq((z - pz) / (1.2 * r));
    if (e < 1.0) return {Organ::pancreas, Tissue::pancreas};
    return {};
  }

  Sample classify_colon(const Vec3& a) const {
    const double x = a.x - colon_shift_.x, y = a.y - colon_shift_.y, z = a.z - colon_shift_.z;
    const double r = colon_radius_;
    double d = 1e9;
    // Transverse colon hanging between the flexures.
    const double xt = std::clamp(x, -100.0, 100.0);
    const double xn = xt / 100.0, xp = std::max(0.0, xn);
    const double yt = -70.0 + 75.0 * sq(sq(xn)), zt = -200.0 + 30.0 * sq(xn) + 25.0 * xp * xp * xp;
    d = std::min(d, std::sqrt(sq(x - xt) + sq(y - yt) + sq(z - zt)));
    // Ascending (right) and descending (left) colon.
    if (z < -170.0) d = std::min(d, std::hypot(x + 100.0, y - 5.0));
    else d = std::min(d, std::sqrt(sq(x + 100.0) + sq(y - 5.0) + sq(z + 170.0)));
    if (z < -145.0) d = std::min(d, std::hypot(x - 100.0, y - 12.0) / 0.9);
    else d = std::min(d, std::sqrt(sq(x - 100.0) + sq(y - 12.0) + sq(z + 145.0)) / 0.9);
    if (d >= r) return {};
    if (d > r - 3.5) return {Organ::colon, Tissue::colon_wall};
    const double s = stool_.at(noise_, a);
    return {Organ::colon, (s > 0.6 || a.y < -40.0 + 0.5 * s * r) ? Tissue::gas : Tissue::stool};
  }

  // ---- state ----------------------------------------------------------------
  PhantomTask task_;
  Generator rng_;
  GradientNoise noise_;
  Field deform_[3], body_field_, fat_field_, tex_coarse_, tex_fine_, bowel_, bowel2_, bowel_gas_, lung_v1_, lung_v2_,
      liver_v1_, liver_v2_, stool_, bias_field_;
  double b_ant_ = 115, b_post_ = 108, half_width_scale_ = 1, belly_ = 1, fat_factor_ = 1, muscle_factor_ = 1;
  double dia_shift_ = 0, spine_shift_ = 0, iliac_crest_ = -230, ribs_bottom_ = -150;
  Spine spine_;
  Blob liver_r_, liver_l_, spleen_, kidney_r_, kidney_l_, gallbladder_, stomach_body_, stomach_antrum_, heart_;
  double aorta_radius_ = 11, aorta_dx_ = 0, ivc_scale_ = 1, ivc_dx_ = 0, pancreas_scale_ = 1, colon_radius_ = 22;
  Vec3 pancreas_shift_, colon_shift_;
  std::vector<Lesion> lesions_;
  bool modality_ct_ = true;
  Mat3 to_patient_;
  Vec3 shift_, inv_scale_{1, 1, 1};
  double deform_amp_ = 5, fov_xy_ = 400, fov_z_ = 360, top_z_ = 130, fov_cy_ = 12, table_y_ = 112, table_z_ = -500;
  double blur_xy_ = 0.6, blur_z_ = 0.5, noise_sigma_ = 12, bias_amp_ = 0;
  Vec3 bias_grad_;
  std::uint64_t acquisition_seed_ = 0;
  std::array<double, kTissues> base_{}, tex_amp_{};
  Vec3 def_lo_;
  int def_n_[3] = {0, 0, 0};
  std::vector<float> def_;
};

// ---------------------------------------------------------------------------
// Acquisition: blur and noise on the voxel grid.

/// Throws unless every axis of a phantom grid is 8..1024 voxels and the
/// whole grid at most 2^27 voxels (0.5 GiB of float32).
inline void check_size(const std::array<std::int64_t, 3>& size, const char* what) {
  for (int a = 0; a < 3; ++a)
    STUNET_CHECK(size[a] >= 8 && size[a] <= 1024, "{}: size (D, H, W) = ({}, {}, {}) must be 8..1024 per axis", what,
                 size[0], size[1], size[2]);
  STUNET_CHECK(size[0] * size[1] * size[2] <= (std::int64_t{1} << 27),
               "{}: size (D, H, W) = ({}, {}, {}) has more than 2^27 voxels", what, size[0], size[1], size[2]);
}

/// Normalised Gaussian taps for a standard deviation in voxels (radius 3 sigma).
inline std::vector<float> gaussian_taps(double sigma) {
  const int radius = std::max(1, static_cast<int>(std::ceil(3.0 * sigma)));
  std::vector<float> w(static_cast<std::size_t>(2 * radius + 1));
  double sum = 0;
  for (int i = -radius; i <= radius; ++i) sum += std::exp(-0.5 * sq(i / sigma));
  for (int i = -radius; i <= radius; ++i)
    w[static_cast<std::size_t>(i + radius)] = static_cast<float>(std::exp(-0.5 * sq(i / sigma)) / sum);
  return w;
}

/// In-place separable Gaussian blur of a [D, H, W] volume (edges
/// replicated); sigma in voxels per axis, 0 skips an axis.
inline void gaussian_blur(float* v, std::int64_t D, std::int64_t H, std::int64_t W, double sd, double sh, double sw) {
  const std::int64_t extent[3] = {D, H, W};
  const std::int64_t stride[3] = {H * W, W, 1};
  const double sigma[3] = {sd, sh, sw};
  for (int axis = 0; axis < 3; ++axis) {
    if (sigma[axis] <= 0) continue;
    const std::vector<float> w = gaussian_taps(sigma[axis]);
    const std::int64_t radius = static_cast<std::int64_t>(w.size() / 2);
    const std::int64_t n = extent[axis], st = stride[axis];
    const std::int64_t lines = D * H * W / n;
    STUNET_OMP(parallel)
    {
      std::vector<float> line(static_cast<std::size_t>(n));
      STUNET_OMP(for schedule(static))
      for (std::int64_t li = 0; li < lines; ++li) {
        // Start of line li: every index with the blurred axis at 0.
        std::int64_t base;
        if (axis == 0) base = li;
        else if (axis == 1) base = (li / W) * H * W + li % W;
        else base = li * W;
        for (std::int64_t i = 0; i < n; ++i) line[static_cast<std::size_t>(i)] = v[base + i * st];
        for (std::int64_t i = 0; i < n; ++i) {
          double acc = 0;
          for (std::int64_t t = -radius; t <= radius; ++t) {
            const std::int64_t src = std::clamp<std::int64_t>(i + t, 0, n - 1);
            acc += w[static_cast<std::size_t>(t + radius)] * line[static_cast<std::size_t>(src)];
          }
          v[base + i * st] = static_cast<float>(acc);
        }
      }
    }
  }
}

/// Standard deviation left of unit white noise after gaussian_blur with
/// these sigmas: sqrt of the product of the per-axis sums of squared taps.
inline double blurred_noise_std(double sd, double sh, double sw) {
  double f = 1;
  for (double s : {sd, sh, sw}) {
    if (s <= 0) continue;
    double ss = 0;
    for (float w : gaussian_taps(s)) ss += static_cast<double>(w) * w;
    f *= ss;
  }
  return std::sqrt(f);
}

}  // namespace phantom_detail

/// Generates case `case_index` of a task's dataset on a (D, H, W) voxel grid.
/// image: [1, D, H, W] f32 whole numbers (CT: HU clamped to [-1024, 3071];
/// MR: [0, 4095]); label: [1, D, H, W] u8. Spacing (mm, D/H/W) follows from
/// the case's field of view: in-plane a scanner's 0.7..1.0 mm at 512 voxels
/// scaled to W, through-plane 330..410 mm of trunk over D slices. The affine
/// is LPS-like as from a scanner: diag(-sW, -sH, sD) with an origin.
/// The result depends only on (task, seed, case_index, size) and not on the
/// thread count.
inline PhantomCase generate_phantom(PhantomTask task, std::array<std::int64_t, 3> size, std::uint64_t seed,
                                    int case_index) {
  using namespace phantom_detail;
  check_size(size, "generate_phantom");
  STUNET_CHECK(case_index >= 0, "generate_phantom: case index {} is negative", case_index);
  const std::int64_t D = size[0], H = size[1], W = size[2];

  const std::uint64_t case_seed =
      mix_seed(mix_seed(seed ^ (task == PhantomTask::pretrain ? 0x5045ull : 0xD0D0ull)) + static_cast<std::uint64_t>(case_index));
  const PatientModel model(task, case_seed);

  // Voxel centres in the scanner frame.
  const double s_xy = model.in_plane_fov() / static_cast<double>(std::max(H, W));
  const double s_z = model.fov_z() / static_cast<double>(D);
  const double z0 = model.top_z() - model.fov_z() + 0.5 * s_z;
  std::vector<double> xs(static_cast<std::size_t>(W)), ys(static_cast<std::size_t>(H)), zs(static_cast<std::size_t>(D));
  for (std::int64_t i = 0; i < W; ++i) xs[static_cast<std::size_t>(i)] = (static_cast<double>(i) - 0.5 * static_cast<double>(W - 1)) * s_xy;
  for (std::int64_t j = 0; j < H; ++j)
    ys[static_cast<std::size_t>(j)] = (static_cast<double>(j) - 0.5 * static_cast<double>(H - 1)) * s_xy + model.fov_center_y();
  for (std::int64_t k = 0; k < D; ++k) zs[static_cast<std::size_t>(k)] = z0 + static_cast<double>(k) * s_z;

  Tensor image = Tensor::empty({1, D, H, W}, DType::f32);
  Tensor label = Tensor::empty({1, D, H, W}, DType::u8);
  float* img = image.data<float>();
  std::uint8_t* lab = label.data<std::uint8_t>();
  std::vector<float> bias;
  if (!model.is_ct()) bias.resize(static_cast<std::size_t>(D * H * W));
  const auto label_map = label_of_organ(task);

  STUNET_OMP(parallel for schedule(dynamic, 1))
  for (std::int64_t k = 0; k < D; ++k) {
    for (std::int64_t j = 0; j < H; ++j) {
      for (std::int64_t i = 0; i < W; ++i) {
        const std::int64_t idx = (k * H + j) * W + i;
        Vec3 a;
        const Sample s = model.sample_scanner({xs[static_cast<std::size_t>(i)], ys[static_cast<std::size_t>(j)],
                                               zs[static_cast<std::size_t>(k)]},
                                              &a);
        lab[idx] = label_map[static_cast<int>(s.organ)];
        img[idx] = static_cast<float>(model.intensity(s.tissue, a));
        if (!bias.empty()) bias[static_cast<std::size_t>(idx)] = static_cast<float>(model.bias(a));
      }
    }
  }

  // Scanner resolution, then noise correlated over ~1 voxel in-plane.
  gaussian_blur(img, D, H, W, model.blur_z(), model.blur_in_plane(), model.blur_in_plane());
  const double noise_blur = 0.6;
  std::vector<float> noise(static_cast<std::size_t>(D * H * W));
  STUNET_OMP(parallel for schedule(static))
  for (std::int64_t k = 0; k < D; ++k) {
    Generator g(mix_seed(model.acquisition_seed() + static_cast<std::uint64_t>(k)));
    for (std::int64_t n = k * H * W; n < (k + 1) * H * W; ++n) noise[static_cast<std::size_t>(n)] = static_cast<float>(g.normal());
  }
  const bool ct = model.is_ct();
  if (ct) {
    gaussian_blur(noise.data(), D, H, W, 0.0, noise_blur, noise_blur);
    const double scale = model.noise_sigma() / blurred_noise_std(0.0, noise_blur, noise_blur);
    STUNET_OMP(parallel for schedule(static))
    for (std::int64_t n = 0; n < D * H * W; ++n) {
      const double v = img[n] + scale * noise[static_cast<std::size_t>(n)];
      img[n] = static_cast<float>(std::clamp(std::nearbyint(v), -1024.0, 3071.0));
    }
  } else {
    // Magnitude MR: the bias field scales the signal, then Rician noise
    // (two independent Gaussian channels; the second from another stream).
    const double sigma = model.noise_sigma();
    STUNET_OMP(parallel for schedule(static))
    for (std::int64_t k = 0; k < D; ++k) {
      Generator g(mix_seed(~model.acquisition_seed() + static_cast<std::uint64_t>(k)));
      for (std::int64_t n = k * H * W; n < (k + 1) * H * W; ++n) {
        const double re = img[n] * bias[static_cast<std::size_t>(n)] + sigma * noise[static_cast<std::size_t>(n)];
        const double im = sigma * g.normal();
        img[n] = static_cast<float>(std::clamp(std::nearbyint(std::sqrt(re * re + im * im)), 0.0, 4095.0));
      }
    }
  }

  PhantomCase out;
  out.name = fmt::format("{}_{:04d}", phantom_task_name(task), case_index);
  out.image.data = image;
  out.image.spacing = {s_z, s_xy, s_xy};
  // RAS affine of an LPS scanner grid: i -> patient left (-X), j -> posterior (-Y), k -> superior.
  out.image.affine = Affine{{{-s_xy, 0, 0, 0.5 * static_cast<double>(W - 1) * s_xy},
                             {0, -s_xy, 0, 0.5 * static_cast<double>(H - 1) * s_xy - model.fov_center_y()},
                             {0, 0, s_z, z0 + model.table_z()},
                             {0, 0, 0, 1}}};
  out.label.data = label;
  out.label.spacing = out.image.spacing;
  out.label.affine = out.image.affine;
  return out;
}

/// Writes an nnU-Net v2 raw dataset into `folder` (created if missing):
/// dataset.json, imagesTr/<task>_<iiii>_0000.nii.gz (int16) and
/// labelsTr/<task>_<iiii>.nii.gz (uint8). Existing files of the same names
/// are replaced. `on_case` (optional) is called after each case is written,
/// in case order (progress, previews).
inline void write_phantom_dataset(const std::filesystem::path& folder, const PhantomOptions& options,
                                  const std::function<void(const PhantomCase&)>& on_case = {}) {
  STUNET_CHECK(options.cases >= 1 && options.cases <= 1000000, "write_phantom_dataset: cases = {} must be 1..1000000",
               options.cases);
  phantom_detail::check_size(options.size, "write_phantom_dataset");  // before touching the disk
  std::error_code ec;
  std::filesystem::create_directories(folder / "imagesTr", ec);
  STUNET_CHECK(!ec, "write_phantom_dataset: cannot create '{}': {}", (folder / "imagesTr").string(), ec.message());
  std::filesystem::create_directories(folder / "labelsTr", ec);
  STUNET_CHECK(!ec, "write_phantom_dataset: cannot create '{}': {}", (folder / "labelsTr").string(), ec.message());

  const auto names = phantom_labels(options.task);
  nlohmann::ordered_json labels;
  for (std::size_t i = 0; i < names.size(); ++i) labels[names[i]] = i;
  nlohmann::ordered_json ds;
  switch (options.task) {
    case PhantomTask::pretrain:
      ds["name"] = "PhantomPretrain";
      ds["description"] = "Synthetic trunk CT phantoms (body, spine, ribs, lungs, heart, abdominal organs), 18 classes";
      break;
    case PhantomTask::downstream:
      ds["name"] = "PhantomDownstream";
      ds["description"] = "Synthetic MR-like phantoms of the same anatomy with liver and kidney tumours, 4 classes";
      break;
    case PhantomTask::downstream_ct:
      ds["name"] = "PhantomDownstreamCT";
      ds["description"] = "Synthetic CT phantoms of the same anatomy with liver and kidney tumours, 4 classes";
      break;
  }
  ds["reference"] = "stunet synthetic phantoms";
  ds["licence"] = "CC0-1.0";
  ds["release"] = "1.0";
  ds["channel_names"] = {{"0", std::string(phantom_modality(options.task))}};
  ds["labels"] = labels;
  ds["numTraining"] = options.cases;
  ds["file_ending"] = ".nii.gz";
  ds["stunet_phantom"] = {{"task", std::string(phantom_task_name(options.task))},
                          {"seed", options.seed},
                          {"size", options.size}};
  {
    const auto path = folder / "dataset.json";
    auto tmp = path;
    tmp += ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      STUNET_CHECK(out.good(), "write_phantom_dataset: cannot write '{}'", tmp.string());
      out << ds.dump(2) << '\n';
      STUNET_CHECK(out.good(), "write_phantom_dataset: write to '{}' failed (disk full?)", tmp.string());
    }
    std::filesystem::rename(tmp, path, ec);
    STUNET_CHECK(!ec, "write_phantom_dataset: cannot rename '{}' to '{}': {}", tmp.string(), path.string(),
                 ec.message());
  }
  // Geometry codes as dcm2niix writes a scanner file (scanner-anatomical
  // sform and qform, millimetres and seconds), not nibabel's "aligned" default.
  io::NiftiHeader like;
  like.sform_code = 1;
  like.qform_code = 1;
  like.xyzt_units = 10;
  like.descrip = "stunet synthetic phantom";
  for (int i = 0; i < options.cases; ++i) {
    const PhantomCase c = generate_phantom(options.task, options.size, options.seed, i);
    io::write_image(folder / "imagesTr" / (c.name + "_0000.nii.gz"), c.image, io::NiftiDType::i16, &like);
    io::write_image(folder / "labelsTr" / (c.name + ".nii.gz"), c.label, io::NiftiDType::u8, &like);
    if (on_case) on_case(c);
  }
}

}  // namespace stunet::data
