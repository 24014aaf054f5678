// GPU tests of LeakyReLU and nearest upsampling (include/stunet/cuda/elementwise.cuh),
// through the kernel table, against cpu/activation.hpp and cpu/interp.hpp.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../testing.hpp"
#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cpu/activation.hpp"
#include "stunet/cpu/interp.hpp"

using stunet::Device;
using stunet::DType;
using stunet::Shape;
using stunet::Tensor;

namespace {

const Device kGpu = Device::cuda(0);
const DType kFloat[] = {DType::f64, DType::f32, DType::f16, DType::bf16};

stunet::CudaKernels& kernels() { return stunet::cuda_kernels(); }

std::vector<unsigned char> bytes_of(const Tensor& host) {
  std::vector<unsigned char> b(host.nbytes());
  if (!b.empty()) std::memcpy(b.data(), host.raw_data(), b.size());
  return b;
}

/// Random values with zeros of both signs, infinities and a NaN mixed in.
Tensor awkward(const Shape& shape, DType t, std::uint64_t seed) {
  std::vector<double> v = stunet::testing::random_tensor(shape, DType::f64, seed, -2.0, 2.0).to_vector<double>();
  v[0] = 0.0;
  v[1] = -0.0;
  v[2] = std::numeric_limits<double>::quiet_NaN();
  v[3] = std::numeric_limits<double>::infinity();
  v[4] = -std::numeric_limits<double>::infinity();
  return Tensor::from_vector<double>(v, shape).to(t);
}

/// Equal values, zeros' signs included, any NaN matching any NaN (a GPU's
/// arithmetic NaN is canonical, the host's keeps the input's payload).
bool same_values(const Tensor& a, const Tensor& b) {
  const std::vector<double> va = a.to_vector<double>(), vb = b.to_vector<double>();
  if (va.size() != vb.size()) return false;
  for (std::size_t i = 0; i < va.size(); ++i) {
    if (std::isnan(va[i]) && std::isnan(vb[i])) continue;
    if (!(va[i] == vb[i]) || std::signbit(va[i]) != std::signbit(vb[i])) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("cuda elementwise: the table entries are registered") {
  CHECK((kernels().leaky_relu != nullptr));
  CHECK((kernels().leaky_relu_backward != nullptr));
  CHECK((kernels().upsample_nearest != nullptr));
  CHECK((kernels().upsample_nearest_backward != nullptr));
}

TEST_CASE("cuda elementwise: leaky_relu forward and backward, out of place, in place and misaligned") {
  // f64 and f32 compute what the CPU computes in the same type: exact. The
  // 16-bit types compute in float and round once; the reference is the CPU in
  // float on the same rounded inputs, rounded the same way: exact too. (Exact
  // values, not bytes: NaN payloads differ between GPU and host arithmetic.)
  const Shape shape{2, 3, 5, 7, 9};
  const std::int64_t n = shape.numel();
  for (DType t : kFloat) {
    const std::string dtype(stunet::dtype_name(t));
    CAPTURE(dtype);
    const DType ct = t == DType::f64 ? DType::f64 : DType::f32;  // the CPU's compute type
    const Tensor x = awkward(shape, t, 1), g = awkward(shape, t, 2);
    for (double slope : {0.01, -0.5}) {
      CAPTURE(slope);
      const Tensor xc = x.to(ct), gc = g.to(ct);
      Tensor y_ref = Tensor::empty(shape, ct), dx_ref = Tensor::empty(shape, ct);
      stunet::dispatch_float(ct, "test", [&]<class T>() {
        stunet::cpu::leaky_relu(xc.data<T>(), y_ref.data<T>(), static_cast<T>(slope), n);
        stunet::cpu::leaky_relu_backward(xc.data<T>(), gc.data<T>(), dx_ref.data<T>(), static_cast<T>(slope), n);
      });
      const Tensor y_want = y_ref.to(t), dx_want = dx_ref.to(t);

      Tensor xd = x.to(kGpu), gd = g.to(kGpu), y = Tensor::empty(shape, t, kGpu), dx = Tensor::empty(shape, t, kGpu);
      kernels().leaky_relu(t, xd.raw_data(), y.raw_data(), slope, n, 0);
      CHECK(same_values(y.to(Device::cpu()), y_want));
      kernels().leaky_relu_backward(t, xd.raw_data(), gd.raw_data(), dx.raw_data(), slope, n, 0);
      CHECK(same_values(dx.to(Device::cpu()), dx_want));

      // In place: y == x, dx == g.
      Tensor xi = x.to(kGpu), gi = g.to(kGpu);
      kernels().leaky_relu(t, xi.raw_data(), xi.raw_data(), slope, n, 0);
      CHECK(same_values(xi.to(Device::cpu()), y_want));
      kernels().leaky_relu_backward(t, xd.raw_data(), gi.raw_data(), gi.raw_data(), slope, n, 0);
      CHECK(same_values(gi.to(Device::cpu()), dx_want));

      // Misaligned (one element in): the element-by-element path.
      const std::size_t es = stunet::dtype_size(t);
      Tensor ym = Tensor::zeros(shape, t, kGpu);
      kernels().leaky_relu(t, static_cast<const char*>(xd.raw_data()) + es, static_cast<char*>(ym.raw_data()) + es,
                           slope, n - 1, 0);
      const Tensor got = ym.to(Device::cpu()).reshape(Shape{n}), want = y_want.reshape(Shape{n});
      CHECK(same_values(got.box({1}, Shape{n - 1}).contiguous(), want.box({1}, Shape{n - 1}).contiguous()));
      CHECK(got.at({0}) == 0.0);  // element 0 untouched
    }
  }
}

TEST_CASE("cuda elementwise: nearest upsampling forward and backward") {
  // The forward copies: bitwise for every type. The backward adds each block
  // in the CPU's order (a, b, k): bitwise in f64/f32; for the 16-bit types it
  // adds in float, which is what the CPU does in float on the same rounded
  // inputs, then rounds once: bitwise against that reference too.
  struct Case {
    Shape x;
    int sd, sh, sw;
  };
  const Case cases[] = {{Shape{2, 3, 5, 7, 9}, 2, 2, 2},
                        {Shape{2, 3, 5, 7, 9}, 1, 2, 2},
                        {Shape{1, 2, 3, 4, 5}, 3, 1, 2},
                        {Shape{2, 64, 32, 32, 32}, 2, 2, 2}};  // 4.2 M inputs, 33.6 M outputs: a full grid
  for (const Case& c : cases) {
    for (DType t : kFloat) {
      const std::string dtype(stunet::dtype_name(t));
      const std::string what = dtype + " scale " + std::to_string(c.sd) + "," + std::to_string(c.sh) + "," +
                               std::to_string(c.sw) + " W " + std::to_string(c.x[4]) + " C " + std::to_string(c.x[1]);
      CAPTURE(what);
      const DType ct = t == DType::f64 ? DType::f64 : DType::f32;
      const std::int64_t planes = c.x[0] * c.x[1], D = c.x[2], H = c.x[3], W = c.x[4];
      const Shape y_shape{c.x[0], c.x[1], D * c.sd, H * c.sh, W * c.sw};
      const Tensor x = stunet::testing::random_tensor(c.x, DType::f64, 3).to(t);
      const Tensor g = stunet::testing::random_tensor(y_shape, DType::f64, 4).to(t);
      const Tensor xc = x.to(ct), gc = g.to(ct);
      Tensor y_ref = Tensor::empty(y_shape, ct), dx_ref = Tensor::empty(c.x, ct);
      stunet::dispatch_float(ct, "test", [&]<class T>() {
        stunet::cpu::upsample_nearest(xc.data<T>(), y_ref.data<T>(), planes, D, H, W, c.sd, c.sh, c.sw);
        stunet::cpu::upsample_nearest_backward(gc.data<T>(), dx_ref.data<T>(), planes, D, H, W, c.sd, c.sh, c.sw);
      });
      Tensor xd = x.to(kGpu), gd = g.to(kGpu);
      Tensor y = Tensor::empty(y_shape, t, kGpu), dx = Tensor::empty(c.x, t, kGpu);
      kernels().upsample_nearest(t, xd.raw_data(), y.raw_data(), planes, D, H, W, c.sd, c.sh, c.sw, 0);
      kernels().upsample_nearest_backward(t, gd.raw_data(), dx.raw_data(), planes, D, H, W, c.sd, c.sh, c.sw, 0);
      CHECK(bytes_of(y.to(Device::cpu())) == bytes_of(y_ref.to(t)));
      CHECK(bytes_of(dx.to(Device::cpu())) == bytes_of(dx_ref.to(t)));
      // Determinism: a second backward is bit-identical.
      Tensor dx2 = Tensor::empty(c.x, t, kGpu);
      kernels().upsample_nearest_backward(t, gd.raw_data(), dx2.raw_data(), planes, D, H, W, c.sd, c.sh, c.sw, 0);
      CHECK(bytes_of(dx2.to(Device::cpu())) == bytes_of(dx.to(Device::cpu())));
    }
  }
}
