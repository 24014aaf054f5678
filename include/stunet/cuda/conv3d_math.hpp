#pragma once
/// \file
/// The index arithmetic of the conv3d CUDA kernels (cuda/conv3d.cuh), as
/// plain C++ that both nvcc and the host compiler build: the tile shapes, which
/// tile element each thread loads, the decode of GEMM indices into positions
/// and filter taps, the im2col gather, the data-gradient phases, the split-K
/// plans, and the per-thread operand loaders and epilogues. The kernels call
/// these functions; tests/kernel_math/test_conv3d_math.cpp runs the same
/// functions over whole index spaces on the host, in the kernels' order, and
/// compares with the CPU ops. No CUDA header here: element types convert only
/// through static_cast, which works for float, double and (on the device)
/// __half / __nv_bfloat16.
///
/// Every pass is an implicit GEMM C[M, N] = sum_k A[M, k] B[k, N]:
///
///   pass    M                    N      reduction                 output
///   fprop   output positions     K      taps (c, t, r, s)          y
///   dgrad   input positions of   C      (k, t, r, s) of the phase  dx
///           one stride phase
///   wgrad   taps (c, t, r, s)    K      output positions (split)   scratch [split, K, CTRS]
///
/// Linear element offsets are int64 (STU-Net-H's 96 channels at 192^3,
/// batch 4, are 2.7e9 elements; 2 x 64 x 128^3 f32 is 2^30 bytes); GEMM
/// indices (positions, taps) are int, which the host checks before
/// launching, so that the kernels divide in 32 bits.

#include <cstdint>

#include "stunet/core/host_device.hpp"
#include "stunet/ops/conv3d_problem.hpp"

// Loops over a thread's few tile elements: unrolled on the device so that
// the per-element arrays live in registers; plain loops on the host.
#if defined(__CUDA_ARCH__)
#define STUNET_CONV3D_UNROLL _Pragma("unroll")
#else
#define STUNET_CONV3D_UNROLL
#endif

namespace stunet::cuda::conv3d_math {

// ---- tiles -----------------------------------------------------------------

/// Threads per GEMM block.
inline constexpr int kThreads = 256;
/// Reduction depth of one shared-memory tile.
inline constexpr int kBlockK = 16;
/// Each thread owns a kThreadTile x kThreadTile block of C.
inline constexpr int kThreadTile = 4;

/// A block tile of BM x BN outputs, kThreads threads of 4x4 outputs each.
template <int BM_, int BN_> struct GemmTile {
  static constexpr int BM = BM_, BN = BN_, BK = kBlockK;
  /// Threads along M and along N.
  static constexpr int TX = BM / kThreadTile, TY = BN / kThreadTile;
  static_assert(TX * TY == kThreads, "one 4x4 thread tile per thread");
  static_assert(TX % 8 == 0 && TY % 4 == 0, "a warp covers 8 x 4 thread tiles");
  static_assert(kThreads % BM == 0 && kBlockK % (kThreads / BM) == 0, "rows load in whole passes");
  /// Leading dimensions of the shared tiles [BK][BM + 4] and [BK][BN + 4]: a
  /// multiple of 4 (float4 reads) that is not one of 32 (stores along k hit
  /// at most 2 threads per bank).
  static constexpr int kLdA = BM + 4, kLdB = BN + 4;
  /// Elements of A and of B each thread loads per tile.
  static constexpr int kPerThreadA = BM * BK / kThreads, kPerThreadB = BN * BK / kThreads;
};
/// The general tile.
using WideTile = GemmTile<64, 64>;
/// For N <= 32 (32 channels: STU-Net's first level and C = K = 32 convs),
/// where a 64-wide tile would compute half zeros.
using TallTile = GemmTile<128, 32>;

/// Whether a GEMM with N columns uses TallTile (else WideTile).
STUNET_HOST_DEVICE constexpr bool use_tall_tile(int gemm_n) { return gemm_n <= 32; }

/// Where one loaded element goes in a shared tile: reduction row kk, column x
/// (the M or N index inside the tile).
struct TileSlot {
  int kk, x;
};
/// Loads coalesced along the M/N index: consecutive threads take consecutive
/// columns of one row (for operands contiguous along positions). Element i
/// of thread tid, of a tile [BK][BX].
template <int BX> STUNET_HOST_DEVICE constexpr TileSlot slot_along_x(int tid, int i) {
  return {tid / BX + (kThreads / BX) * i, tid % BX};
}
/// Loads coalesced along the reduction: consecutive threads take consecutive
/// rows of one column (weights, and wgrad's operands, contiguous along k).
STUNET_HOST_DEVICE constexpr TileSlot slot_along_k(int tid, int i) {
  return {tid % kBlockK, tid / kBlockK + (kThreads / kBlockK) * i};
}

/// The 4x4 block of C of thread tid: rows 4*tx .. 4*tx+3, columns 4*ty ..
/// 4*ty+3. A warp covers 8 x 4 thread tiles, so that its float4 reads of a
/// shared row are 128 contiguous bytes (A) and 64 (B): one wavefront each.
struct ThreadXY {
  int tx, ty;
};
template <class Tile> STUNET_HOST_DEVICE constexpr ThreadXY thread_xy(int tid) {
  constexpr int warps_x = Tile::TX / 8;
  const int warp = tid / 32, lane = tid % 32;
  return {(warp % warps_x) * 8 + lane % 8, (warp / warps_x) * 4 + lane / 8};
}

// ---- mixed-radix indices ---------------------------------------------------

/// A linear index split into an outer digit and three inner ones: a position
/// (n, d, h, w) of a [N, D, H, W] grid, a tap (c, t, r, s) of a [C, T, R, S]
/// filter, or their phase-grid versions in dgrad.
struct Coord {
  int outer, d, h, w;
};
/// Extents of the three inner digits (the outer one is unbounded).
struct Extent3 {
  int d, h, w;
};

/// v = ((outer * e.d + d) * e.h + h) * e.w + w. Extents >= 1.
STUNET_HOST_DEVICE inline Coord split_index(int v, Extent3 e) {
  Coord c;
  c.w = v % e.w;
  v /= e.w;
  c.h = v % e.h;
  v /= e.h;
  c.d = v % e.d;
  c.outer = v / e.d;
  return c;
}

/// c += step digit by digit with carries, where step = split_index(delta, e)
/// and c is normalised: each digit sum stays below twice its extent, so one
/// subtraction normalises it. Replaces three divisions per element in the
/// loaders' inner loop by a few adds.
STUNET_HOST_DEVICE inline void advance(Coord& c, const Coord& step, Extent3 e) {
  c.w += step.w;
  int carry = c.w >= e.w ? 1 : 0;
  c.w -= carry * e.w;
  c.h += step.h + carry;
  carry = c.h >= e.h ? 1 : 0;
  c.h -= carry * e.h;
  c.d += step.d + carry;
  carry = c.d >= e.d ? 1 : 0;
  c.d -= carry * e.d;
  c.outer += step.outer + carry;
}

// ---- problem geometry --------------------------------------------------------

/// (Z, P, Q).
STUNET_HOST_DEVICE inline Extent3 output_extent(const Conv3dProblem& p) { return {p.out_d(), p.out_h(), p.out_w()}; }
/// (T, R, S).
STUNET_HOST_DEVICE inline Extent3 filter_extent(const Conv3dProblem& p) { return {p.T, p.R, p.S}; }
/// N*Z*P*Q: the positions of fprop's M and wgrad's reduction.
STUNET_HOST_DEVICE inline int output_positions(const Conv3dProblem& p) {
  return static_cast<int>(p.N * p.output_spatial());
}
/// C*T*R*S: fprop's reduction and wgrad's M.
STUNET_HOST_DEVICE inline int filter_taps(const Conv3dProblem& p) { return static_cast<int>(p.gemm_k()); }

/// Output position m in [0, N*Z*P*Q) as (n, z, p, q).
STUNET_HOST_DEVICE inline Coord decode_output(Extent3 out, int m) { return split_index(m, out); }
/// Tap r in [0, C*T*R*S) as (c, t, r, s), the order of the weight's last four axes.
STUNET_HOST_DEVICE inline Coord decode_tap(const Conv3dProblem& p, int r) { return split_index(r, filter_extent(p)); }

/// Offset in x [N, C, D, H, W] of element (n, c, d, h, w).
STUNET_HOST_DEVICE inline std::int64_t input_offset(const Conv3dProblem& p, int n, int c, int d, int h, int w) {
  return (((static_cast<std::int64_t>(n) * p.C + c) * p.D + d) * p.H + h) * p.W + w;
}
/// Offset in y [N, K, Z, P, Q] of output position o = (n, z, p, q), channel k.
STUNET_HOST_DEVICE inline std::int64_t output_offset(const Conv3dProblem& p, Extent3 out, Coord o, int k) {
  return (((static_cast<std::int64_t>(o.outer) * p.K + k) * out.d + o.d) * out.h + o.h) * out.w + o.w;
}
/// Offset in w [K, C, T, R, S] of (k, c, t, r, s).
STUNET_HOST_DEVICE inline std::int64_t weight_offset(const Conv3dProblem& p, int k, int c, int t, int r, int s) {
  return (((static_cast<std::int64_t>(k) * p.C + c) * p.T + t) * p.R + r) * p.S + s;
}

/// The im2col element (output position o = (n, z, p, q), tap f = (c, t, r,
/// s)): its offset in x, or -1 when it lies in the zero padding.
STUNET_HOST_DEVICE inline std::int64_t im2col_offset(const Conv3dProblem& p, Coord o, Coord f) {
  const int d = o.d * p.stride_d - p.pad_d + f.d;
  const int h = o.h * p.stride_h - p.pad_h + f.h;
  const int w = o.w * p.stride_w - p.pad_w + f.w;
  if (d < 0 || d >= p.D || h < 0 || h >= p.H || w < 0 || w >= p.W) return -1;
  return input_offset(p, o.outer, f.outer, d, h, w);
}

/// base[off] as Acc, or zero for off < 0 (padding).
template <class Acc, class T> STUNET_HOST_DEVICE inline Acc load_or_zero(const T* base, std::int64_t off) {
  return off < 0 ? Acc(0) : static_cast<Acc>(base[off]);
}

// ---- data gradient: stride phases --------------------------------------------

/// The data-gradient validity test, on one axis: input coordinate i receives
/// from output coordinate o = (i + pad - t) / stride through tap t when that
/// quotient is integral and o in [0, out); returns o, or -1.
STUNET_HOST_DEVICE inline int dgrad_source(int i, int t, int pad, int stride, int out) {
  const int num = i + pad - t;
  if (num < 0 || num % stride != 0) return -1;
  const int o = num / stride;
  return o < out ? o : -1;
}

/// The input coordinates of one axis with one residue modulo the stride, and
/// the taps that can reach them: i = residue + stride*j (j < count) receives
/// through t = first_tap + stride*u (u < taps) from o = j + base - u (when o
/// is in range). Every other tap fails dgrad_source's divisibility test for
/// these i, so the gather multiplies no structural zeros: with stride 2 and
/// a 3-tap kernel, 1.5 taps per axis on average instead of 3 (8x fewer MACs
/// in 3D).
struct AxisPhase {
  int residue, stride, count, first_tap, taps, base;
};
STUNET_HOST_DEVICE inline AxisPhase axis_phase(int residue, int extent, int kernel, int pad, int stride) {
  AxisPhase a;
  a.residue = residue;
  a.stride = stride;
  a.count = residue < extent ? (extent - residue + stride - 1) / stride : 0;
  a.first_tap = (residue + pad) % stride;  // residue + pad - first_tap is a multiple of stride
  a.taps = a.first_tap < kernel ? (kernel - a.first_tap + stride - 1) / stride : 0;
  a.base = (residue + pad) / stride;
  return a;
}

/// One phase (rd, rh, rw) of the data gradient as its own GEMM: M = N *
/// count_d * count_h * count_w input positions, reduction = K * taps_d *
/// taps_h * taps_w; either may be zero (then the block does nothing, or
/// writes zeros: a 1x1x1 kernel with stride 2 reaches no odd position).
struct DgradPhase {
  AxisPhase d, h, w;
  Extent3 grid;  ///< (count_d, count_h, count_w): the phase's input grid per sample
  Extent3 taps;  ///< (taps_d, taps_h, taps_w)
  int gemm_m, gemm_k;
};
/// stride_d * stride_h * stride_w.
STUNET_HOST_DEVICE inline int dgrad_phase_count(const Conv3dProblem& p) { return p.stride_d * p.stride_h * p.stride_w; }
/// Phase `index` in [0, dgrad_phase_count(p)), residues in (d, h, w) row-major order.
STUNET_HOST_DEVICE inline DgradPhase dgrad_phase(const Conv3dProblem& p, int index) {
  DgradPhase ph;
  const int rw = index % p.stride_w;
  const int rh = (index / p.stride_w) % p.stride_h;
  const int rd = index / (p.stride_w * p.stride_h);
  ph.d = axis_phase(rd, p.D, p.T, p.pad_d, p.stride_d);
  ph.h = axis_phase(rh, p.H, p.R, p.pad_h, p.stride_h);
  ph.w = axis_phase(rw, p.W, p.S, p.pad_w, p.stride_w);
  ph.grid = {ph.d.count, ph.h.count, ph.w.count};
  ph.taps = {ph.d.taps, ph.h.taps, ph.w.taps};
  ph.gemm_m = p.N * ph.d.count * ph.h.count * ph.w.count;
  ph.gemm_k = p.K * ph.d.taps * ph.h.taps * ph.w.taps;
  return ph;
}
/// The input position (n, d, h, w) of phase-grid position j = (n, jd, jh, jw).
STUNET_HOST_DEVICE inline Coord dgrad_input_position(const DgradPhase& ph, Coord j) {
  return {j.outer, ph.d.residue + ph.d.stride * j.d, ph.h.residue + ph.h.stride * j.h,
          ph.w.residue + ph.w.stride * j.w};
}
/// The filter tap (k, t, r, s) of phase tap u = (k, ud, uh, uw).
STUNET_HOST_DEVICE inline Coord dgrad_filter_tap(const DgradPhase& ph, Coord u) {
  return {u.outer, ph.d.first_tap + ph.d.stride * u.d, ph.h.first_tap + ph.h.stride * u.h,
          ph.w.first_tap + ph.w.stride * u.w};
}
/// Offset in dy of the element that phase position j receives through phase
/// tap u, or -1 when the output position is outside [0, Z) x [0, P) x [0, Q).
STUNET_HOST_DEVICE inline std::int64_t dgrad_dy_offset(const Conv3dProblem& p, const DgradPhase& ph, Extent3 out,
                                                       Coord j, Coord u) {
  const int z = j.d + ph.d.base - u.d;
  const int y = j.h + ph.h.base - u.h;
  const int x = j.w + ph.w.base - u.w;
  if (z < 0 || z >= out.d || y < 0 || y >= out.h || x < 0 || x >= out.w) return -1;
  return output_offset(p, out, Coord{j.outer, z, y, x}, u.outer);
}

// ---- split reductions -----------------------------------------------------------

/// A reduction of `length` terms cut into `splits` contiguous chunks of
/// `chunk` (the last one shorter); a fixed function of the problem, so that
/// the summation order, hence the result, is the same on every run and GPU.
struct SplitPlan {
  int splits, chunk;
};

/// wgrad: blocks to aim for (M tiles x N tiles x splits); a few waves of an
/// H100's 132 SMs. Not the SM count: the partition must not depend on the GPU.
inline constexpr int kWgradTargetBlocks = 1024;
/// Shortest wgrad chunk: a few tiles, so the prologue and the scratch traffic stay small.
inline constexpr int kWgradMinChunk = 4 * kBlockK;

/// The split of wgrad's reduction over `length` = N*Z*P*Q positions for a
/// GEMM of `tiles_mn` block tiles: enough splits to fill the GPU, chunks a
/// multiple of kBlockK (no tile straddles two splits), no empty split.
STUNET_HOST_DEVICE inline SplitPlan wgrad_plan(int tiles_mn, int length, int target_blocks = kWgradTargetBlocks) {
  const int max_splits = (length + kWgradMinChunk - 1) / kWgradMinChunk;
  int splits = (target_blocks + tiles_mn - 1) / tiles_mn;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  int chunk = (length + splits - 1) / splits;
  chunk = (chunk + kBlockK - 1) / kBlockK * kBlockK;
  return {(length + chunk - 1) / chunk, chunk};
}
/// The block tiles of wgrad's GEMM (M = C*T*R*S taps, N = K) with tile Tile.
template <class Tile> STUNET_HOST_DEVICE inline int wgrad_tiles(const Conv3dProblem& p) {
  return ((filter_taps(p) + Tile::BM - 1) / Tile::BM) * ((p.K + Tile::BN - 1) / Tile::BN);
}
/// wgrad's plan for problem p (tile chosen by use_tall_tile(K), as the launcher does).
STUNET_HOST_DEVICE inline SplitPlan wgrad_plan(const Conv3dProblem& p) {
  const int tiles = use_tall_tile(p.K) ? wgrad_tiles<TallTile>(p) : wgrad_tiles<WideTile>(p);
  return wgrad_plan(tiles, output_positions(p));
}
/// dw[i] = sum of the splits' partials in split order. scratch: [splits, count].
template <class Acc> STUNET_HOST_DEVICE inline Acc wgrad_reduce(const Acc* scratch, std::int64_t count, int splits,
                                                                std::int64_t i) {
  Acc s = Acc(0);
  for (int z = 0; z < splits; ++z) s += scratch[z * count + i];
  return s;
}

/// bgrad: blocks to aim for (K x splits).
inline constexpr int kBgradTargetBlocks = 1024;
/// Shortest bgrad chunk: 4 elements per thread.
inline constexpr int kBgradMinChunk = 4 * kThreads;
/// The split of each channel's N*Z*P*Q terms.
STUNET_HOST_DEVICE inline SplitPlan bgrad_plan(int K, int length) {
  const int max_splits = (length + kBgradMinChunk - 1) / kBgradMinChunk;
  int splits = (kBgradTargetBlocks + K - 1) / K;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  const int chunk = (length + splits - 1) / splits;
  return {(length + chunk - 1) / chunk, chunk};
}
/// Thread tid's partial of channel k, split `split`: terms l = begin + tid,
/// begin + tid + kThreads, ... of the chunk, in that order (l = n * plane +
/// position, plane = Z*P*Q). The block then reduces its threads' partials.
template <class Acc, class T>
STUNET_HOST_DEVICE inline Acc bgrad_thread_sum(const T* dy, int K, int plane, int length, SplitPlan plan, int k,
                                               int split, int tid) {
  const int begin = split * plan.chunk;
  const int end = begin + plan.chunk < length ? begin + plan.chunk : length;
  Acc s = Acc(0);
  for (int l = begin + tid; l < end; l += kThreads) {
    const int n = l / plane;
    s += static_cast<Acc>(dy[(static_cast<std::int64_t>(n) * K + k) * plane + (l - n * plane)]);
  }
  return s;
}

// ---- operand loaders ------------------------------------------------------------
//
// One loader per thread and pass: the constructor decodes what stays fixed
// for the thread over the whole reduction (its output or input position, or
// its taps); load(k0, a, b) fetches the thread's elements of the A and B
// tiles that start at reduction index k0 (zero outside the GEMM and in the
// padding) and steps its counters by kBlockK. Calls must follow the tiles in
// order, from the k_begin given to the constructor.

/// fprop: A[m][r] = x at the im2col element (output position m, tap r),
/// loaded along M (consecutive threads, consecutive positions); B[r][k] =
/// w[k][r], loaded along r (contiguous in w).
template <class Tile, class Acc, class T> struct FpropLoader {
  static constexpr int kA = Tile::kPerThreadA, kB = Tile::kPerThreadB;
  Conv3dProblem p;
  const T* x;
  const T* w;
  Extent3 out, filter;
  int gemm_m, gemm_k, tid, n0;
  bool m_ok;
  Coord pos;      ///< this thread's output position (its A column is fixed)
  Coord tap[kA];  ///< taps of its A elements in the current tile
  Coord step;     ///< kBlockK as a tap

  STUNET_HOST_DEVICE FpropLoader(const Conv3dProblem& p_, const T* x_, const T* w_, int m0, int n0_, int tid_)
      : p(p_), x(x_), w(w_), out(output_extent(p_)), filter(filter_extent(p_)), gemm_m(output_positions(p_)),
        gemm_k(filter_taps(p_)), tid(tid_), n0(n0_) {
    const int m = m0 + slot_along_x<Tile::BM>(tid, 0).x;
    m_ok = m < gemm_m;
    pos = m_ok ? decode_output(out, m) : Coord{0, 0, 0, 0};
    STUNET_CONV3D_UNROLL
    for (int i = 0; i < kA; ++i) tap[i] = split_index(slot_along_x<Tile::BM>(tid, i).kk, filter);
    step = split_index(kBlockK, filter);
  }

  STUNET_HOST_DEVICE void load(int k0, Acc (&a)[kA], Acc (&b)[kB]) {
    STUNET_CONV3D_UNROLL
    for (int i = 0; i < kA; ++i) {
      const int r = k0 + slot_along_x<Tile::BM>(tid, i).kk;
      a[i] = m_ok && r < gemm_k ? load_or_zero<Acc>(x, im2col_offset(p, pos, tap[i])) : Acc(0);
      advance(tap[i], step, filter);
    }
    const int r = k0 + slot_along_k(tid, 0).kk;
    STUNET_CONV3D_UNROLL
    for (int i = 0; i < kB; ++i) {
      const int k = n0 + slot_along_k(tid, i).x;
      b[i] = r < gemm_k && k < p.K ? static_cast<Acc>(w[static_cast<std::int64_t>(k) * gemm_k + r]) : Acc(0);
    }
  }
};

/// dgrad of one phase: A[m][j] = dy at the output position that phase
/// position m receives from through phase tap j = (k, ud, uh, uw), loaded
/// along M; B[j][c] = w[k][c][t][r][s], loaded along j.
template <class Tile, class Acc, class T> struct DgradLoader {
  static constexpr int kA = Tile::kPerThreadA, kB = Tile::kPerThreadB;
  Conv3dProblem p;
  DgradPhase ph;
  const T* dy;
  const T* w;
  Extent3 out;
  int tid, n0;
  bool m_ok;
  Coord pos;      ///< this thread's phase position (n, jd, jh, jw)
  Coord tap[kA];  ///< phase taps of its A elements
  Coord tap_b;    ///< phase tap of its B row
  Coord step;     ///< kBlockK as a phase tap

  STUNET_HOST_DEVICE DgradLoader(const Conv3dProblem& p_, const DgradPhase& ph_, const T* dy_, const T* w_, int m0,
                                 int n0_, int tid_)
      : p(p_), ph(ph_), dy(dy_), w(w_), out(output_extent(p_)), tid(tid_), n0(n0_) {
    const int m = m0 + slot_along_x<Tile::BM>(tid, 0).x;
    m_ok = m < ph.gemm_m;
    pos = m_ok ? split_index(m, ph.grid) : Coord{0, 0, 0, 0};
    const Coord zero{0, 0, 0, 0};
    const bool any = ph.gemm_k > 0;  // the tap extents may be zero otherwise
    STUNET_CONV3D_UNROLL
    for (int i = 0; i < kA; ++i) tap[i] = any ? split_index(slot_along_x<Tile::BM>(tid, i).kk, ph.taps) : zero;
    tap_b = any ? split_index(slot_along_k(tid, 0).kk, ph.taps) : zero;
    step = any ? split_index(kBlockK, ph.taps) : zero;
  }

  STUNET_HOST_DEVICE void load(int k0, Acc (&a)[kA], Acc (&b)[kB]) {
    STUNET_CONV3D_UNROLL
    for (int i = 0; i < kA; ++i) {
      const int j = k0 + slot_along_x<Tile::BM>(tid, i).kk;
      a[i] = m_ok && j < ph.gemm_k ? load_or_zero<Acc>(dy, dgrad_dy_offset(p, ph, out, pos, tap[i])) : Acc(0);
      advance(tap[i], step, ph.taps);
    }
    const int j = k0 + slot_along_k(tid, 0).kk;
    const Coord f = dgrad_filter_tap(ph, tap_b);
    STUNET_CONV3D_UNROLL
    for (int i = 0; i < kB; ++i) {
      const int c = n0 + slot_along_k(tid, i).x;
      b[i] = j < ph.gemm_k && c < p.C ? static_cast<Acc>(w[weight_offset(p, f.outer, c, f.d, f.h, f.w)]) : Acc(0);
    }
    advance(tap_b, step, ph.taps);
  }
};

/// wgrad (computed as dw^T so that both operands load along the reduction,
/// which is contiguous in x and dy): A[r][l] = x at the im2col element
/// (output position l, tap r); B[l][k] = dy[n][k][position]. Both of a
/// thread's elements share one position l, decoded once per tile.
template <class Tile, class Acc, class T> struct WgradLoader {
  static constexpr int kA = Tile::kPerThreadA, kB = Tile::kPerThreadB;
  Conv3dProblem p;
  const T* x;
  const T* dy;
  Extent3 out;
  int length, tid, n0;
  Coord tap[kA];  ///< this thread's A rows (fixed)
  bool tap_ok[kA];
  Coord pos;   ///< output position of its reduction index in the current tile
  Coord step;  ///< kBlockK as a position

  STUNET_HOST_DEVICE WgradLoader(const Conv3dProblem& p_, const T* x_, const T* dy_, int m0, int n0_, int tid_,
                                 int k_begin)
      : p(p_), x(x_), dy(dy_), out(output_extent(p_)), length(output_positions(p_)), tid(tid_), n0(n0_) {
    const int taps = filter_taps(p);
    STUNET_CONV3D_UNROLL
    for (int i = 0; i < kA; ++i) {
      const int r = m0 + slot_along_k(tid, i).x;
      tap_ok[i] = r < taps;
      tap[i] = tap_ok[i] ? decode_tap(p, r) : Coord{0, 0, 0, 0};
    }
    pos = decode_output(out, k_begin + slot_along_k(tid, 0).kk);
    step = decode_output(out, kBlockK);
  }

  STUNET_HOST_DEVICE void load(int k0, Acc (&a)[kA], Acc (&b)[kB]) {
    const bool l_ok = k0 + slot_along_k(tid, 0).kk < length;
    STUNET_CONV3D_UNROLL
    for (int i = 0; i < kA; ++i)
      a[i] = l_ok && tap_ok[i] ? load_or_zero<Acc>(x, im2col_offset(p, pos, tap[i])) : Acc(0);
    STUNET_CONV3D_UNROLL
    for (int i = 0; i < kB; ++i) {
      const int k = n0 + slot_along_k(tid, i).x;
      b[i] = l_ok && k < p.K ? static_cast<Acc>(dy[output_offset(p, out, pos, k)]) : Acc(0);
    }
    advance(pos, step, out);
  }
};

// ---- epilogues: one row of a thread's 4x4 block ---------------------------------

/// y[n][k][z][p][q] = v[j] + bias[k] for k = k_first + j, output position m.
template <class Acc, class T>
STUNET_HOST_DEVICE inline void fprop_store_row(const Conv3dProblem& p, Extent3 out, int gemm_m, const T* bias, T* y,
                                               int m, int k_first, const Acc (&v)[kThreadTile]) {
  if (m >= gemm_m) return;
  const Coord o = decode_output(out, m);
  const std::int64_t base = output_offset(p, out, o, 0);
  const std::int64_t plane = static_cast<std::int64_t>(out.d) * out.h * out.w;
  STUNET_CONV3D_UNROLL
  for (int j = 0; j < kThreadTile; ++j) {
    const int k = k_first + j;
    if (k >= p.K) break;
    const Acc b = bias != nullptr ? static_cast<Acc>(bias[k]) : Acc(0);
    y[base + k * plane] = static_cast<T>(v[j] + b);
  }
}

/// dx[n][c][d][h][w] = v[j] for c = c_first + j at the input position of phase position m.
template <class Acc, class T>
STUNET_HOST_DEVICE inline void dgrad_store_row(const Conv3dProblem& p, const DgradPhase& ph, T* dx, int m,
                                               int c_first, const Acc (&v)[kThreadTile]) {
  if (m >= ph.gemm_m) return;
  const Coord in = dgrad_input_position(ph, split_index(m, ph.grid));
  const std::int64_t base = input_offset(p, in.outer, 0, in.d, in.h, in.w);
  const std::int64_t plane = p.input_spatial();
  STUNET_CONV3D_UNROLL
  for (int j = 0; j < kThreadTile; ++j) {
    const int c = c_first + j;
    if (c >= p.C) break;
    dx[base + c * plane] = static_cast<T>(v[j]);
  }
}

/// scratch[split][k][r] = v[j] for k = k_first + j, tap r (scratch: [splits, K, C*T*R*S]).
template <class Acc>
STUNET_HOST_DEVICE inline void wgrad_store_row(const Conv3dProblem& p, Acc* scratch, int split, int r, int k_first,
                                               const Acc (&v)[kThreadTile]) {
  const int taps = filter_taps(p);
  if (r >= taps) return;
  STUNET_CONV3D_UNROLL
  for (int j = 0; j < kThreadTile; ++j) {
    const int k = k_first + j;
    if (k >= p.K) break;
    scratch[(static_cast<std::int64_t>(split) * p.K + k) * taps + r] = v[j];
  }
}

}  // namespace stunet::cuda::conv3d_math
