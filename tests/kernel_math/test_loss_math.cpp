// Host emulation of the loss kernels (include/stunet/cuda/loss.cuh): the
// per-thread bodies of cuda/loss_math.hpp run over the whole index space in
// the kernels' order and with their reduction structure (grid-stride threads,
// the block's halving tree, the ordered second pass, Dice row chunks, the
// smallest-bad-label flag), compared with the CPU kernels of cpu/softmax.hpp
// and cpu/loss.hpp. Checks the kernels' index arithmetic without a GPU.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../testing.hpp"
#include "stunet/cpu/loss.hpp"
#include "stunet/cpu/softmax.hpp"
#include "stunet/cuda/loss_math.hpp"

using namespace stunet;
namespace lm = stunet::cuda::loss_math;
using stunet::testing::random_labels;
using stunet::testing::random_tensor;

namespace {

/// max |a - b| / max(max |b|, tiny).
template <class T> double rel_diff(const std::vector<T>& a, const std::vector<T>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0, s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    s = std::max(s, std::abs(static_cast<double>(b[i])));
  }
  return m / std::max(s, 1e-300);
}

template <class T> std::vector<T> values(const Tensor& t) {
  return std::vector<T>(t.data<T>(), t.data<T>() + t.numel());
}

/// Tolerance of float-vs-float comparisons whose only difference is the
/// order of a C-term sum (online vs two-pass softmax) or a few exp/log ulps.
template <class T> double tol() { return std::is_same_v<T, float> ? 2e-6 : 1e-14; }

// ---- emulated launches ------------------------------------------------------------

/// softmax_forward_kernel / softmax_backward_kernel: one thread per column.
template <class T>
void emulate_softmax_forward(const T* x, T* y, std::int64_t outer, std::int64_t C, std::int64_t inner) {
  for (std::int64_t col = 0; col < outer * inner; ++col) {
    const std::int64_t base = lm::column_base(col, C, inner);
    lm::softmax_forward_column<lm::accum_t<T>>(x + base, y + base, C, inner);
  }
}
template <class T>
void emulate_softmax_backward(const T* y, const T* g, T* dx, std::int64_t outer, std::int64_t C, std::int64_t inner) {
  for (std::int64_t col = 0; col < outer * inner; ++col) {
    const std::int64_t base = lm::column_base(col, C, inner);
    lm::softmax_backward_column<lm::accum_t<T>>(y + base, g + base, dx + base, C, inner);
  }
}

/// class_labels_kernel over a grid of `blocks` x 256 grid-stride threads,
/// with the flag lowered by every bad index (atomicMin).
template <class L>
std::int64_t emulate_class_labels(const L* in, std::int32_t* out, std::int64_t n, std::int64_t classes,
                                  std::int64_t blocks) {
  unsigned long long flag = static_cast<unsigned long long>(n);
  const std::int64_t threads = blocks * 256;
  for (std::int64_t tid = 0; tid < threads; ++tid)
    for (std::int64_t i = tid; i < n; i += threads) {
      std::int32_t label;
      if (!lm::class_label(in[i], classes, label)) flag = std::min(flag, static_cast<unsigned long long>(i));
      out[i] = label;
    }
  return flag < static_cast<unsigned long long>(n) ? static_cast<std::int64_t>(flag) : -1;
}

/// cross_entropy_forward_kernel + ordered_sum_kernel.
template <class T>
double emulate_cross_entropy_forward(const T* x, const std::int32_t* labels, T* lse, std::int64_t N, std::int64_t C,
                                     std::int64_t V, std::int64_t* blocks_used = nullptr) {
  const std::int64_t count = N * V, blocks = lm::reduce_blocks(count);
  if (blocks_used) *blocks_used = blocks;
  std::vector<double> partials(static_cast<std::size_t>(blocks)), s(lm::kReduceThreads);
  for (std::int64_t b = 0; b < blocks; ++b) {
    for (int t = 0; t < lm::kReduceThreads; ++t) {
      double acc = 0.0;
      for (std::int64_t j = b * lm::kReduceThreads + t; j < count; j += blocks * lm::kReduceThreads)
        acc += lm::cross_entropy_voxel<lm::accum_t<T>>(x, labels, lse, j, C, V);
      s[static_cast<std::size_t>(t)] = acc;
    }
    for (int stride = lm::kReduceThreads / 2; stride > 0; stride >>= 1)
      for (int t = 0; t < lm::kReduceThreads; ++t) lm::tree_add(s.data(), t, stride);
    partials[static_cast<std::size_t>(b)] = s[0];
  }
  double total = 0.0;
  for (double p : partials) total += p;
  return total;
}

/// The two-dimensional grid of the elementwise backward kernels (y: rows,
/// x: voxels, both grid-stride): calls body(row, n, c, v) for every thread's
/// elements and checks that each element is visited exactly once.
template <class F> void emulate_row_grid(std::int64_t N, std::int64_t C, std::int64_t V, F body) {
  const std::int64_t rows = N * C;
  std::int64_t bx, by;
  lm::row_grid(rows, V, 256, bx, by);
  std::vector<int> visits(static_cast<std::size_t>(rows * V), 0);
  for (std::int64_t y = 0; y < by; ++y)
    for (std::int64_t x = 0; x < bx; ++x)
      for (std::int64_t t = 0; t < 256; ++t)
        for (std::int64_t row = y; row < rows; row += by) {
          const std::int64_t n = row / C;
          for (std::int64_t v = x * 256 + t; v < V; v += bx * 256) {
            ++visits[static_cast<std::size_t>(row * V + v)];
            body(row, n, static_cast<std::int32_t>(row - n * C), v);
          }
        }
  CHECK(std::all_of(visits.begin(), visits.end(), [](int k) { return k == 1; }));
}

template <class T>
void emulate_cross_entropy_backward(const T* x, const std::int32_t* labels, const T* lse, T* dx, std::int64_t N,
                                    std::int64_t C, std::int64_t V, double factor) {
  using A = lm::accum_t<T>;
  emulate_row_grid(N, C, V, [&](std::int64_t row, std::int64_t n, std::int32_t c, std::int64_t v) {
    dx[row * V + v] =
        lm::cross_entropy_backward_element<A>(x + row * V, labels + n * V, lse + n * V, c, v, static_cast<A>(factor));
  });
}

/// dice_sums_kernel (rows x chunks blocks) + ordered_sum_kernel + the host scatter.
template <class T>
void emulate_dice_sums(const T* p, const std::int32_t* labels, std::int64_t N, std::int64_t C, std::int64_t V,
                       std::int64_t c0, double* inter, double* pred, double* gt, std::int64_t* chunks_used = nullptr) {
  const std::int64_t rows = N * (C - c0), chunks = lm::dice_chunks(V);
  if (chunks_used) *chunks_used = chunks;
  std::vector<double> partials(static_cast<std::size_t>(3 * rows * chunks));
  std::vector<double> si(lm::kReduceThreads), sp(lm::kReduceThreads), sg(lm::kReduceThreads);
  for (std::int64_t b = 0; b < rows * chunks; ++b) {
    const std::int64_t r = b / chunks, k = b - r * chunks;
    std::int64_t n, c, begin, end;
    lm::dice_row(r, C, c0, n, c);
    lm::chunk_range(k, chunks, V, begin, end);
    for (int t = 0; t < lm::kReduceThreads; ++t) {
      double i_ = 0, p_ = 0, g_ = 0;
      for (std::int64_t v = begin + t; v < end; v += lm::kReduceThreads)
        lm::dice_accumulate<lm::accum_t<T>>(p + (n * C + c) * V, labels + n * V, static_cast<std::int32_t>(c), v, i_,
                                            p_, g_);
      si[static_cast<std::size_t>(t)] = i_;
      sp[static_cast<std::size_t>(t)] = p_;
      sg[static_cast<std::size_t>(t)] = g_;
    }
    for (int stride = lm::kReduceThreads / 2; stride > 0; stride >>= 1)
      for (int t = 0; t < lm::kReduceThreads; ++t) {
        lm::tree_add(si.data(), t, stride);
        lm::tree_add(sp.data(), t, stride);
        lm::tree_add(sg.data(), t, stride);
      }
    partials[static_cast<std::size_t>((0 * rows + r) * chunks + k)] = si[0];
    partials[static_cast<std::size_t>((1 * rows + r) * chunks + k)] = sp[0];
    partials[static_cast<std::size_t>((2 * rows + r) * chunks + k)] = sg[0];
  }
  std::vector<double> sums(static_cast<std::size_t>(3 * rows));
  for (std::int64_t o = 0; o < 3 * rows; ++o) {
    double acc = 0;
    for (std::int64_t k = 0; k < chunks; ++k) acc += partials[static_cast<std::size_t>(o * chunks + k)];
    sums[static_cast<std::size_t>(o)] = acc;
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    std::int64_t n, c;
    lm::dice_row(r, C, c0, n, c);
    inter[n * C + c] = sums[static_cast<std::size_t>(r)];
    pred[n * C + c] = sums[static_cast<std::size_t>(rows + r)];
    gt[n * C + c] = sums[static_cast<std::size_t>(2 * rows + r)];
  }
}

template <class T>
void emulate_dice_backward(const std::int32_t* labels, T* dx, std::int64_t N, std::int64_t C, std::int64_t V,
                           const double* a, const double* b) {
  emulate_row_grid(N, C, V, [&](std::int64_t row, std::int64_t n, std::int32_t c, std::int64_t v) {
    dx[row * V + v] = lm::dice_backward_element<T>(labels + n * V, c, v, a[row], b[row]);
  });
}

struct Ncv {
  std::int64_t N, C, V;
};

}  // namespace

TEST_CASE_TEMPLATE("cuda loss math: softmax columns match cpu::softmax", T, float, double) {
  const DType dt = dtype_of<T>;
  // [outer, C, inner]: the STU-Net layout at odd sizes, inner = 1 (softmax
  // over the last axis, stride-1 columns), a single class, and a column long
  // enough for the online max to be replaced many times.
  for (Ncv s : {Ncv{2, 5, 3 * 5 * 7}, Ncv{37, 11, 1}, Ncv{3, 1, 19}, Ncv{1, 105, 13}}) {
    CAPTURE(s.N);
    CAPTURE(s.C);
    CAPTURE(s.V);
    Tensor x = random_tensor(Shape{s.N, s.C, s.V}, dt, 11, -8.0, 8.0);
    Tensor g = random_tensor(Shape{s.N, s.C, s.V}, dt, 12);
    Tensor y_ref = Tensor::empty(x.shape(), dt), y = Tensor::empty(x.shape(), dt);
    cpu::softmax_forward(x.data<T>(), y_ref.data<T>(), s.N, s.C, s.V);
    emulate_softmax_forward(x.data<T>(), y.data<T>(), s.N, s.C, s.V);
    CHECK(rel_diff(values<T>(y), values<T>(y_ref)) < tol<T>());
    Tensor x2 = x.clone();  // in place (y over x), which the forward kernel allows
    emulate_softmax_forward(x2.data<T>(), x2.data<T>(), s.N, s.C, s.V);
    CHECK(values<T>(x2) == values<T>(y));

    Tensor dx_ref = Tensor::empty(x.shape(), dt), dx = Tensor::empty(x.shape(), dt);
    cpu::softmax_backward(y_ref.data<T>(), g.data<T>(), dx_ref.data<T>(), s.N, s.C, s.V);
    emulate_softmax_backward(y_ref.data<T>(), g.data<T>(), dx.data<T>(), s.N, s.C, s.V);
    CHECK(rel_diff(values<T>(dx), values<T>(dx_ref)) < tol<T>());

    // In place (dx over g), which the backward kernel allows.
    Tensor g2 = g.clone();
    emulate_softmax_backward(y_ref.data<T>(), g2.data<T>(), g2.data<T>(), s.N, s.C, s.V);
    CHECK(values<T>(g2) == values<T>(dx));
  }
}

TEST_CASE("cuda loss math: softmax of extreme columns") {
  // Large logits (exp would overflow without the running max) and -inf.
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {1000.f, -1000.f, 999.f, -inf, 0.f, 3.f};  // [1, 6, 1]
  std::vector<float> y(6), y_ref(6);
  emulate_softmax_forward(x.data(), y.data(), 1, 6, 1);
  cpu::softmax_forward(x.data(), y_ref.data(), 1, 6, 1);
  for (std::size_t c = 0; c < 6; ++c) CHECK(y[c] == doctest::Approx(y_ref[c]).epsilon(1e-6));
  CHECK(y[3] == 0.0f);
}

TEST_CASE_TEMPLATE("cuda loss math: class labels report the smallest bad index", L, float, double, std::int64_t,
                   std::int32_t, std::uint8_t, f16) {
  const std::int64_t n = 2 * 3 * 5 * 7, classes = 5;
  std::vector<L> t(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    t[static_cast<std::size_t>(i)] = static_cast<L>(static_cast<float>((i * 7) % classes));
  std::vector<std::int32_t> out(t.size(), -9), out_ref(t.size(), -9);

  // All valid.
  CHECK(emulate_class_labels(t.data(), out.data(), n, classes, 1) == -1);
  CHECK(cpu::class_labels(t.data(), out_ref.data(), n, classes) == -1);
  CHECK(out == out_ref);

  // Several bad values; the grid of 1 block makes threads stride, so the
  // first bad index found is not the smallest one.
  t[200] = static_cast<L>(static_cast<float>(classes));  // == classes
  t[37] = static_cast<L>(static_cast<float>(classes + 3));
  t[90] = static_cast<L>(static_cast<float>(200));
  if constexpr (!std::is_integral_v<L>) {
    t[52] = static_cast<L>(2.5f);
    t[61] = static_cast<L>(-1.0f);
    t[45] = static_cast<L>(std::numeric_limits<float>::quiet_NaN());
    t[44] = static_cast<L>(-0.0f);  // valid: class 0
  } else if constexpr (std::is_signed_v<L>) {
    t[61] = static_cast<L>(-1);
  }
  for (std::int64_t blocks : {1, 2, 7}) {
    CAPTURE(blocks);
    CHECK(emulate_class_labels(t.data(), out.data(), n, classes, blocks) == 37);
    CHECK(cpu::class_labels(t.data(), out_ref.data(), n, classes) == 37);
    CHECK(out == out_ref);
  }
  t[37] = static_cast<L>(1.0f);
  const std::int64_t expected = std::is_integral_v<L> ? (std::is_signed_v<L> ? 61 : 90) : 45;
  CHECK(emulate_class_labels(t.data(), out.data(), n, classes, 1) == expected);
  CHECK(cpu::class_labels(t.data(), out_ref.data(), n, classes) == expected);
  CHECK(out == out_ref);
}

TEST_CASE_TEMPLATE("cuda loss math: cross-entropy matches cpu::cross_entropy_*", T, float, double) {
  const DType dt = dtype_of<T>;
  // The 3x5x7 case is one block; the long one needs 1024 blocks whose threads
  // take two or three voxels each (the grid-stride loop of the reduction).
  for (Ncv s : {Ncv{2, 5, 3 * 5 * 7}, Ncv{2, 3, 150001}}) {
    CAPTURE(s.V);
    Tensor x = random_tensor(Shape{s.N, s.C, s.V}, dt, 21, -4.0, 4.0);
    Tensor labels = random_labels(Shape{s.N, s.V}, static_cast<int>(s.C), 22, DType::i32);
    const std::int32_t* lb = labels.data<std::int32_t>();
    Tensor lse_ref = Tensor::empty(Shape{s.N, s.V}, dt), lse = Tensor::empty(Shape{s.N, s.V}, dt);
    const double ref = cpu::cross_entropy_forward(x.data<T>(), lb, lse_ref.data<T>(), s.N, s.C, s.V);
    std::int64_t blocks = 0;
    const double got = emulate_cross_entropy_forward(x.data<T>(), lb, lse.data<T>(), s.N, s.C, s.V, &blocks);
    CHECK(blocks == std::min<std::int64_t>(lm::kMaxReduceBlocks, (s.N * s.V + 255) / 256));
    CHECK(std::abs(got - ref) <= tol<T>() * std::abs(ref));
    CHECK(rel_diff(values<T>(lse), values<T>(lse_ref)) < tol<T>());

    const double factor = 0.75 / static_cast<double>(s.N * s.V);
    Tensor dx_ref = Tensor::empty(x.shape(), dt), dx = Tensor::empty(x.shape(), dt);
    cpu::cross_entropy_backward(x.data<T>(), lb, lse_ref.data<T>(), dx_ref.data<T>(), s.N, s.C, s.V,
                                static_cast<T>(factor));
    emulate_cross_entropy_backward(x.data<T>(), lb, lse_ref.data<T>(), dx.data<T>(), s.N, s.C, s.V, factor);
    CHECK(rel_diff(values<T>(dx), values<T>(dx_ref)) < tol<T>());
  }
}

TEST_CASE_TEMPLATE("cuda loss math: dice sums and backward match cpu::dice_*", T, float, double) {
  const DType dt = dtype_of<T>;
  // 3x5x7 is one chunk per row; 42735 voxels split into 6 chunks of 7123
  // (not a multiple of the block), so every row has a ragged last chunk.
  for (Ncv s : {Ncv{2, 5, 3 * 5 * 7}, Ncv{2, 3, 33 * 35 * 37}}) {
    for (std::int64_t c0 : {0, 1}) {
      CAPTURE(s.V);
      CAPTURE(c0);
      Tensor p = random_tensor(Shape{s.N, s.C, s.V}, dt, 31, 0.0, 1.0);
      Tensor labels = random_labels(Shape{s.N, s.V}, static_cast<int>(s.C), 32, DType::i32);
      const std::int32_t* lb = labels.data<std::int32_t>();
      const auto rows = static_cast<std::size_t>(s.N * s.C);
      std::vector<double> i_ref(rows, -7.0), p_ref(rows, -7.0), g_ref(rows, -7.0);
      std::vector<double> i_got(rows, -7.0), p_got(rows, -7.0), g_got(rows, -7.0);
      cpu::dice_sums(p.data<T>(), lb, s.N, s.C, s.V, c0, i_ref.data(), p_ref.data(), g_ref.data());
      std::int64_t chunks = 0;
      emulate_dice_sums(p.data<T>(), lb, s.N, s.C, s.V, c0, i_got.data(), p_got.data(), g_got.data(), &chunks);
      CHECK(chunks == (s.V > 8192 ? 6 : 1));
      for (std::int64_t n = 0; n < s.N; ++n)
        for (std::int64_t c = 0; c < s.C; ++c) {
          const auto r = static_cast<std::size_t>(n * s.C + c);
          if (c < c0) {  // rows below c0 are left as they were
            CHECK(i_got[r] == -7.0);
            CHECK(p_got[r] == -7.0);
            CHECK(g_got[r] == -7.0);
            continue;
          }
          // Sums of the same doubles in another order: a few ulps.
          CHECK(std::abs(i_got[r] - i_ref[r]) <= 1e-12 * std::abs(i_ref[r]));
          CHECK(std::abs(p_got[r] - p_ref[r]) <= 1e-12 * std::abs(p_ref[r]));
          CHECK(g_got[r] == g_ref[r]);  // integer counts: exact
          CHECK(g_got[r] > 0.0);
        }

      // Backward: the same double a + b rounded once, so bit-equal.
      std::vector<double> a(rows), b(rows);
      for (std::size_t r = 0; r < rows; ++r) {
        a[r] = -0.3 / static_cast<double>(r + 1);
        b[r] = 1e-3 * static_cast<double>(r) - 0.001;
      }
      Tensor dx_ref = Tensor::empty(p.shape(), dt), dx = Tensor::empty(p.shape(), dt);
      cpu::dice_backward(lb, dx_ref.data<T>(), s.N, s.C, s.V, a.data(), b.data());
      emulate_dice_backward(lb, dx.data<T>(), s.N, s.C, s.V, a.data(), b.data());
      CHECK(values<T>(dx) == values<T>(dx_ref));
    }
  }
}

TEST_CASE("cuda loss math: elementwise backward grids stride over rows and voxels") {
  // More rows than grid.y allows (65535), and more voxels than 1024 blocks
  // of 256 threads cover in one round.
  for (Ncv s : {Ncv{1, 70001, 3}, Ncv{1, 2, 300007}}) {
    CAPTURE(s.C);
    CAPTURE(s.V);
    const Shape shape{s.N, s.C, s.V};
    Tensor x = random_tensor(shape, DType::f32, 41, -3.0, 3.0);
    Tensor labels = random_labels(Shape{s.N, s.V}, static_cast<int>(std::min<std::int64_t>(s.C, 1000)), 42, DType::i32);
    const std::int32_t* lb = labels.data<std::int32_t>();
    Tensor lse = Tensor::empty(Shape{s.N, s.V}, DType::f32);
    cpu::cross_entropy_forward(x.data<float>(), lb, lse.data<float>(), s.N, s.C, s.V);
    Tensor dx_ref = Tensor::empty(shape, DType::f32), dx = Tensor::empty(shape, DType::f32);
    cpu::cross_entropy_backward(x.data<float>(), lb, lse.data<float>(), dx_ref.data<float>(), s.N, s.C, s.V, 0.5f);
    emulate_cross_entropy_backward(x.data<float>(), lb, lse.data<float>(), dx.data<float>(), s.N, s.C, s.V, 0.5);
    CHECK(rel_diff(values<float>(dx), values<float>(dx_ref)) < tol<float>());

    std::vector<double> a(static_cast<std::size_t>(s.N * s.C)), b(a.size());
    for (std::size_t r = 0; r < a.size(); ++r) {
      a[r] = 1.0 / static_cast<double>(r + 3);
      b[r] = -0.25 / static_cast<double>(r + 1);
    }
    cpu::dice_backward(lb, dx_ref.data<float>(), s.N, s.C, s.V, a.data(), b.data());
    emulate_dice_backward(lb, dx.data<float>(), s.N, s.C, s.V, a.data(), b.data());
    CHECK(values<float>(dx) == values<float>(dx_ref));
  }
}

TEST_CASE("cuda loss math: reduction and grid geometry") {
  std::int64_t bx, by;
  lm::row_grid(2 * 105, 128 * 128 * 128, 256, bx, by);
  CHECK(bx == 1024);
  CHECK(by == 210);
  lm::row_grid(100000, 3, 256, bx, by);
  CHECK(bx == 1);
  CHECK(by == 65535);
  CHECK(lm::reduce_blocks(0) == 1);
  CHECK(lm::reduce_blocks(1) == 1);
  CHECK(lm::reduce_blocks(257) == 2);
  CHECK(lm::reduce_blocks(2 * 128 * 128 * 128) == lm::kMaxReduceBlocks);
  // STU-Net's 128^3 rows: 64 chunks of 32768 voxels, covering every voxel once.
  const std::int64_t V = 128 * 128 * 128;
  const std::int64_t chunks = lm::dice_chunks(V);
  CHECK(chunks == 64);
  for (std::int64_t W : {V, std::int64_t{1}, std::int64_t{8193}, std::int64_t{42735}, std::int64_t{100003}}) {
    const std::int64_t k_n = lm::dice_chunks(W);
    std::int64_t covered = 0, prev_end = 0;
    for (std::int64_t k = 0; k < k_n; ++k) {
      std::int64_t b, e;
      lm::chunk_range(k, k_n, W, b, e);
      CHECK(b == prev_end);
      CHECK(e >= b);
      covered += e - b;
      prev_end = e;
    }
    CHECK(covered == W);
  }
}
