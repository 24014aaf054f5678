// Tensors: creation, dtypes and their conversions, views, copies, errors.
#include <bit>
#include <cmath>
#include <limits>

#include "testing.hpp"
#include "stunet/ops/elementwise.hpp"

using namespace stunet;
using doctest::Contains;

TEST_CASE("creation: shapes, strides, fill values") {
  Tensor t = Tensor::zeros({2, 3, 4, 5, 6});
  CHECK(t.rank() == 5);
  CHECK(t.numel() == 720);
  CHECK(t.strides() == Shape{360, 120, 30, 6, 1});
  CHECK(t.is_contiguous());
  CHECK(t.dtype() == DType::f32);
  CHECK(t.device() == Device::cpu());
  CHECK(t.at({1, 2, 3, 4, 5}) == 0.0);
  CHECK(t.size(-1) == 6);
  CHECK(Tensor::full({3}, 2.5, DType::f64).at({2}) == 2.5);
  CHECK(Tensor::ones({2, 2}, DType::u8).at({1, 1}) == 1.0);
  CHECK(Tensor::full({}, 7.0).item() == 7.0);  // rank 0 holds one element
  CHECK(reinterpret_cast<std::uintptr_t>(t.raw_data()) % Storage::kAlignment == 0);
  CHECK_THROWS_WITH_AS(Tensor::empty({2, -1}), Contains("[2, -1]"), Error);
  CHECK_THROWS_WITH_AS((Shape{1, 2, 3, 4, 5, 6}), Contains("rank 6"), Error);
  CHECK_THROWS_WITH_AS(t.size(5), Contains("[2, 3, 4, 5, 6]"), Error);
  CHECK_THROWS_WITH_AS(Tensor::from_vector<float>({1, 2, 3}, {2, 2}), Contains("[2, 2]"), Error);
}

TEST_CASE("every dtype stores and reads back its values") {
  for (DType d : {DType::f32, DType::f64, DType::f16, DType::bf16, DType::i64, DType::i32, DType::u8}) {
    CAPTURE(dtype_name(d));
    Tensor t = Tensor::from_vector<double>({0, 1, 2, 3, 100, 7}, {2, 3}).to(d);
    CHECK(t.dtype() == d);
    CHECK(t.nbytes() == 6 * dtype_size(d));
    CHECK(t.to_vector<double>() == std::vector<double>{0, 1, 2, 3, 100, 7});
  }
}

TEST_CASE("float16: IEEE rounding, limits, subnormals, exhaustive round trip") {
  CHECK(f16(1.0f).bits == 0x3C00);
  CHECK(f16(-2.0f).bits == 0xC000);
  CHECK(f16(65504.0f).bits == 0x7BFF);                 // largest finite
  CHECK(f16(65520.0f).bits == 0x7C00);                 // rounds to inf
  CHECK(f16(std::ldexp(1.0f, -24)).bits == 0x0001);    // smallest subnormal
  CHECK(f16(std::ldexp(1.0f, -25)).bits == 0x0000);    // tie -> even (zero)
  CHECK(f16(std::ldexp(1.5f, -25)).bits == 0x0001);    // above the tie
  CHECK(f16(std::ldexp(1.0f, -14)).bits == 0x0400);    // smallest normal
  CHECK(f16(1.0f + std::ldexp(1.0f, -11)).bits == 0x3C00);       // tie -> even
  CHECK(f16(1.0f + 3 * std::ldexp(1.0f, -11)).bits == 0x3C02);   // tie -> even (up)
  CHECK(std::isnan(static_cast<float>(f16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isinf(static_cast<float>(f16(std::numeric_limits<float>::infinity()))));
  int mismatches = 0;
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    if ((b & 0x7C00) == 0x7C00 && (b & 0x3FF)) continue;  // NaN payloads
    float v = f16::to_float(static_cast<std::uint16_t>(b));
    if (f16::from_float(v) != b) ++mismatches;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("bfloat16: round to nearest even from float32") {
  CHECK(bf16(1.0f).bits == 0x3F80);
  CHECK(bf16(std::bit_cast<float>(0x3F808000u)).bits == 0x3F80);  // tie -> even
  CHECK(bf16(std::bit_cast<float>(0x3F818000u)).bits == 0x3F82);  // tie -> even (up)
  CHECK(bf16(std::bit_cast<float>(0x3F808001u)).bits == 0x3F81);  // above the tie
  CHECK(std::isnan(static_cast<float>(bf16(std::numeric_limits<float>::quiet_NaN()))));
  for (std::uint32_t b = 0; b < 0x10000; b += 7) {
    if ((b & 0x7F80) == 0x7F80 && (b & 0x7F)) continue;
    CHECK(bf16::from_float(bf16::to_float(static_cast<std::uint16_t>(b))) == b);
  }
}

TEST_CASE("conversions between element types") {
  Tensor x = Tensor::from_vector<float>({-1.7f, 0.49f, 2.5f, 300.25f}, {4});
  CHECK(x.to(DType::i32).to_vector<double>() == std::vector<double>{-1, 0, 2, 300});  // truncation
  CHECK(x.to(DType::f64).to_vector<double>()[3] == 300.25);
  CHECK(x.to(DType::f16).to_vector<double>()[3] == 300.25);  // exactly representable
  CHECK(x.to(DType::bf16).to_vector<double>()[3] == 300.0);  // 8 bits of mantissa
  Tensor labels = Tensor::from_vector<std::int64_t>({0, 3, 104}, {3});
  CHECK(labels.to(DType::u8).to(DType::f32).to_vector<float>() == std::vector<float>{0, 3, 104});
}

TEST_CASE("data<T>() and item() check the dtype and element count") {
  Tensor t = Tensor::zeros({2, 2}, DType::f64);
  CHECK_NOTHROW(t.data<double>());
  CHECK_THROWS_WITH_AS(t.data<float>(), Contains("float64"), Error);
  CHECK_THROWS_WITH_AS(t.item(), Contains("[2, 2]"), Error);
  CHECK_THROWS_WITH_AS(t.at({0, 2}), Contains("out of range"), Error);
  CHECK_THROWS_WITH_AS(t.at({0}), Contains("1 indices"), Error);
  Tensor undefined;
  CHECK_FALSE(undefined.defined());
  CHECK_THROWS_AS(undefined.shape(), Error);
}

TEST_CASE("box views share storage: patch extraction and tile write-back") {
  // A 1x1x4x5x6 volume with value = 100*d + 10*h + w.
  std::vector<float> v;
  for (int d = 0; d < 4; ++d)
    for (int h = 0; h < 5; ++h)
      for (int w = 0; w < 6; ++w) v.push_back(static_cast<float>(100 * d + 10 * h + w));
  Tensor vol = Tensor::from_vector<float>(v, {1, 1, 4, 5, 6});
  Tensor patch = vol.box({0, 0, 1, 2, 3}, {1, 1, 2, 3, 3});
  CHECK(patch.shape() == Shape{1, 1, 2, 3, 3});
  CHECK_FALSE(patch.is_contiguous());
  CHECK(patch.storage() == vol.storage());
  CHECK(patch.at({0, 0, 0, 0, 0}) == 123.0);
  CHECK(patch.at({0, 0, 1, 2, 2}) == 245.0);
  Tensor dense = patch.contiguous();
  CHECK(dense.is_contiguous());
  CHECK(dense.storage() != vol.storage());
  CHECK(dense.to_vector<float>() == patch.to_vector<float>());
  // Write a tile back into a sub-box of another volume, converting dtype.
  Tensor out = Tensor::zeros({1, 1, 4, 5, 6}, DType::f64);
  out.box({0, 0, 1, 2, 3}, {1, 1, 2, 3, 3}).copy_(dense);
  CHECK(out.at({0, 0, 2, 4, 5}) == 245.0);
  CHECK(out.at({0, 0, 0, 0, 0}) == 0.0);
  CHECK(out.at({0, 0, 3, 4, 5}) == 0.0);
  double total = 0;
  for (double x : out.to_vector<double>()) total += x;
  double expected = 0;
  for (double x : dense.to_vector<double>()) expected += x;
  CHECK(total == expected);
  // A view of a view.
  CHECK(patch.box({0, 0, 1, 1, 1}, {1, 1, 1, 1, 1}).item() == 234.0);
  CHECK_THROWS_WITH_AS(vol.box({0, 0, 3, 0, 0}, {1, 1, 2, 5, 6}), Contains("[1, 1, 4, 5, 6]"), Error);
  CHECK_THROWS_WITH_AS(out.copy_(patch), Contains("[1, 1, 2, 3, 3]"), Error);
}

TEST_CASE("reshape: a view when contiguous, a copy otherwise") {
  Tensor x = Tensor::from_vector<float>({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor r = x.reshape({3, 2});
  CHECK(r.storage() == x.storage());
  CHECK(r.at({2, 1}) == 6.0);
  Tensor col = x.box({0, 1}, {2, 2});
  Tensor rc = col.reshape({4});
  CHECK(rc.to_vector<float>() == std::vector<float>{2, 3, 5, 6});
  CHECK_THROWS_WITH_AS(x.reshape({4, 2}), Contains("[4, 2]"), Error);
}

TEST_CASE("clone shares nothing - fill_ and copy_ bump the storage version") {
  Tensor x = Tensor::from_vector<float>({1, 2, 3}, {3});
  Tensor c = x.clone();
  auto v0 = x.storage()->version();
  x.fill_(9);
  CHECK(x.storage()->version() > v0);
  CHECK(c.to_vector<float>() == std::vector<float>{1, 2, 3});
  CHECK(x.to_vector<float>() == std::vector<float>{9, 9, 9});
}

TEST_CASE("CUDA tensors need the CUDA backend") {
  if (cuda_backend().allocate != nullptr) return;  // built with the backend: covered by the cuda suite
  CHECK_THROWS_WITH_AS(Tensor::empty({2}, DType::f32, Device::cuda()), Contains("CUDA backend"), Error);
  CHECK_THROWS_WITH_AS(Tensor::zeros({2}).to(Device::cuda()), Contains("CUDA backend"), Error);
}

TEST_CASE("elementwise add/scale/sum/mean against double references") {
  Tensor a = testing::random_tensor({2, 3, 5, 4, 3}, DType::f32, 1);
  Tensor b = testing::random_tensor({2, 3, 5, 4, 3}, DType::f32, 2);
  auto va = a.to_vector<double>(), vb = b.to_vector<double>();
  auto vs = add(a, b).to_vector<double>();
  auto vk = scale(a, -0.25).to_vector<double>();
  double total = 0;
  for (std::size_t i = 0; i < va.size(); ++i) {
    CHECK(vs[i] == doctest::Approx(va[i] + vb[i]).epsilon(1e-6));
    CHECK(vk[i] == doctest::Approx(-0.25 * va[i]).epsilon(1e-6));
    total += va[i];
  }
  CHECK(sum(a).item() == doctest::Approx(total).epsilon(1e-6));
  CHECK(mean(a).item() == doctest::Approx(total / static_cast<double>(va.size())).epsilon(1e-6));
  CHECK(sum(a).rank() == 0);
  CHECK_THROWS_WITH_AS(add(a, b.reshape({6, 5, 4, 3})), Contains("[6, 5, 4, 3]"), Error);
  CHECK_THROWS_WITH_AS(add(a, b.to(DType::f64)), Contains("float64"), Error);
  CHECK_THROWS_WITH_AS(add(a.to(DType::i32), b.to(DType::i32)), Contains("int32"), Error);
}

TEST_CASE("elementwise gradients match finite differences") {
  auto x = testing::random_tensor({2, 3, 4}, DType::f64, 3).set_requires_grad();
  auto y = testing::random_tensor({2, 3, 4}, DType::f64, 4).set_requires_grad();
  testing::check_gradients([](const std::vector<Tensor>& in) { return add(scale(in[0], 1.5), in[1]); }, {x, y});
  testing::check_gradients([](const std::vector<Tensor>& in) { return mean(add(in[0], in[1])); }, {x, y});
  testing::check_gradients([](const std::vector<Tensor>& in) { return sum(in[0].reshape({4, 6})); }, {x});
}
