// Host emulation of the tensor_ops CUDA kernels (include/stunet/cuda/tensor_ops.cuh):
// the index math of tensor_ops_math.hpp run over whole index spaces, in the
// order of the kernels' grid-stride loops, against the host's own copies,
// fills, sums and a torch.argmax reference. Checks the kernels' arithmetic on
// machines without a GPU; tests/cuda/test_tensor_ops_cuda.cu runs the kernels.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../testing.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cpu/elementwise.hpp"
#include "stunet/cpu/shape_ops.hpp"
#include "stunet/cuda/tensor_ops_math.hpp"

using stunet::DType;
using stunet::Shape;
using stunet::Tensor;
namespace sc = stunet::cuda;

namespace {

stunet::detail::Loop5 loop_of(const Tensor& t) { return stunet::detail::pad_to_5(t.shape(), t.strides()); }

/// What strided_copy_kernel<TD, TS, I> does, one linear index after another:
/// collapse the two views, decode each index, convert as convert_element
/// (same dtype: the element as is; otherwise from_double(to_double)).
/// Returns how many times each destination offset was written.
template <class I> std::map<std::int64_t, int> emulate_strided_copy(const Tensor& dst, const Tensor& src) {
  const auto ld = loop_of(dst), ls = loop_of(src);
  const std::int64_t* strides[2] = {ld.s, ls.s};
  const sc::StridedIndex<2> ix = sc::collapse_strided<2>(ld.n, strides);
  const std::int64_t total = dst.numel();
  std::map<std::int64_t, int> writes;
  stunet::dispatch_all(dst.dtype(), [&]<class TD>() {
    stunet::dispatch_all(src.dtype(), [&]<class TS>() {
      TD* d = static_cast<TD*>(dst.raw_data());
      const TS* s = static_cast<const TS*>(src.raw_data());
      for (I i = 0; i < static_cast<I>(total); ++i) {
        std::int64_t off[2];
        sc::strided_offsets<I, 2>(ix, i, off);
        if constexpr (std::is_same_v<TD, TS>) d[off[0]] = s[off[1]];
        else d[off[0]] = stunet::from_double<TD>(stunet::to_double(s[off[1]]));
        ++writes[off[0]];
      }
    });
  });
  return writes;
}

/// Bytes of a whole storage (including what lies outside a view).
std::vector<unsigned char> storage_bytes(const Tensor& base) {
  std::vector<unsigned char> b(base.nbytes());
  std::memcpy(b.data(), base.raw_data(), b.size());
  return b;
}

/// Copies src into the view dst_view_of(base) twice (host_copy and the
/// emulation, on two copies of the destination storage) and checks that the
/// storages are byte-identical and that every destination element was written once.
template <class ViewFn> void check_copy(const Tensor& dst_base, ViewFn dst_view_of, const Tensor& src) {
  for (int index_bits : {32, 64}) {
    CAPTURE(index_bits);
    Tensor ref_base = dst_base.clone(), emu_base = dst_base.clone();
    Tensor ref = dst_view_of(ref_base), emu = dst_view_of(emu_base);
    REQUIRE(ref.shape() == src.shape());
    stunet::detail::host_copy(ref, src);
    const auto writes =
        index_bits == 32 ? emulate_strided_copy<std::int32_t>(emu, src) : emulate_strided_copy<std::int64_t>(emu, src);
    CHECK(static_cast<std::int64_t>(writes.size()) == src.numel());
    bool once = true;
    for (const auto& [off, count] : writes) once &= count == 1;
    CHECK(once);
    CHECK(storage_bytes(ref_base) == storage_bytes(emu_base));
  }
}

/// A view of `base` with the axes permuted: out axis i is base axis perm[i].
Tensor permuted(const Tensor& base, const std::vector<int>& perm) {
  Shape shape = base.shape(), strides = base.strides();
  for (std::size_t i = 0; i < perm.size(); ++i) {
    shape[static_cast<int>(i)] = base.shape()[perm[i]];
    strides[static_cast<int>(i)] = base.strides()[perm[i]];
  }
  return stunet::make_view(base, shape, strides, base.storage_offset());
}

/// A view of `base` reversed along `dims` (negative strides, as ops flip() on a GPU).
Tensor flipped(const Tensor& base, const std::vector<int>& dims) {
  Shape strides = base.strides();
  std::int64_t offset = base.storage_offset();
  for (int d : dims) {
    offset += (base.shape()[d] - 1) * strides[d];
    strides[d] = -strides[d];
  }
  return stunet::make_view(base, base.shape(), strides, offset);
}

sc::StridedIndex<2> collapsed(const Tensor& dst, const Tensor& src) {
  const auto ld = loop_of(dst), ls = loop_of(src);
  const std::int64_t* strides[2] = {ld.s, ls.s};
  return sc::collapse_strided<2>(ld.n, strides);
}

/// Pairwise sum of v (a fixed tree, standing in for CUB's block reduction:
/// the order differs, so sums are compared with a tolerance, never bitwise).
double tree_sum(std::vector<double> v) {
  while (v.size() > 1) {
    std::vector<double> next((v.size() + 1) / 2);
    for (std::size_t i = 0; i < next.size(); ++i) next[i] = v[2 * i] + (2 * i + 1 < v.size() ? v[2 * i + 1] : 0.0);
    v.swap(next);
  }
  return v.empty() ? 0.0 : v[0];
}

/// sum_partials_kernel + sum_final_kernel: sum_blocks(n) blocks of kSumThreads
/// threads, each thread adding elements block * threads + t + k * stride.
template <bool Squares, class T> double emulate_sum(const T* x, std::int64_t n, std::vector<int>* hits) {
  const int blocks = sc::sum_blocks(n);
  const std::int64_t stride = static_cast<std::int64_t>(blocks) * sc::kSumThreads;
  std::vector<double> partial(static_cast<std::size_t>(sc::kSumMaxBlocks), 0.0);
  for (int b = 0; b < blocks; ++b) {
    std::vector<double> per_thread(sc::kSumThreads, 0.0);
    for (int t = 0; t < sc::kSumThreads; ++t)
      for (std::int64_t i = static_cast<std::int64_t>(b) * sc::kSumThreads + t; i < n; i += stride) {
        per_thread[static_cast<std::size_t>(t)] += sc::sum_term<Squares>(static_cast<double>(x[i]));
        if (hits) ++(*hits)[static_cast<std::size_t>(i)];
      }
    partial[static_cast<std::size_t>(b)] = tree_sum(per_thread);
  }
  return tree_sum(partial);  // the final kernel: thread t holds partial t or 0
}

}  // namespace

TEST_CASE("cuda tensor_ops math: collapse merges what every view walks as one") {
  const Tensor a = stunet::testing::random_tensor(Shape{2, 3, 5, 7, 9}, DType::f32, 1);
  const Tensor dense = Tensor::empty(a.shape(), DType::f32);
  SUBCASE("two dense views: rank 1, a memcpy") {
    const auto ix = collapsed(dense, a);
    CHECK(ix.rank == 1);
    CHECK(ix.n[4] == a.numel());
    CHECK(sc::strided_is_dense(ix));
  }
  SUBCASE("a channel slice of a concat: rank 2") {
    Tensor big = Tensor::empty(Shape{2, 5, 5, 7, 9}, DType::f32);
    const auto ix = collapsed(big.box({0, 2, 0, 0, 0}, a.shape()), a);
    CHECK(ix.rank == 2);
    CHECK(ix.n[3] == 2);
    CHECK(ix.n[4] == 3 * 5 * 7 * 9);
    CHECK(ix.s[0][3] == 5 * 5 * 7 * 9);
    CHECK(ix.s[1][3] == 3 * 5 * 7 * 9);
    CHECK_FALSE(sc::strided_is_dense(ix));
  }
  SUBCASE("a flip along W keeps W apart, the rest merges") {
    const auto ix = collapsed(dense, flipped(a, {4}));
    CHECK(ix.rank == 2);
    CHECK(ix.s[1][4] == -1);
  }
  SUBCASE("extents of 1 vanish; one element is rank 0") {
    const Tensor one = Tensor::empty(Shape{1, 1, 1}, DType::f32);
    CHECK(collapsed(one, one).rank == 0);
    const Tensor col = Tensor::empty(Shape{4, 1, 6}, DType::f32);
    CHECK(collapsed(col, col).rank == 1);
  }
}

TEST_CASE("cuda tensor_ops math: strided_copy index math matches host_copy") {
  const Shape shape{2, 3, 5, 7, 9};
  const Tensor src32 = stunet::testing::random_tensor(shape, DType::f32, 11);
  const Tensor src64 = stunet::testing::random_tensor(shape, DType::f64, 12);
  auto whole = [](const Tensor& t) { return t; };

  SUBCASE("dense, same dtype") {
    check_copy(Tensor::zeros(shape, DType::f32), whole, src32);
    check_copy(Tensor::zeros(shape, DType::f64), whole, src64);
  }
  SUBCASE("permuted source views") {
    for (const std::vector<int>& perm : {std::vector<int>{0, 4, 2, 3, 1}, std::vector<int>{4, 3, 2, 1, 0},
                                         std::vector<int>{1, 0, 3, 2, 4}}) {
      const Tensor v32 = permuted(src32, perm), v64 = permuted(src64, perm);
      check_copy(Tensor::zeros(v32.shape(), DType::f32), whole, v32);
      check_copy(Tensor::zeros(v64.shape(), DType::f64), whole, v64);
    }
  }
  SUBCASE("flipped source views (negative strides) equal cpu::flip") {
    for (const std::vector<int>& dims : {std::vector<int>{4}, std::vector<int>{2, 4}, std::vector<int>{0, 1, 2, 3, 4},
                                         std::vector<int>{1, 3}}) {
      const Tensor v = flipped(src64, dims);
      check_copy(Tensor::zeros(shape, DType::f64), whole, v);
      // And the values are the mirror image: compare with cpu::flip.
      Tensor emu = Tensor::zeros(shape, DType::f64);
      emulate_strided_copy<std::int32_t>(emu, v);
      Tensor ref = Tensor::zeros(shape, DType::f64);
      bool flags[5] = {false, false, false, false, false};
      for (int d : dims) flags[d] = true;
      const std::int64_t n[5] = {2, 3, 5, 7, 9};
      stunet::cpu::flip(src64.data<double>(), ref.data<double>(), n, flags);
      CHECK(emu.to_vector<double>() == ref.to_vector<double>());
    }
  }
  SUBCASE("box views on either side") {
    const Tensor big = stunet::testing::random_tensor(Shape{3, 4, 6, 8, 10}, DType::f32, 13);
    const Tensor box = big.box({1, 1, 0, 2, 1}, Shape{2, 3, 5, 4, 7});
    check_copy(Tensor::zeros(box.shape(), DType::f32), whole, box);
    // Into a channel slice (concat) and into an interior box (tile write-back).
    check_copy(Tensor::full(Shape{2, 7, 5, 7, 9}, -3.0, DType::f32),
               [&](const Tensor& b) { return b.box({0, 4, 0, 0, 0}, shape); }, src32);
    check_copy(Tensor::full(Shape{3, 5, 8, 9, 11}, 7.0, DType::f32),
               [&](const Tensor& b) { return b.box({1, 1, 2, 1, 2}, shape); }, src32);
    // A flipped box into a box.
    check_copy(Tensor::full(Shape{3, 4, 6, 8, 10}, 1.0, DType::f32),
               [&](const Tensor& b) { return b.box({0, 0, 1, 1, 1}, box.shape()); }, flipped(box, {2, 3}));
  }
  SUBCASE("broadcast source (stride 0) and lower ranks") {
    const Tensor row = stunet::testing::random_tensor(Shape{9}, DType::f32, 14);
    const Tensor bcast = stunet::make_view(row, Shape{4, 3, 9}, Shape{0, 0, 1}, 0);
    check_copy(Tensor::zeros(Shape{4, 3, 9}, DType::f32), whole, bcast);
    const Tensor m = stunet::testing::random_tensor(Shape{7, 9}, DType::f64, 15);
    check_copy(Tensor::zeros(Shape{9, 7}, DType::f64), whole, permuted(m, {1, 0}));
    const Tensor scalar = stunet::testing::random_tensor(Shape{1}, DType::f64, 16);
    check_copy(Tensor::zeros(Shape{1}, DType::f64), whole, scalar);
  }
  SUBCASE("dtype conversions, dense and permuted") {
    const Tensor wide = stunet::testing::random_tensor(shape, DType::f64, 17, -300.0, 300.0);
    const Tensor small = stunet::testing::random_tensor(shape, DType::f64, 18, 0.0, 255.0);
    const std::vector<std::pair<DType, DType>> pairs = {
        {DType::f64, DType::f32}, {DType::f64, DType::f16}, {DType::f64, DType::bf16}, {DType::f64, DType::i32},
        {DType::f64, DType::i64}, {DType::f32, DType::f16}, {DType::f16, DType::f32}, {DType::bf16, DType::f64},
        {DType::i64, DType::f32}, {DType::i32, DType::bf16}, {DType::u8, DType::f32}, {DType::f32, DType::u8}};
    for (const auto& [from, to] : pairs) {
      const std::string what = std::string(stunet::dtype_name(from)) + " -> " + std::string(stunet::dtype_name(to));
      CAPTURE(what);
      const Tensor s = ((to == DType::u8 || from == DType::u8) ? small : wide).to(from);
      check_copy(Tensor::zeros(shape, to), whole, s);
      const Tensor p = permuted(s, {0, 4, 2, 3, 1});
      check_copy(Tensor::zeros(p.shape(), to), whole, p);
    }
  }
}

TEST_CASE("cuda tensor_ops math: fill over a strided view matches fill_") {
  for (DType t : {DType::f32, DType::f64, DType::f16, DType::i32, DType::u8}) {
    const std::string dtype(stunet::dtype_name(t));
    CAPTURE(dtype);
    Tensor ref_base = Tensor::zeros(Shape{3, 4, 6, 8, 10}, t), emu_base = ref_base.clone();
    Tensor ref = ref_base.box({1, 1, 2, 1, 3}, Shape{2, 3, 3, 5, 7});
    Tensor emu = emu_base.box({1, 1, 2, 1, 3}, Shape{2, 3, 3, 5, 7});
    ref.fill_(42.625);
    // fill_kernel: the value's bit pattern written at every decoded offset.
    const auto l = loop_of(emu);
    const std::int64_t* strides[1] = {l.s};
    const sc::StridedIndex<1> ix = sc::collapse_strided<1>(l.n, strides);
    CHECK(ix.rank == 5);  // a box of a larger tensor: no two dimensions merge
    stunet::dispatch_all(t, [&]<class T>() {
      const T v = stunet::from_double<T>(42.625);
      T* p = static_cast<T*>(emu.raw_data());
      for (std::int32_t i = 0; i < static_cast<std::int32_t>(emu.numel()); ++i) {
        std::int64_t off[1];
        sc::strided_offsets<std::int32_t, 1>(ix, i, off);
        p[off[0]] = v;
      }
    });
    CHECK(storage_bytes(ref_base) == storage_bytes(emu_base));
  }
}

TEST_CASE("cuda tensor_ops math: the sum partition covers every element once and matches cpu::sum") {
  CHECK(sc::sum_blocks(0) == 1);
  CHECK(sc::sum_blocks(1) == 1);
  CHECK(sc::sum_blocks(4096) == 1);
  CHECK(sc::sum_blocks(4097) == 2);
  CHECK(sc::sum_blocks(std::int64_t{1} << 40) == sc::kSumMaxBlocks);
  for (std::int64_t n : {std::int64_t{1}, std::int64_t{255}, std::int64_t{4097}, std::int64_t{1000001}}) {
    CAPTURE(n);
    const Tensor x32 = stunet::testing::random_tensor(Shape{n}, DType::f32, 21, -1.0, 3.0);
    const Tensor x64 = stunet::testing::random_tensor(Shape{n}, DType::f64, 22, -1.0, 3.0);
    std::vector<int> hits(static_cast<std::size_t>(n), 0);
    const double s32 = emulate_sum<false>(x32.data<float>(), n, &hits);
    bool once = true;
    for (int h : hits) once &= h == 1;
    CHECK(once);
    const double ref32 = stunet::cpu::sum(x32.data<float>(), n);
    CHECK(std::abs(s32 - ref32) <= 1e-12 * std::max(1.0, std::abs(ref32)) * std::sqrt(static_cast<double>(n)));
    const double s64 = emulate_sum<false>(x64.data<double>(), n, nullptr);
    const double ref64 = stunet::cpu::sum(x64.data<double>(), n);
    CHECK(std::abs(s64 - ref64) <= 1e-12 * std::max(1.0, std::abs(ref64)) * std::sqrt(static_cast<double>(n)));
    // sum_squares, as clip_grad_norm adds it on the host.
    double sq = 0.0;
    for (std::int64_t i = 0; i < n; ++i) sq += static_cast<double>(x32.data<float>()[i]) * x32.data<float>()[i];
    const double e_sq = emulate_sum<true>(x32.data<float>(), n, nullptr);
    CHECK(std::abs(e_sq - sq) <= 1e-12 * sq * std::sqrt(static_cast<double>(n)));
  }
  // A NaN or an infinity reaches the result (the trainer's check relies on it).
  std::vector<float> v(5000, 1.0f);
  v[4321] = std::numeric_limits<float>::infinity();
  CHECK(std::isinf(emulate_sum<true>(v.data(), 5000, nullptr)));
  v[17] = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(emulate_sum<false>(v.data(), 5000, nullptr)));
}

TEST_CASE("cuda tensor_ops math: add and scale in place, packed and one by one") {
  // map2_kernel / map1_kernel: groups of V elements, then the n % V tail; out aliases a (or x).
  for (std::int64_t n : {std::int64_t{1}, std::int64_t{3}, std::int64_t{1003}}) {
    for (int V : {1, 4}) {
      CAPTURE(n);
      CAPTURE(V);
      const Tensor a = stunet::testing::random_tensor(Shape{n}, DType::f32, 31);
      const Tensor b = stunet::testing::random_tensor(Shape{n}, DType::f32, 32);
      for (double alpha : {1.0, -0.5}) {
        std::vector<float> out = a.to_vector<float>();  // out == a
        const float* bp = b.data<float>();
        auto op = [&](std::int64_t i) {
          float& o = out[static_cast<std::size_t>(i)];
          o = sc::axpy_value<float>(o, bp[i], static_cast<float>(alpha));
        };
        const std::int64_t groups = n / V;
        for (std::int64_t j = 0; j < groups; ++j)
          for (int k = 0; k < V; ++k) op(j * V + k);
        for (std::int64_t i = groups * V; i < n; ++i) op(i);
        if (alpha == 1.0) {
          Tensor ref = Tensor::empty(Shape{n}, DType::f32);
          stunet::cpu::add(a.data<float>(), b.data<float>(), ref.data<float>(), n);
          CHECK(out == ref.to_vector<float>());  // a + 1 * b is exactly a + b
        } else {
          double worst = 0.0;
          for (std::int64_t i = 0; i < n; ++i)
            worst = std::max(worst, std::abs(out[static_cast<std::size_t>(i)] -
                                             (static_cast<double>(a.data<float>()[i]) + alpha * bp[i])));
          CHECK(worst <= 4e-7);  // float rounding (with or without FMA) of values below 2
        }
      }
      std::vector<float> x = a.to_vector<float>();
      Tensor ref = Tensor::empty(Shape{n}, DType::f32);
      stunet::cpu::scale(a.data<float>(), 0.25f, ref.data<float>(), n);
      for (auto& v : x) v = 0.25f * v;
      CHECK(x == ref.to_vector<float>());
    }
  }
}

TEST_CASE("cuda tensor_ops math: argmax over channels as torch.argmax (first maximum, NaN wins)") {
  const std::int64_t N = 2, C = 5, V = 37;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> level(0, 2);  // few levels: many ties
  std::vector<double> x(static_cast<std::size_t>(N * C * V));
  for (auto& v : x) v = level(rng);
  x[3] = std::numeric_limits<double>::quiet_NaN();                   // n 0, c 0, v 3: NaN at the first channel
  x[(0 * C + 2) * V + 5] = std::numeric_limits<double>::quiet_NaN();  // n 0, v 5: NaN at c 2 ...
  x[(0 * C + 4) * V + 5] = std::numeric_limits<double>::quiet_NaN();  // ... and c 4: the first one wins
  x[(1 * C + 3) * V + 9] = std::numeric_limits<double>::infinity();
  x[(1 * C + 1) * V + 9] = std::numeric_limits<double>::quiet_NaN();  // NaN beats +inf
  auto check = [&]<class A>() {
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t v = 0; v < V; ++v) {
        auto at = [&](std::int64_t c) { return static_cast<A>(x[static_cast<std::size_t>((n * C + c) * V + v)]); };
        // The kernel's loop.
        A best = at(0);
        int arg = 0;
        for (std::int64_t c = 1; c < C; ++c)
          if (sc::argmax_takes(at(c), best)) {
            best = at(c);
            arg = static_cast<int>(c);
          }
        // torch.argmax: the first NaN if any, else the first maximum.
        int expected = -1;
        for (std::int64_t c = 0; c < C && expected < 0; ++c)
          if (std::isnan(at(c))) expected = static_cast<int>(c);
        if (expected < 0) {
          expected = 0;
          for (std::int64_t c = 1; c < C; ++c)
            if (at(c) > at(expected)) expected = static_cast<int>(c);
        }
        CHECK(arg == expected);
      }
  };
  check.operator()<float>();
  check.operator()<double>();
}
