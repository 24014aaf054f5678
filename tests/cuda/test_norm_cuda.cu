// GPU tests of the instance-norm kernels (include/stunet/cuda/norm.cuh),
// through the kernel table, against cpu/norm.hpp in double on the same
// (rounded) inputs, for odd shapes, large planes and many small planes.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../testing.hpp"
#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cpu/norm.hpp"

using stunet::Device;
using stunet::DType;
using stunet::Shape;
using stunet::Tensor;

namespace {

const Device kGpu = Device::cuda(0);

stunet::CudaKernels& kernels() { return stunet::cuda_kernels(); }

std::vector<unsigned char> bytes_of(const Tensor& host) {
  std::vector<unsigned char> b(host.nbytes());
  if (!b.empty()) std::memcpy(b.data(), host.raw_data(), b.size());
  return b;
}

/// Tolerances per dtype, relative to the scale named at each use.
struct Tol {
  double stat;  ///< mean (relative to the plane's spread), rstd (relative)
  double sum;   ///< a sum, relative to the sum of its terms' magnitudes
  double elem;  ///< an output element, relative to max |ref|
};

/// f64: double throughout, only the summation order differs from the CPU.
/// f32: accumulation in float, each thread 32 elements then trees (depth ~50
/// roundings of 6e-8); outputs from float coefficients. f16 / bf16: the same
/// float arithmetic on the same rounded inputs, then one rounding of every
/// output to 11 / 8 significant bits (2^-11, 2^-8 relative to the element;
/// max |y| is a few units, so relative to the max too).
Tol tol_for(DType t) {
  switch (t) {
    case DType::f64: return {1e-12, 1e-13, 1e-12};
    case DType::f32: return {2e-6, 4e-6, 1e-5};
    case DType::f16: return {2e-6, 4e-6, 1e-3};
    default: return {2e-6, 4e-6, 4e-3};
  }
}

/// max |a - b| / max |b|.
double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0, s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::abs(a[i] - b[i]));
    s = std::max(s, std::abs(b[i]));
  }
  return m / std::max(s, 1e-300);
}

/// Runs every norm entry on x [N, C, S...] of dtype t and compares with the CPU.
void check_instance_norm(const Shape& shape, DType t, bool affine) {
  const std::string what = std::string(stunet::dtype_name(t)) + (affine ? " affine " : " plain ") +
                           std::to_string(shape[0]) + "x" + std::to_string(shape[1]) + "x" +
                           std::to_string(shape.numel() / (shape[0] * shape[1]));
  CAPTURE(what);
  const Tol tol = tol_for(t);
  const std::int64_t N = shape[0], C = shape[1], planes = N * C, S = shape.numel() / planes;
  const DType st = t == DType::f64 ? DType::f64 : DType::f32;  // the statistics' dtype
  const double eps = 1e-5;
  // Offset data (mean 3, spread 1), as a one-pass variance would get wrong.
  const Tensor x = stunet::testing::random_tensor(shape, DType::f64, 1, 2.0, 4.0).to(t);
  const Tensor g = stunet::testing::random_tensor(shape, DType::f64, 2).to(t);
  const Tensor w = stunet::testing::random_tensor(Shape{C}, DType::f64, 3, 0.5, 1.5).to(t);
  const Tensor b = stunet::testing::random_tensor(Shape{C}, DType::f64, 4).to(t);

  // Reference: the CPU in double on the rounded values.
  const Tensor x64 = x.to(DType::f64), g64 = g.to(DType::f64), w64 = w.to(DType::f64), b64 = b.to(DType::f64);
  const double* wp = affine ? w64.data<double>() : nullptr;
  const double* bp = affine ? b64.data<double>() : nullptr;
  std::vector<double> mean(static_cast<std::size_t>(planes)), rstd(mean.size()), sum_g(mean.size()),
      sum_gx(mean.size());
  stunet::cpu::instance_norm_stats(x64.data<double>(), planes, S, eps, mean.data(), rstd.data());
  Tensor y_ref = Tensor::empty(shape, DType::f64), dx_ref = Tensor::empty(shape, DType::f64);
  stunet::cpu::instance_norm_forward(x64.data<double>(), mean.data(), rstd.data(), wp, bp, y_ref.data<double>(),
                                     planes, C, S);
  stunet::cpu::instance_norm_backward_sums(x64.data<double>(), g64.data<double>(), mean.data(), rstd.data(), planes,
                                           S, sum_g.data(), sum_gx.data());
  stunet::cpu::instance_norm_backward_input(x64.data<double>(), g64.data<double>(), mean.data(), rstd.data(), wp,
                                            sum_g.data(), sum_gx.data(), dx_ref.data<double>(), planes, C, S);
  // Scales of the sums: sum |g| and sum |g * xhat| per plane (and over the batch).
  std::vector<double> abs_g(mean.size(), 0.0), abs_gx(mean.size(), 0.0);
  {
    const double* xv = x64.data<double>();
    const double* gv = g64.data<double>();
    for (std::int64_t p = 0; p < planes; ++p)
      for (std::int64_t i = 0; i < S; ++i) {
        abs_g[static_cast<std::size_t>(p)] += std::abs(gv[p * S + i]);
        abs_gx[static_cast<std::size_t>(p)] +=
            std::abs(gv[p * S + i] * (xv[p * S + i] - mean[static_cast<std::size_t>(p)]) * rstd[static_cast<std::size_t>(p)]);
      }
  }

  // GPU.
  const Tensor xd = x.to(kGpu), gd = g.to(kGpu), wd = w.to(kGpu), bd = b.to(kGpu);
  Tensor mean_d = Tensor::empty(Shape{planes}, st, kGpu), rstd_d = Tensor::empty(Shape{planes}, st, kGpu);
  kernels().instance_norm_stats(t, xd.raw_data(), planes, S, eps, mean_d.raw_data(), rstd_d.raw_data(), 0);
  Tensor y = Tensor::empty(shape, t, kGpu);
  kernels().instance_norm_forward(t, xd.raw_data(), mean_d.raw_data(), rstd_d.raw_data(),
                                  affine ? wd.raw_data() : nullptr, affine ? bd.raw_data() : nullptr, y.raw_data(),
                                  planes, C, S, 0);
  Tensor sg_d = Tensor::empty(Shape{planes}, st, kGpu), sgx_d = Tensor::empty(Shape{planes}, st, kGpu);
  kernels().instance_norm_backward_sums(t, xd.raw_data(), gd.raw_data(), mean_d.raw_data(), rstd_d.raw_data(), planes,
                                        S, sg_d.raw_data(), sgx_d.raw_data(), 0);
  Tensor dx = Tensor::empty(shape, t, kGpu);
  kernels().instance_norm_backward_input(t, xd.raw_data(), gd.raw_data(), mean_d.raw_data(), rstd_d.raw_data(),
                                         affine ? wd.raw_data() : nullptr, sg_d.raw_data(), sgx_d.raw_data(),
                                         dx.raw_data(), planes, C, S, 0);
  Tensor dw = Tensor::empty(Shape{C}, t, kGpu), db = Tensor::empty(Shape{C}, t, kGpu);
  kernels().sum_planes_over_batch(t, sgx_d.raw_data(), dw.raw_data(), N, C, 0);
  kernels().sum_planes_over_batch(t, sg_d.raw_data(), db.raw_data(), N, C, 0);

  const std::vector<double> gm = mean_d.to_vector<double>(), gr = rstd_d.to_vector<double>();
  const std::vector<double> gsg = sg_d.to_vector<double>(), gsgx = sgx_d.to_vector<double>();
  bool stats_ok = true, sums_ok = true;
  for (std::size_t p = 0; p < mean.size(); ++p) {
    stats_ok &= std::abs(gm[p] - mean[p]) <= tol.stat * (std::abs(mean[p]) + 1.0 / rstd[p]);
    stats_ok &= std::abs(gr[p] - rstd[p]) <= tol.stat * rstd[p];
    sums_ok &= std::abs(gsg[p] - sum_g[p]) <= tol.sum * abs_g[p];
    sums_ok &= std::abs(gsgx[p] - sum_gx[p]) <= tol.sum * abs_gx[p];
  }
  CHECK(stats_ok);
  CHECK(sums_ok);
  CHECK(rel(y.to(Device::cpu()).to_vector<double>(), y_ref.to_vector<double>()) <= tol.elem);
  CHECK(rel(dx.to(Device::cpu()).to_vector<double>(), dx_ref.to_vector<double>()) <= tol.elem);
  // dw, db: sums over the batch of the per-plane sums, rounded to dtype once.
  const std::vector<double> gdw = dw.to(Device::cpu()).to_vector<double>(), gdb = db.to(Device::cpu()).to_vector<double>();
  bool wb_ok = true;
  for (std::int64_t c = 0; c < C; ++c) {
    double rw = 0, rb = 0, sw = 0, sb = 0;
    for (std::int64_t n = 0; n < N; ++n) {
      const auto p = static_cast<std::size_t>(n * C + c);
      rw += sum_gx[p];
      rb += sum_g[p];
      sw += abs_gx[p];
      sb += abs_g[p];
    }
    const double round = t == DType::f16 ? 1e-3 : t == DType::bf16 ? 8e-3 : 0.0;  // final rounding to dtype
    wb_ok &= std::abs(gdw[static_cast<std::size_t>(c)] - rw) <= tol.sum * sw + round * std::abs(rw);
    wb_ok &= std::abs(gdb[static_cast<std::size_t>(c)] - rb) <= tol.sum * sb + round * std::abs(rb);
  }
  CHECK(wb_ok);

  // Determinism: the reductions run again give the same bits.
  Tensor mean2 = Tensor::empty(Shape{planes}, st, kGpu), rstd2 = Tensor::empty(Shape{planes}, st, kGpu);
  kernels().instance_norm_stats(t, xd.raw_data(), planes, S, eps, mean2.raw_data(), rstd2.raw_data(), 0);
  Tensor sg2 = Tensor::empty(Shape{planes}, st, kGpu), sgx2 = Tensor::empty(Shape{planes}, st, kGpu);
  kernels().instance_norm_backward_sums(t, xd.raw_data(), gd.raw_data(), mean2.raw_data(), rstd2.raw_data(), planes,
                                        S, sg2.raw_data(), sgx2.raw_data(), 0);
  CHECK(bytes_of(mean2.to(Device::cpu())) == bytes_of(mean_d.to(Device::cpu())));
  CHECK(bytes_of(rstd2.to(Device::cpu())) == bytes_of(rstd_d.to(Device::cpu())));
  CHECK(bytes_of(sg2.to(Device::cpu())) == bytes_of(sg_d.to(Device::cpu())));
  CHECK(bytes_of(sgx2.to(Device::cpu())) == bytes_of(sgx_d.to(Device::cpu())));
}

const DType kFloat[] = {DType::f64, DType::f32, DType::f16, DType::bf16};

}  // namespace

TEST_CASE("cuda norm: the table entries are registered") {
  CHECK((kernels().instance_norm_stats != nullptr));
  CHECK((kernels().instance_norm_forward != nullptr));
  CHECK((kernels().instance_norm_backward_sums != nullptr));
  CHECK((kernels().instance_norm_backward_input != nullptr));
  CHECK((kernels().sum_planes_over_batch != nullptr));
}

TEST_CASE("cuda norm: odd shapes, with and without affine parameters") {
  for (DType t : kFloat) {
    check_instance_norm(Shape{2, 3, 5, 7, 9}, t, true);
    check_instance_norm(Shape{2, 3, 5, 7, 9}, t, false);
    check_instance_norm(Shape{1, 1, 3, 1, 1}, t, true);  // 3 voxels: a partial 16-byte group only
  }
}

TEST_CASE("cuda norm: large planes (many chunks per plane)") {
  for (DType t : kFloat) check_instance_norm(Shape{1, 2, 64, 64, 64}, t, true);  // 262144 voxels: 32 chunks
  check_instance_norm(Shape{1, 1, 128, 128, 128}, DType::f32, true);           // 2 M voxels: 256 chunks
}

TEST_CASE("cuda norm: many small planes") {
  for (DType t : kFloat) check_instance_norm(Shape{2, 256, 4, 4, 4}, t, true);  // 512 planes of 64
}
