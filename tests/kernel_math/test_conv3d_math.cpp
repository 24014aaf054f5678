// Host emulation of the conv3d CUDA kernels (include/stunet/cuda/conv3d.cuh):
// the kernels' loaders, tile mappings, stride phases, split plans and
// epilogues (include/stunet/cuda/conv3d_math.hpp) run here block by block,
// thread by thread and tile by tile, in the order the kernels run them, and
// the results are compared with the CPU ops (cpu::conv3d_forward,
// conv3d_backward_data, conv3d_backward_weight, conv3d_backward_bias) in
// float and double. Outputs start as NaN, so an element no block writes
// fails the comparison.

#include <doctest/doctest.h>

#include "../conv3d_cases.hpp"
#include "../testing.hpp"

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "stunet/cpu/conv3d.hpp"
#include "stunet/cuda/conv3d_math.hpp"

using stunet::Conv3dProblem;
namespace cm = stunet::cuda::conv3d_math;

namespace {

using Case = stunet::testing::Conv3dCase;
constexpr auto make = stunet::testing::make_conv3d_problem;
inline std::vector<Case> cases() { return stunet::testing::conv3d_cases(); }

template <class T> std::vector<T> random_vector(std::int64_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<T> v(static_cast<std::size_t>(n));
  for (T& e : v) e = static_cast<T>(dist(rng));
  return v;
}

template <class T> std::vector<T> nan_vector(std::int64_t n) {
  return std::vector<T>(static_cast<std::size_t>(n), std::numeric_limits<T>::quiet_NaN());
}

/// max |a - ref| / max |ref|; NaN anywhere in a (an element nobody wrote) gives infinity.
template <class T> double rel_error(const std::vector<T>& a, const std::vector<T>& ref) {
  REQUIRE(a.size() == ref.size());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(static_cast<double>(a[i]))) return std::numeric_limits<double>::infinity();
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - static_cast<double>(ref[i])));
    scale = std::max(scale, std::abs(static_cast<double>(ref[i])));
  }
  return diff / std::max(scale, 1e-300);
}

template <class T> double tolerance() { return sizeof(T) == 8 ? 1e-12 : 1e-5; }

/// One thread's accumulators, as in the kernels.
template <class Acc> struct ThreadAcc {
  Acc v[cm::kThreadTile][cm::kThreadTile] = {};
};

/// gemm_mainloop of conv3d.cuh for one block: every tile, every thread's
/// loader fills its slots of the shared tiles (each slot exactly once), then
/// every thread accumulates its 4x4 block over the tile's 16 rows in order.
template <class Tile, bool kAAlongM, class Acc, class Loader>
std::vector<ThreadAcc<Acc>> emulate_mainloop(std::vector<Loader>& loaders, int k_begin, int k_end) {
  constexpr int BK = Tile::BK;
  std::vector<ThreadAcc<Acc>> acc(cm::kThreads);
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    std::vector<Acc> As(BK * Tile::BM), Bs(BK * Tile::BN);
    std::vector<int> a_writes(As.size(), 0), b_writes(Bs.size(), 0);
    for (int tid = 0; tid < cm::kThreads; ++tid) {
      Acc ra[Tile::kPerThreadA], rb[Tile::kPerThreadB];
      loaders[static_cast<std::size_t>(tid)].load(k0, ra, rb);
      for (int i = 0; i < Tile::kPerThreadA; ++i) {
        const cm::TileSlot s = kAAlongM ? cm::slot_along_x<Tile::BM>(tid, i) : cm::slot_along_k(tid, i);
        As[static_cast<std::size_t>(s.kk * Tile::BM + s.x)] = ra[i];
        ++a_writes[static_cast<std::size_t>(s.kk * Tile::BM + s.x)];
      }
      for (int i = 0; i < Tile::kPerThreadB; ++i) {
        const cm::TileSlot s = cm::slot_along_k(tid, i);
        Bs[static_cast<std::size_t>(s.kk * Tile::BN + s.x)] = rb[i];
        ++b_writes[static_cast<std::size_t>(s.kk * Tile::BN + s.x)];
      }
    }
    for (int n : a_writes) REQUIRE(n == 1);
    for (int n : b_writes) REQUIRE(n == 1);
    for (int tid = 0; tid < cm::kThreads; ++tid) {
      const cm::ThreadXY t = cm::thread_xy<Tile>(tid);
      for (int kk = 0; kk < BK; ++kk)
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j)
            acc[static_cast<std::size_t>(tid)].v[i][j] +=
                As[static_cast<std::size_t>(kk * Tile::BM + 4 * t.tx + i)] *
                Bs[static_cast<std::size_t>(kk * Tile::BN + 4 * t.ty + j)];
    }
  }
  return acc;
}

int tiles(std::int64_t n, int b) { return static_cast<int>((n + b - 1) / b); }

// ---- the kernels, emulated ------------------------------------------------------

template <class Tile, class T>
void emulate_fprop(const Conv3dProblem& p, const T* x, const T* w, const T* bias, T* y) {
  const int gemm_m = cm::output_positions(p);
  const cm::Extent3 out = cm::output_extent(p);
  for (int bx = 0; bx < tiles(gemm_m, Tile::BM); ++bx)
    for (int by = 0; by < tiles(p.K, Tile::BN); ++by) {
      const int m0 = bx * Tile::BM, n0 = by * Tile::BN;
      std::vector<cm::FpropLoader<Tile, T, T>> loaders;
      for (int tid = 0; tid < cm::kThreads; ++tid) loaders.emplace_back(p, x, w, m0, n0, tid);
      auto acc = emulate_mainloop<Tile, true, T>(loaders, 0, cm::filter_taps(p));
      for (int tid = 0; tid < cm::kThreads; ++tid) {
        const cm::ThreadXY t = cm::thread_xy<Tile>(tid);
        for (int i = 0; i < 4; ++i)
          cm::fprop_store_row(p, out, gemm_m, bias, y, m0 + 4 * t.tx + i, n0 + 4 * t.ty,
                              acc[static_cast<std::size_t>(tid)].v[i]);
      }
    }
}

template <class Tile, class T> void emulate_dgrad(const Conv3dProblem& p, const T* dy, const T* w, T* dx) {
  const int phases = cm::dgrad_phase_count(p);
  int max_m = 0;
  for (int z = 0; z < phases; ++z) max_m = std::max(max_m, cm::dgrad_phase(p, z).gemm_m);
  for (int z = 0; z < phases; ++z) {
    const cm::DgradPhase ph = cm::dgrad_phase(p, z);
    for (int bx = 0; bx < tiles(max_m, Tile::BM); ++bx)
      for (int by = 0; by < tiles(p.C, Tile::BN); ++by) {
        const int m0 = bx * Tile::BM, n0 = by * Tile::BN;
        if (m0 >= ph.gemm_m) continue;  // the kernel's early return
        std::vector<cm::DgradLoader<Tile, T, T>> loaders;
        for (int tid = 0; tid < cm::kThreads; ++tid) loaders.emplace_back(p, ph, dy, w, m0, n0, tid);
        auto acc = emulate_mainloop<Tile, true, T>(loaders, 0, ph.gemm_k);
        for (int tid = 0; tid < cm::kThreads; ++tid) {
          const cm::ThreadXY t = cm::thread_xy<Tile>(tid);
          for (int i = 0; i < 4; ++i)
            cm::dgrad_store_row(p, ph, dx, m0 + 4 * t.tx + i, n0 + 4 * t.ty, acc[static_cast<std::size_t>(tid)].v[i]);
        }
      }
  }
}

/// Returns the plan it used.
template <class Tile, class T>
cm::SplitPlan emulate_wgrad(const Conv3dProblem& p, const T* x, const T* dy, T* dw) {
  const cm::SplitPlan plan = cm::wgrad_plan(p);
  const int length = cm::output_positions(p);
  const std::int64_t count = p.weight_numel();
  std::vector<T> scratch = nan_vector<T>(plan.splits * count);
  for (int bx = 0; bx < tiles(cm::filter_taps(p), Tile::BM); ++bx)
    for (int by = 0; by < tiles(p.K, Tile::BN); ++by)
      for (int split = 0; split < plan.splits; ++split) {
        const int m0 = bx * Tile::BM, n0 = by * Tile::BN;
        const int k_begin = split * plan.chunk;
        const int k_end = std::min(length, k_begin + plan.chunk);
        std::vector<cm::WgradLoader<Tile, T, T>> loaders;
        for (int tid = 0; tid < cm::kThreads; ++tid) loaders.emplace_back(p, x, dy, m0, n0, tid, k_begin);
        auto acc = emulate_mainloop<Tile, false, T>(loaders, k_begin, k_end);
        for (int tid = 0; tid < cm::kThreads; ++tid) {
          const cm::ThreadXY t = cm::thread_xy<Tile>(tid);
          for (int i = 0; i < 4; ++i)
            cm::wgrad_store_row(p, scratch.data(), split, m0 + 4 * t.tx + i, n0 + 4 * t.ty,
                                acc[static_cast<std::size_t>(tid)].v[i]);
        }
      }
  for (std::int64_t i = 0; i < count; ++i) dw[i] = cm::wgrad_reduce(scratch.data(), count, plan.splits, i);
  return plan;
}

/// The block reduction (CUB's tree on the device) is a plain sum over
/// threads here: the same terms, another order; the tolerance covers it.
template <class T> void emulate_bgrad(const Conv3dProblem& p, const T* dy, T* db) {
  const int length = cm::output_positions(p);
  const cm::SplitPlan plan = cm::bgrad_plan(p.K, length);
  std::vector<T> partial = nan_vector<T>(static_cast<std::int64_t>(p.K) * plan.splits);
  for (int k = 0; k < p.K; ++k)
    for (int split = 0; split < plan.splits; ++split) {
      T s = 0;
      for (int tid = 0; tid < cm::kThreads; ++tid)
        s += cm::bgrad_thread_sum<T>(dy, p.K, static_cast<int>(p.output_spatial()), length, plan, k, split, tid);
      partial[static_cast<std::size_t>(k * plan.splits + split)] = s;
    }
  for (int k = 0; k < p.K; ++k)
    db[k] = cm::wgrad_reduce(partial.data() + static_cast<std::ptrdiff_t>(k) * plan.splits, 1, plan.splits, 0);
}

template <class T> void check_all_passes(const Case& c) {
  const Conv3dProblem& p = c.p;
  REQUIRE(p.valid());
  const auto x = random_vector<T>(p.input_numel(), 1);
  const auto w = random_vector<T>(p.weight_numel(), 2);
  const auto b = random_vector<T>(p.K, 3);
  const auto dy = random_vector<T>(p.output_numel(), 4);
  const bool tall_k = cm::use_tall_tile(p.K), tall_c = cm::use_tall_tile(p.C);

  // fprop, with and without bias.
  for (const T* bias : {b.data(), static_cast<const T*>(nullptr)}) {
    CAPTURE(bias != nullptr);
    std::vector<T> ref(static_cast<std::size_t>(p.output_numel()));
    stunet::cpu::conv3d_forward<T>(p, x.data(), w.data(), bias, ref.data());
    auto y = nan_vector<T>(p.output_numel());
    if (tall_k) emulate_fprop<cm::TallTile>(p, x.data(), w.data(), bias, y.data());
    else emulate_fprop<cm::WideTile>(p, x.data(), w.data(), bias, y.data());
    CHECK_MESSAGE(rel_error(y, ref) <= tolerance<T>(), "fprop");
  }
  {
    std::vector<T> ref(static_cast<std::size_t>(p.input_numel()));
    stunet::cpu::conv3d_backward_data<T>(p, dy.data(), w.data(), ref.data());
    auto dx = nan_vector<T>(p.input_numel());
    if (tall_c) emulate_dgrad<cm::TallTile>(p, dy.data(), w.data(), dx.data());
    else emulate_dgrad<cm::WideTile>(p, dy.data(), w.data(), dx.data());
    CHECK_MESSAGE(rel_error(dx, ref) <= tolerance<T>(), "dgrad");
  }
  {
    std::vector<T> ref(static_cast<std::size_t>(p.weight_numel()));
    stunet::cpu::conv3d_backward_weight<T>(p, x.data(), dy.data(), ref.data());
    auto dw = nan_vector<T>(p.weight_numel());
    const cm::SplitPlan plan = tall_k ? emulate_wgrad<cm::TallTile>(p, x.data(), dy.data(), dw.data())
                                      : emulate_wgrad<cm::WideTile>(p, x.data(), dy.data(), dw.data());
    CAPTURE(plan.splits);
    CAPTURE(plan.chunk);
    CHECK_MESSAGE(rel_error(dw, ref) <= tolerance<T>(), "wgrad");
  }
  {
    std::vector<T> ref(static_cast<std::size_t>(p.K));
    stunet::cpu::conv3d_backward_bias<T>(p, dy.data(), ref.data());
    auto db = nan_vector<T>(p.K);
    emulate_bgrad<T>(p, dy.data(), db.data());
    CHECK_MESSAGE(rel_error(db, ref) <= tolerance<T>(), "bgrad");
  }
}

}  // namespace

TEST_CASE("cuda conv3d math: tile slots and thread blocks cover each tile exactly once") {
  auto check_tile = [&]<class Tile>() {
    std::vector<int> a_m(Tile::BK * Tile::BM, 0), a_k(Tile::BK * Tile::BM, 0), b_k(Tile::BK * Tile::BN, 0);
    std::vector<int> c(Tile::BM * Tile::BN, 0);
    for (int tid = 0; tid < cm::kThreads; ++tid) {
      for (int i = 0; i < Tile::kPerThreadA; ++i) {
        const cm::TileSlot s = cm::slot_along_x<Tile::BM>(tid, i), t = cm::slot_along_k(tid, i);
        REQUIRE((s.kk >= 0 && s.kk < Tile::BK && s.x >= 0 && s.x < Tile::BM));
        REQUIRE((t.kk >= 0 && t.kk < Tile::BK && t.x >= 0 && t.x < Tile::BM));
        ++a_m[static_cast<std::size_t>(s.kk * Tile::BM + s.x)];
        ++a_k[static_cast<std::size_t>(t.kk * Tile::BM + t.x)];
      }
      for (int i = 0; i < Tile::kPerThreadB; ++i) {
        const cm::TileSlot t = cm::slot_along_k(tid, i);
        REQUIRE((t.x >= 0 && t.x < Tile::BN));
        ++b_k[static_cast<std::size_t>(t.kk * Tile::BN + t.x)];
      }
      const cm::ThreadXY xy = cm::thread_xy<Tile>(tid);
      REQUIRE((xy.tx >= 0 && xy.tx < Tile::TX && xy.ty >= 0 && xy.ty < Tile::TY));
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) ++c[static_cast<std::size_t>((4 * xy.tx + i) * Tile::BN + 4 * xy.ty + j)];
    }
    for (int n : a_m) CHECK(n == 1);
    for (int n : a_k) CHECK(n == 1);
    for (int n : b_k) CHECK(n == 1);
    for (int n : c) CHECK(n == 1);
  };
  check_tile.operator()<cm::WideTile>();
  check_tile.operator()<cm::TallTile>();
}

TEST_CASE("cuda conv3d math: advance() steps a mixed-radix index like split_index") {
  for (const cm::Extent3 e : {cm::Extent3{3, 3, 3}, cm::Extent3{1, 1, 1}, cm::Extent3{2, 1, 3}, cm::Extent3{5, 7, 11},
                              cm::Extent3{16, 16, 16}, cm::Extent3{1, 2, 2}})
    for (int delta : {1, cm::kBlockK, 27, 1000}) {
      const cm::Coord step = cm::split_index(delta, e);
      for (int start = 0; start < 40; ++start) {
        cm::Coord c = cm::split_index(start, e);
        for (int t = 1; t < 200; ++t) {
          cm::advance(c, step, e);
          const cm::Coord want = cm::split_index(start + t * delta, e);
          REQUIRE((c.outer == want.outer && c.d == want.d && c.h == want.h && c.w == want.w));
        }
      }
    }
}

TEST_CASE("cuda conv3d math: dgrad phases enumerate exactly the valid (input, tap) pairs") {
  // Per axis: for every input coordinate i and tap t, dgrad_source says
  // whether i receives from an output through t; the phase of i must list t
  // exactly when (i + pad - t) is a multiple of the stride, and give the same
  // output coordinate.
  for (int extent : {1, 2, 3, 5, 7, 8})
    for (int kernel : {1, 2, 3, 5})
      for (int pad = 0; pad <= kernel; ++pad)
        for (int stride : {1, 2, 3}) {
          const int out = Conv3dProblem::out_extent(extent, kernel, pad, stride);
          if (out < 1) continue;
          int covered = 0;
          for (int residue = 0; residue < stride; ++residue) {
            const cm::AxisPhase a = cm::axis_phase(residue, extent, kernel, pad, stride);
            for (int j = 0; j < a.count; ++j) {
              const int i = residue + stride * j;
              ++covered;
              std::vector<int> listed(static_cast<std::size_t>(kernel), 0);
              for (int u = 0; u < a.taps; ++u) {
                const int t = a.first_tap + stride * u;
                REQUIRE(t < kernel);
                listed[static_cast<std::size_t>(t)] = 1;
                const int o = j + a.base - u;
                const int want = cm::dgrad_source(i, t, pad, stride, out);
                CHECK(want == (o >= 0 && o < out ? o : -1));
              }
              for (int t = 0; t < kernel; ++t)
                if (!listed[static_cast<std::size_t>(t)]) CHECK(cm::dgrad_source(i, t, pad, stride, out) == -1);
            }
          }
          CHECK(covered == extent);
        }
}

TEST_CASE("cuda conv3d math: split plans") {
  for (int tiles_mn : {1, 7, 14, 216, 1728, 5000})
    for (int length : {1, 15, 16, 17, 210, 1188, 65536, 4194304}) {
      const cm::SplitPlan w = cm::wgrad_plan(tiles_mn, length);
      CHECK(w.splits >= 1);
      CHECK(w.chunk % cm::kBlockK == 0);
      CHECK(static_cast<std::int64_t>(w.splits) * w.chunk >= length);
      CHECK(static_cast<std::int64_t>(w.splits - 1) * w.chunk < length);
      CHECK(static_cast<std::int64_t>(w.splits) * tiles_mn <= std::max(cm::kWgradTargetBlocks + tiles_mn, tiles_mn));
      const cm::SplitPlan b = cm::bgrad_plan(std::max(1, tiles_mn % 600), length);
      CHECK(b.splits >= 1);
      CHECK(static_cast<std::int64_t>(b.splits) * b.chunk >= length);
      CHECK(static_cast<std::int64_t>(b.splits - 1) * b.chunk < length);
    }
  // STU-Net-B's first level at 128^3, batch 2: 32 -> 32 channels, 3x3x3. The
  // 864 taps make 7 tall tiles; 147 splits of 28,544 positions keep the
  // float scratch at 16 MB.
  Conv3dProblem p = make(2, 32, {128, 128, 128}, 32, {3, 3, 3}, {1, 1, 1}, {1, 1, 1});
  const cm::SplitPlan plan = cm::wgrad_plan(p);
  CHECK(plan.splits == 147);
  CHECK(plan.chunk == 28544);
  // int64 element offsets: the last element of a [4, 96, 192^3] input
  // (STU-Net-H's first level at batch 4) is past 2^31.
  p.N = 4;
  p.C = 96;
  p.D = p.H = p.W = 192;
  CHECK(cm::input_offset(p, 3, 95, 191, 191, 191) == p.input_numel() - 1);
  CHECK(p.input_numel() - 1 > std::int64_t{2147483647});
}

TEST_CASE("cuda conv3d math: emulated kernels match the CPU conv3d (float64)") {
  for (const Case& c : cases()) {
    CAPTURE(std::string(c.name));
    check_all_passes<double>(c);
  }
}

TEST_CASE("cuda conv3d math: emulated kernels match the CPU conv3d (float32)") {
  for (const Case& c : cases()) {
    CAPTURE(std::string(c.name));
    check_all_passes<float>(c);
  }
}

TEST_CASE("cuda conv3d math: the small cases exercise several wgrad splits and both tiles") {
  // Otherwise the emulation above would not test the split structure.
  int multi_split = 0, wide = 0, tall = 0;
  for (const Case& c : cases()) {
    multi_split += cm::wgrad_plan(c.p).splits > 1;
    (cm::use_tall_tile(c.p.K) ? tall : wide) += 1;
  }
  CHECK(multi_split >= 5);
  CHECK(wide >= 3);
  CHECK(tall >= 3);
}
