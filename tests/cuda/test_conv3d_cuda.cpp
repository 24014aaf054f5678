// CUDA conv3d kernels (include/stunet/cuda/conv3d.cuh), called through the
// kernel table on device tensors from plain C++ (the CPU reference includes
// Eigen, which stays out of nvcc translation units) and compared with the CPU conv3d computed in
// float64 on the same (rounded) input values; plus determinism and the
// host-side argument checks. The index arithmetic is also checked on
// machines without a GPU by tests/kernel_math/test_conv3d_math.cpp.

#include <doctest/doctest.h>

#include "../conv3d_cases.hpp"
#include "../testing.hpp"

#include <array>
#include <cstring>
#include <string>
#include <vector>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cpu/conv3d.hpp"

using stunet::Conv3dProblem;
using stunet::Device;
using stunet::DType;
using stunet::Shape;
using stunet::Tensor;

namespace {

using Case = stunet::testing::Conv3dCase;
constexpr auto make = stunet::testing::make_conv3d_problem;

/// The host emulation's problems (conv3d_cases.hpp) plus two STU-Net-sized
/// ones: a level-2 conv of STU-Net-S and a stride-2 downsampling conv into the
/// wide tile.
std::vector<Case> cases() {
  std::vector<Case> c = stunet::testing::conv3d_cases();
  c.push_back({"STU-Net size: N=2 32->32 at 32^3", make(2, 32, {32, 32, 32}, 32, {3, 3, 3}, {1, 1, 1}, {1, 1, 1})});
  c.push_back({"STU-Net size: N=2 32->64 at 32^3 stride 2",
               make(2, 32, {32, 32, 32}, 64, {3, 3, 3}, {1, 1, 1}, {2, 2, 2})});
  return c;
}

Shape input_shape(const Conv3dProblem& p) { return Shape{p.N, p.C, p.D, p.H, p.W}; }
Shape weight_shape(const Conv3dProblem& p) { return Shape{p.K, p.C, p.T, p.R, p.S}; }
Shape output_shape(const Conv3dProblem& p) { return Shape{p.N, p.K, p.out_d(), p.out_h(), p.out_w()}; }

/// Largest allowed max|gpu - ref| / max|ref|, the reference being float64 on
/// the very values the kernels read (inputs already rounded to the dtype).
double tolerance(DType t) {
  switch (t) {
    case DType::f64: return 1e-12;
    // float accumulation over at most C*T*R*S terms per output, or one split
    // of wgrad's chunk; ~sqrt(terms) * 2^-24 relative, far below 1e-5.
    case DType::f32: return 1e-5;
    // Products and sums in float, so the error is the final rounding to f16:
    // half an ulp, 2^-11 = 4.9e-4 of |y| <= max|ref|, plus the float
    // accumulation above (~1e-6). 1e-3 leaves a factor 2.
    case DType::f16: return 1e-3;
    // As f16 with 8 significant bits: 2^-8 = 3.9e-3 from the final rounding.
    case DType::bf16: return 8e-3;
    default: break;
  }
  FAIL("no tolerance for this dtype");
  return 0;
}

/// A device tensor filled with 51015 (the value of bytes 0x47 in f32):
/// finite and far from any result in every float dtype (f16 rounds it to
/// infinity, which fails the comparison too), so an element a kernel does not
/// write fails the comparison (NaN would not: max_abs_diff skips it).
Tensor garbage(const Shape& shape, DType dtype) {
  Tensor t = Tensor::empty(shape, dtype, Device::cuda(0));
  t.fill_(dtype == DType::f16 ? 7.3 : 51015.0);
  return t;
}

/// The device result as host float64.
Tensor host64(const Tensor& t) { return t.to(Device::cpu()).to(DType::f64); }

/// Inputs of one problem: host tensors of `dtype` (values rounded to it) and
/// their float64 copies for the reference, and the device copies.
struct Inputs {
  Tensor x, w, b, dy;          // host, float64, the exact values of the dtype
  Tensor xd, wd, bd, dyd;      // device, dtype
};

Inputs make_inputs(const Conv3dProblem& p, DType dtype) {
  using stunet::testing::random_tensor;
  const Device dev = Device::cuda(0);
  Tensor x = random_tensor(input_shape(p), dtype, 11), w = random_tensor(weight_shape(p), dtype, 12);
  Tensor b = random_tensor(Shape{p.K}, dtype, 13), dy = random_tensor(output_shape(p), dtype, 14);
  return {x.to(DType::f64), w.to(DType::f64), b.to(DType::f64), dy.to(DType::f64),
          x.to(dev),        w.to(dev),        b.to(dev),        dy.to(dev)};
}

void check_passes(const Case& c, DType dtype) {
  const Conv3dProblem& p = c.p;
  const std::string what = std::string(c.name) + " / " + std::string(stunet::dtype_name(dtype));
  CAPTURE(what);
  const stunet::CudaKernels& k = stunet::cuda_kernels();
  REQUIRE((k.conv3d_fprop != nullptr && k.conv3d_dgrad != nullptr && k.conv3d_wgrad != nullptr &&
           k.conv3d_bgrad != nullptr));
  const double tol = tolerance(dtype);
  const Inputs in = make_inputs(p, dtype);

  {
    Tensor ref = Tensor::empty(output_shape(p), DType::f64);
    stunet::cpu::conv3d_forward<double>(p, in.x.data<double>(), in.w.data<double>(), in.b.data<double>(),
                                        ref.data<double>());
    Tensor y = garbage(output_shape(p), dtype);
    k.conv3d_fprop(p, dtype, in.xd.raw_data(), in.wd.raw_data(), in.bd.raw_data(), y.raw_data(), 0);
    CHECK_MESSAGE(stunet::testing::max_rel_diff(host64(y), ref) <= tol, "fprop with bias");

    stunet::cpu::conv3d_forward<double>(p, in.x.data<double>(), in.w.data<double>(), nullptr, ref.data<double>());
    k.conv3d_fprop(p, dtype, in.xd.raw_data(), in.wd.raw_data(), nullptr, y.raw_data(), 0);
    CHECK_MESSAGE(stunet::testing::max_rel_diff(host64(y), ref) <= tol, "fprop without bias");
  }
  {
    Tensor ref = Tensor::empty(input_shape(p), DType::f64);
    stunet::cpu::conv3d_backward_data<double>(p, in.dy.data<double>(), in.w.data<double>(), ref.data<double>());
    // Every element of dx must be written (stride-2 phases that no tap
    // reaches are written as zeros).
    Tensor dx = garbage(input_shape(p), dtype);
    k.conv3d_dgrad(p, dtype, in.dyd.raw_data(), in.wd.raw_data(), dx.raw_data(), 0);
    CHECK_MESSAGE(stunet::testing::max_rel_diff(host64(dx), ref) <= tol, "dgrad");
  }
  {
    Tensor ref = Tensor::empty(weight_shape(p), DType::f64);
    stunet::cpu::conv3d_backward_weight<double>(p, in.x.data<double>(), in.dy.data<double>(), ref.data<double>());
    Tensor dw = garbage(weight_shape(p), dtype);
    k.conv3d_wgrad(p, dtype, in.xd.raw_data(), in.dyd.raw_data(), dw.raw_data(), 0);
    CHECK_MESSAGE(stunet::testing::max_rel_diff(host64(dw), ref) <= tol, "wgrad");
  }
  {
    Tensor ref = Tensor::empty(Shape{p.K}, DType::f64);
    stunet::cpu::conv3d_backward_bias<double>(p, in.dy.data<double>(), ref.data<double>());
    Tensor db = garbage(Shape{p.K}, dtype);
    k.conv3d_bgrad(p, dtype, in.dyd.raw_data(), db.raw_data(), 0);
    CHECK_MESSAGE(stunet::testing::max_rel_diff(host64(db), ref) <= tol, "bgrad");
  }
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  const Tensor ha = a.to(Device::cpu()), hb = b.to(Device::cpu());
  return ha.nbytes() == hb.nbytes() && std::memcmp(ha.raw_data(), hb.raw_data(), ha.nbytes()) == 0;
}

}  // namespace

TEST_CASE("cuda conv3d: fprop, dgrad, wgrad and bgrad match the CPU conv3d (float64)") {
  for (const Case& c : cases()) check_passes(c, DType::f64);
}

TEST_CASE("cuda conv3d: fprop, dgrad, wgrad and bgrad match the CPU conv3d (float32)") {
  for (const Case& c : cases()) check_passes(c, DType::f32);
}

TEST_CASE("cuda conv3d: fprop, dgrad, wgrad and bgrad match the CPU conv3d (float16)") {
  for (const Case& c : cases()) check_passes(c, DType::f16);
}

TEST_CASE("cuda conv3d: fprop, dgrad, wgrad and bgrad match the CPU conv3d (bfloat16)") {
  for (const Case& c : cases()) check_passes(c, DType::bf16);
}

TEST_CASE("cuda conv3d: results are bitwise reproducible (split-K wgrad and bgrad included)") {
  const Conv3dProblem p = make(2, 32, {32, 32, 32}, 32, {3, 3, 3}, {1, 1, 1}, {1, 1, 1});
  const stunet::CudaKernels& k = stunet::cuda_kernels();
  const Inputs in = make_inputs(p, DType::f32);
  const Device dev = Device::cuda(0);
  Tensor y1 = Tensor::empty(output_shape(p), DType::f32, dev), y2 = Tensor::empty(output_shape(p), DType::f32, dev);
  Tensor dx1 = Tensor::empty(input_shape(p), DType::f32, dev), dx2 = Tensor::empty(input_shape(p), DType::f32, dev);
  Tensor dw1 = Tensor::empty(weight_shape(p), DType::f32, dev), dw2 = Tensor::empty(weight_shape(p), DType::f32, dev);
  Tensor db1 = Tensor::empty(Shape{p.K}, DType::f32, dev), db2 = Tensor::empty(Shape{p.K}, DType::f32, dev);
  for (int run = 0; run < 2; ++run) {
    Tensor& y = run == 0 ? y1 : y2;
    Tensor& dx = run == 0 ? dx1 : dx2;
    Tensor& dw = run == 0 ? dw1 : dw2;
    Tensor& db = run == 0 ? db1 : db2;
    k.conv3d_fprop(p, DType::f32, in.xd.raw_data(), in.wd.raw_data(), in.bd.raw_data(), y.raw_data(), 0);
    k.conv3d_dgrad(p, DType::f32, in.dyd.raw_data(), in.wd.raw_data(), dx.raw_data(), 0);
    k.conv3d_wgrad(p, DType::f32, in.xd.raw_data(), in.dyd.raw_data(), dw.raw_data(), 0);
    k.conv3d_bgrad(p, DType::f32, in.dyd.raw_data(), db.raw_data(), 0);
  }
  CHECK(same_bytes(y1, y2));
  CHECK(same_bytes(dx1, dx2));
  CHECK(same_bytes(dw1, dw2));
  CHECK(same_bytes(db1, db2));
}

TEST_CASE("cuda conv3d: bad arguments throw stunet::Error naming the pass and the problem") {
  const stunet::CudaKernels& k = stunet::cuda_kernels();
  const Device dev = Device::cuda(0);
  const Conv3dProblem good = make(1, 2, {3, 3, 3}, 2, {3, 3, 3}, {1, 1, 1}, {1, 1, 1});
  Tensor x = Tensor::zeros(input_shape(good), DType::f32, dev), w = Tensor::zeros(weight_shape(good), DType::f32, dev);
  Tensor y = Tensor::zeros(output_shape(good), DType::f32, dev), b = Tensor::zeros(Shape{good.K}, DType::f32, dev);
  void* xp = x.raw_data();
  void* wp = w.raw_data();
  void* yp = y.raw_data();
  void* bp = b.raw_data();

  // A 5x5x5 kernel on a 3^3 input without padding: no output position.
  Conv3dProblem bad = good;
  bad.T = bad.R = bad.S = 5;
  bad.pad_d = bad.pad_h = bad.pad_w = 0;
  REQUIRE_FALSE(bad.valid());
  CHECK_THROWS_WITH_AS(k.conv3d_fprop(bad, DType::f32, xp, wp, bp, yp, 0), doctest::Contains("conv3d_fprop"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(k.conv3d_fprop(bad, DType::f32, xp, wp, bp, yp, 0), doctest::Contains("T,R,S=5x5x5"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(k.conv3d_dgrad(bad, DType::f32, yp, wp, xp, 0), doctest::Contains("conv3d_dgrad"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(k.conv3d_wgrad(bad, DType::f32, xp, yp, wp, 0), doctest::Contains("conv3d_wgrad"),
                       stunet::Error);
  CHECK_THROWS_WITH_AS(k.conv3d_bgrad(bad, DType::f32, yp, bp, 0), doctest::Contains("conv3d_bgrad"),
                       stunet::Error);

  Conv3dProblem zero_stride = good;
  zero_stride.stride_h = 0;
  CHECK_THROWS_AS(k.conv3d_fprop(zero_stride, DType::f32, xp, wp, bp, yp, 0), stunet::Error);
  Conv3dProblem negative_pad = good;
  negative_pad.pad_w = -1;
  CHECK_THROWS_AS(k.conv3d_dgrad(negative_pad, DType::f32, yp, wp, xp, 0), stunet::Error);

  // Null pointers (bias may be null in fprop, nothing else).
  CHECK_THROWS_AS(k.conv3d_fprop(good, DType::f32, nullptr, wp, bp, yp, 0), stunet::Error);
  CHECK_THROWS_AS(k.conv3d_dgrad(good, DType::f32, yp, nullptr, xp, 0), stunet::Error);
  CHECK_THROWS_AS(k.conv3d_wgrad(good, DType::f32, xp, yp, nullptr, 0), stunet::Error);
  CHECK_THROWS_AS(k.conv3d_bgrad(good, DType::f32, nullptr, bp, 0), stunet::Error);
  CHECK_NOTHROW(k.conv3d_fprop(good, DType::f32, xp, wp, nullptr, yp, 0));

  // Integer dtypes have no conv3d.
  CHECK_THROWS_WITH_AS(k.conv3d_fprop(good, DType::i64, xp, wp, bp, yp, 0), doctest::Contains("conv3d_fprop"),
                       stunet::Error);
  CHECK_THROWS_AS(k.conv3d_wgrad(good, DType::u8, xp, yp, wp, 0), stunet::Error);

  // Nothing was left pending on the device.
  CHECK(y.to(Device::cpu()).to_vector<float>() == std::vector<float>(static_cast<std::size_t>(y.numel()), 0.0f));
}
