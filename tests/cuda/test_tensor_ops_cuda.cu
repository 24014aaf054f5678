// GPU tests of the tensor_ops kernels (include/stunet/cuda/tensor_ops.cuh),
// through the kernel table, against the host's copies, fills and sums.
// Copies, conversions and fills must be bit-identical to the host's (the
// kernels convert exactly as from_double(to_double(v))); arithmetic is
// compared with the tolerances stated at each check.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../testing.hpp"
#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cpu/elementwise.hpp"

using stunet::Device;
using stunet::DType;
using stunet::Shape;
using stunet::Tensor;

namespace {

const Device kGpu = Device::cuda(0);

stunet::CudaKernels& kernels() { return stunet::cuda_kernels(); }

stunet::detail::Loop5 loop_of(const Tensor& t) { return stunet::detail::pad_to_5(t.shape(), t.strides()); }

std::vector<unsigned char> bytes_of(const Tensor& host) {
  const Tensor c = host.contiguous();
  std::vector<unsigned char> b(c.nbytes());
  if (!b.empty()) std::memcpy(b.data(), c.raw_data(), b.size());
  return b;
}

/// A view with the axes permuted (out axis i = axis perm[i]).
Tensor permuted(const Tensor& base, const std::vector<int>& perm) {
  Shape shape = base.shape(), strides = base.strides();
  for (std::size_t i = 0; i < perm.size(); ++i) {
    shape[static_cast<int>(i)] = base.shape()[perm[i]];
    strides[static_cast<int>(i)] = base.strides()[perm[i]];
  }
  return stunet::make_view(base, shape, strides, base.storage_offset());
}

/// A view reversed along `dims`: negative strides, offset at the far end.
Tensor flipped(const Tensor& base, const std::vector<int>& dims) {
  Shape strides = base.strides();
  std::int64_t offset = base.storage_offset();
  for (int d : dims) {
    offset += (base.shape()[d] - 1) * strides[d];
    strides[d] = -strides[d];
  }
  return stunet::make_view(base, base.shape(), strides, offset);
}

/// The GPU's strided_copy of a device view into a fresh dense device tensor of `to`.
Tensor gpu_copy(const Tensor& view, DType to) {
  Tensor out = Tensor::empty(view.shape(), to, kGpu);
  kernels().strided_copy(out.raw_data(), to, loop_of(out), view.raw_data(), view.dtype(), loop_of(view), 0);
  return out;
}

/// The same copy on the host (detail::host_copy) of the same view of the host tensor.
Tensor host_copy(const Tensor& view, DType to) {
  Tensor out = Tensor::empty(view.shape(), to);
  stunet::detail::host_copy(out, view);
  return out;
}

/// Values that every dtype holds: [-100, 100) for signed, [0, 250) for u8.
Tensor sample(const Shape& shape, DType t, std::uint64_t seed) {
  const bool unsigned_ = t == DType::u8;
  return stunet::testing::random_tensor(shape, DType::f64, seed, unsigned_ ? 0.0 : -100.0, unsigned_ ? 250.0 : 100.0)
      .to(t);
}

const DType kAll[] = {DType::f32, DType::f64, DType::f16, DType::bf16, DType::i64, DType::i32, DType::u8};
const DType kFloat[] = {DType::f64, DType::f32, DType::f16, DType::bf16};

}  // namespace

TEST_CASE("cuda tensor_ops: the table entries are registered") {
  CHECK((kernels().strided_copy != nullptr));
  CHECK((kernels().fill != nullptr));
  CHECK((kernels().add != nullptr));
  CHECK((kernels().scale != nullptr));
  CHECK((kernels().sum != nullptr));
  CHECK((kernels().sum_squares != nullptr));
  CHECK((kernels().argmax_channels != nullptr));
}

TEST_CASE("cuda tensor_ops: strided_copy of permuted, flipped and box views is bit-exact") {
  const Shape shape{2, 3, 5, 7, 9};
  for (DType t : kAll) {
    const std::string dtype(stunet::dtype_name(t));
    CAPTURE(dtype);
    const Tensor h = sample(shape, t, 1);
    const Tensor d = h.to(kGpu);
    SUBCASE("dense (one cudaMemcpyAsync)") { CHECK(bytes_of(gpu_copy(d, t).to(Device::cpu())) == bytes_of(h)); }
    SUBCASE("permuted") {
      for (const std::vector<int>& perm : {std::vector<int>{0, 4, 2, 3, 1}, std::vector<int>{4, 3, 2, 1, 0}}) {
        CHECK(bytes_of(gpu_copy(permuted(d, perm), t).to(Device::cpu())) == bytes_of(host_copy(permuted(h, perm), t)));
      }
    }
    SUBCASE("flipped (negative strides)") {
      for (const std::vector<int>& dims : {std::vector<int>{4}, std::vector<int>{2, 3, 4}, std::vector<int>{0, 1}}) {
        CHECK(bytes_of(gpu_copy(flipped(d, dims), t).to(Device::cpu())) == bytes_of(host_copy(flipped(h, dims), t)));
      }
    }
    SUBCASE("an offset box view") {
      const Tensor big_h = sample(Shape{3, 4, 6, 8, 10}, t, 2);
      const Tensor big_d = big_h.to(kGpu);
      const Tensor box_h = big_h.box({1, 1, 1, 2, 3}, shape), box_d = big_d.box({1, 1, 1, 2, 3}, shape);
      CHECK(bytes_of(gpu_copy(box_d, t).to(Device::cpu())) == bytes_of(host_copy(box_h, t)));
      // And into a box of a larger destination (tile write-back, concat slice): the rest stays.
      Tensor dst_h = sample(Shape{2, 7, 5, 7, 9}, t, 3);
      Tensor dst_d = dst_h.to(kGpu);
      Tensor slice_d = dst_d.box({0, 2, 0, 0, 0}, shape), slice_h = dst_h.box({0, 2, 0, 0, 0}, shape);
      kernels().strided_copy(slice_d.raw_data(), t, loop_of(slice_d), box_d.raw_data(), t, loop_of(box_d), 0);
      stunet::detail::host_copy(slice_h, box_h);
      CHECK(bytes_of(dst_d.to(Device::cpu())) == bytes_of(dst_h));
    }
  }
}

TEST_CASE("cuda tensor_ops: strided_copy converts between every pair of dtypes as the host does") {
  const Shape shape{2, 3, 5, 7, 9};
  for (DType from : kAll)
    for (DType to : kAll) {
      if (from == to) continue;
      const std::string what = std::string(stunet::dtype_name(from)) + " -> " + std::string(stunet::dtype_name(to));
      CAPTURE(what);
      // u8 on either side: values in [0, 250) so that no conversion overflows.
      const Tensor h = sample(shape, from == DType::u8 || to == DType::u8 ? DType::u8 : from, 4).to(from);
      const Tensor d = h.to(kGpu);
      CHECK(bytes_of(gpu_copy(d, to).to(Device::cpu())) == bytes_of(host_copy(h, to)));
      const Tensor pd = flipped(permuted(d, {0, 4, 2, 3, 1}), {1});
      const Tensor ph = flipped(permuted(h, {0, 4, 2, 3, 1}), {1});
      CHECK(bytes_of(gpu_copy(pd, to).to(Device::cpu())) == bytes_of(host_copy(ph, to)));
    }
}

TEST_CASE("cuda tensor_ops: a large flip runs the grid-stride loop and matches the host") {
  const Shape shape{2, 32, 64, 64, 64};  // 16.8 M elements
  const Tensor h = stunet::testing::random_tensor(shape, DType::f32, 5);
  const Tensor d = h.to(kGpu);
  CHECK(bytes_of(gpu_copy(flipped(d, {2, 3, 4}), DType::f32).to(Device::cpu())) ==
        bytes_of(host_copy(flipped(h, {2, 3, 4}), DType::f32)));
  CHECK(bytes_of(gpu_copy(flipped(d, {2, 3, 4}), DType::f16).to(Device::cpu())) ==
        bytes_of(host_copy(flipped(h, {2, 3, 4}), DType::f16)));
}

TEST_CASE("cuda tensor_ops: fill of dense and box views equals the host's fill_") {
  for (DType t : kAll) {
    const std::string dtype(stunet::dtype_name(t));
    CAPTURE(dtype);
    for (double value : {0.0, 42.625, -3.0}) {
      if (t == DType::u8 && value < 0) continue;
      CAPTURE(value);
      Tensor h = sample(Shape{3, 4, 6, 8, 10}, t, 6);
      Tensor d = h.to(kGpu);
      Tensor box_h = h.box({1, 1, 2, 1, 3}, Shape{2, 3, 3, 5, 7}), box_d = d.box({1, 1, 2, 1, 3}, Shape{2, 3, 3, 5, 7});
      box_h.fill_(value);
      kernels().fill(box_d.raw_data(), t, loop_of(box_d), value, 0);
      CHECK(bytes_of(d.to(Device::cpu())) == bytes_of(h));
      Tensor dense = Tensor::empty(Shape{1001}, t, kGpu);
      kernels().fill(dense.raw_data(), t, loop_of(dense), value, 0);
      CHECK(bytes_of(dense.to(Device::cpu())) == bytes_of(Tensor::full(Shape{1001}, value, t)));
    }
  }
}

TEST_CASE("cuda tensor_ops: add (in place too) and scale") {
  // Tolerances relative to max |ref|, ref computed in double from the same
  // (rounded) inputs: f64 and f32 differ from it only by the final rounding
  // (and an FMA), the 16-bit types by one rounding of a float result to
  // 11 (f16) or 8 (bf16) significant bits: 2^-11 and 2^-8 relative.
  const double tol[] = {1e-15, 2e-7, 1e-3, 8e-3};
  const std::int64_t n = 100003;
  for (int k = 0; k < 4; ++k) {
    const DType t = kFloat[k];
    const std::string dtype(stunet::dtype_name(t));
    CAPTURE(dtype);
    const Tensor a = stunet::testing::random_tensor(Shape{n}, DType::f64, 7).to(t);
    const Tensor b = stunet::testing::random_tensor(Shape{n}, DType::f64, 8).to(t);
    const std::vector<double> va = a.to_vector<double>(), vb = b.to_vector<double>();
    for (double alpha : {1.0, -0.75}) {
      CAPTURE(alpha);
      std::vector<double> ref(va.size());
      for (std::size_t i = 0; i < va.size(); ++i) ref[i] = va[i] + alpha * vb[i];
      const Tensor ref_t = Tensor::from_vector<double>(ref, Shape{n});
      // out separate, packed (aligned) path.
      Tensor da = a.to(kGpu), db = b.to(kGpu), out = Tensor::empty(Shape{n}, t, kGpu);
      kernels().add(t, da.raw_data(), db.raw_data(), alpha, out.raw_data(), n, 0);
      CHECK(stunet::testing::max_rel_diff(out.to(Device::cpu()), ref_t) <= tol[k]);
      // In place (out == a), as gradient accumulation.
      kernels().add(t, da.raw_data(), db.raw_data(), alpha, da.raw_data(), n, 0);
      CHECK(bytes_of(da.to(Device::cpu())) == bytes_of(out.to(Device::cpu())));
      // Misaligned pointers (one element in): the element-by-element path, same values.
      Tensor da2 = a.to(kGpu);
      const std::size_t es = stunet::dtype_size(t);
      kernels().add(t, static_cast<char*>(da2.raw_data()) + es, static_cast<char*>(db.raw_data()) + es, alpha,
                    static_cast<char*>(da2.raw_data()) + es, n - 1, 0);
      const std::vector<unsigned char> got = bytes_of(da2.to(Device::cpu())), want = bytes_of(out.to(Device::cpu()));
      CHECK(std::memcmp(got.data() + es, want.data() + es, got.size() - es) == 0);
      CHECK(std::memcmp(got.data(), bytes_of(a).data(), es) == 0);  // element 0 untouched
    }
    // scale, in place.
    Tensor dx = a.to(kGpu);
    kernels().scale(t, dx.raw_data(), -0.3, dx.raw_data(), n, 0);
    std::vector<double> ref(va.size());
    for (std::size_t i = 0; i < va.size(); ++i) ref[i] = -0.3 * va[i];
    CHECK(stunet::testing::max_rel_diff(dx.to(Device::cpu()), Tensor::from_vector<double>(ref, Shape{n})) <= tol[k]);
  }
}

TEST_CASE("cuda tensor_ops: sum and sum_squares are accurate and bit-reproducible") {
  for (std::int64_t n : {std::int64_t{1}, std::int64_t{4097}, std::int64_t{1000001}}) {
    for (DType t : kFloat) {
      const std::string dtype(stunet::dtype_name(t));
      CAPTURE(dtype);
      CAPTURE(n);
      const Tensor h = stunet::testing::random_tensor(Shape{n}, DType::f64, 9, -1.0, 3.0).to(t);
      const Tensor d = h.to(kGpu);
      const std::vector<double> v = h.to_vector<double>();
      double ref = 0, ref_sq = 0, abs_sum = 0;
      for (double x : v) {
        ref += x;
        ref_sq += x * x;
        abs_sum += std::abs(x);
      }
      // Both accumulate the same (exactly converted) values in double; only
      // the order differs: a few units of 1e-16 of the sum of magnitudes.
      const double s1 = kernels().sum(t, d.raw_data(), n, 0);
      const double s2 = kernels().sum(t, d.raw_data(), n, 0);
      CHECK(std::abs(s1 - ref) <= 1e-13 * abs_sum);
      CHECK(std::memcmp(&s1, &s2, sizeof(double)) == 0);
      const double q1 = kernels().sum_squares(t, d.raw_data(), n, 0);
      const double q2 = kernels().sum_squares(t, d.raw_data(), n, 0);
      CHECK(std::abs(q1 - ref_sq) <= 1e-13 * ref_sq);
      CHECK(std::memcmp(&q1, &q2, sizeof(double)) == 0);
      if (t == DType::f32) CHECK(std::abs(s1 - stunet::cpu::sum(h.data<float>(), n)) <= 1e-13 * abs_sum);
    }
  }
  // Non-finite values reach the result (the trainer stops on them).
  std::vector<float> v(5000, 0.5f);
  v[4321] = std::numeric_limits<float>::infinity();
  const Tensor d = Tensor::from_vector<float>(v, Shape{5000}).to(kGpu);
  CHECK(std::isinf(kernels().sum_squares(DType::f32, d.raw_data(), 5000, 0)));
  v[17] = std::numeric_limits<float>::quiet_NaN();
  const Tensor dn = Tensor::from_vector<float>(v, Shape{5000}).to(kGpu);
  CHECK(std::isnan(kernels().sum(DType::f32, dn.raw_data(), 5000, 0)));
  CHECK(kernels().sum(DType::f32, dn.raw_data(), 0, 0) == 0.0);
}

TEST_CASE("cuda tensor_ops: argmax_channels picks the first maximum, NaN first") {
  const std::int64_t N = 2, C = 5, V = 1001;
  std::mt19937 rng(10);
  std::uniform_int_distribution<int> level(0, 2);  // few levels: many ties
  std::vector<double> x(static_cast<std::size_t>(N * C * V));
  for (auto& v : x) v = level(rng) * 0.5;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  x[3] = nan;
  x[(0 * C + 2) * V + 5] = nan;
  x[(0 * C + 4) * V + 5] = nan;
  x[(1 * C + 3) * V + 9] = std::numeric_limits<double>::infinity();
  x[(1 * C + 1) * V + 9] = nan;
  std::vector<std::int32_t> expected(static_cast<std::size_t>(N * V));
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t v = 0; v < V; ++v) {
      auto at = [&](std::int64_t c) { return x[static_cast<std::size_t>((n * C + c) * V + v)]; };
      int e = -1;
      for (std::int64_t c = 0; c < C && e < 0; ++c)
        if (std::isnan(at(c))) e = static_cast<int>(c);
      if (e < 0) {
        e = 0;
        for (std::int64_t c = 1; c < C; ++c)
          if (at(c) > at(e)) e = static_cast<int>(c);
      }
      expected[static_cast<std::size_t>(n * V + v)] = e;
    }
  for (DType t : kFloat) {
    const std::string dtype(stunet::dtype_name(t));
    CAPTURE(dtype);
    const Tensor d = Tensor::from_vector<double>(x, Shape{N, C, V}).to(t).to(kGpu);  // 0, 0.5, 1: exact in every type
    Tensor out = Tensor::empty(Shape{N, V}, DType::i32, kGpu);
    kernels().argmax_channels(t, d.raw_data(), out.data<std::int32_t>(), N, C, V, 0);
    CHECK(out.to(Device::cpu()).to_vector<std::int32_t>() == expected);
  }
}
