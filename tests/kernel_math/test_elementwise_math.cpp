// Host emulation of the elementwise CUDA kernels (include/stunet/cuda/elementwise.cuh):
// LeakyReLU's per-element math, and the nearest-upsampling kernels run one
// input element per "thread" with the index math of elementwise_math.hpp,
// against cpu/activation.hpp and cpu/interp.hpp (bitwise: same operations in
// the same order). tests/cuda/test_elementwise_cuda.cu runs the kernels.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../testing.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cpu/activation.hpp"
#include "stunet/cpu/interp.hpp"
#include "stunet/cuda/elementwise_math.hpp"

using stunet::DType;
using stunet::Shape;
using stunet::Tensor;
namespace sc = stunet::cuda;

namespace {

template <class T> std::vector<T> awkward_values(std::size_t n, std::uint64_t seed) {
  const Tensor r = stunet::testing::random_tensor(Shape{static_cast<std::int64_t>(n)}, DType::f64, seed, -2.0, 2.0);
  std::vector<T> v = r.to_vector<T>();
  v[0] = T(0);
  v[1] = -T(0);
  v[2] = std::numeric_limits<T>::quiet_NaN();
  v[3] = std::numeric_limits<T>::infinity();
  v[4] = -std::numeric_limits<T>::infinity();
  v[5] = std::numeric_limits<T>::denorm_min();
  v[6] = -std::numeric_limits<T>::denorm_min();
  return v;
}

/// Bitwise equality that treats NaNs as equal to NaNs.
template <class T> bool same_values(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) && std::isnan(b[i])) continue;
    if (std::signbit(a[i]) != std::signbit(b[i]) || !(a[i] == b[i])) return false;
  }
  return true;
}

/// upsample_nearest_kernel, one input element after another: decode, then
/// write the sd x sh x sw copies. Returns how often each output was written.
template <class I, class T>
std::vector<int> emulate_upsample(const T* x, T* y, std::int64_t planes, std::int64_t D, std::int64_t H,
                                  std::int64_t W, int sd, int sh, int sw) {
  const I total = static_cast<I>(planes * D * H * W);
  std::vector<int> writes(static_cast<std::size_t>(planes * D * H * W * sd * sh * sw), 0);
  for (I i = 0; i < total; ++i) {
    const sc::SliceCoord<I> c = sc::slice_coord<I>(i, static_cast<I>(H), static_cast<I>(W));
    for (int a = 0; a < sd; ++a)
      for (int b = 0; b < sh; ++b) {
        const I row = sc::upsample_out_index<I>(c, static_cast<I>(H), static_cast<I>(W), sd, sh, sw, a, b, 0);
        for (int k = 0; k < sw; ++k) {
          y[row + k] = x[i];
          ++writes[static_cast<std::size_t>(row + k)];
        }
      }
  }
  return writes;
}

/// upsample_nearest_backward_kernel: one dx element per "thread", summing its
/// block in the order a, b, k (the accumulation type of float is float).
template <class I, class T>
void emulate_upsample_backward(const T* g, T* dx, std::int64_t planes, std::int64_t D, std::int64_t H,
                               std::int64_t W, int sd, int sh, int sw) {
  const I total = static_cast<I>(planes * D * H * W);
  for (I i = 0; i < total; ++i) {
    const sc::SliceCoord<I> c = sc::slice_coord<I>(i, static_cast<I>(H), static_cast<I>(W));
    T acc = T(0);
    for (int a = 0; a < sd; ++a)
      for (int b = 0; b < sh; ++b) {
        const I row = sc::upsample_out_index<I>(c, static_cast<I>(H), static_cast<I>(W), sd, sh, sw, a, b, 0);
        for (int k = 0; k < sw; ++k) acc += g[row + k];
      }
    dx[i] = acc;
  }
}

template <class T> void check_upsample(std::int64_t planes, std::int64_t D, std::int64_t H, std::int64_t W, int sd,
                                       int sh, int sw) {
  const std::string what = std::to_string(planes) + "x" + std::to_string(D) + "x" + std::to_string(H) + "x" +
                           std::to_string(W) + " by " + std::to_string(sd) + "," + std::to_string(sh) + "," +
                           std::to_string(sw);
  CAPTURE(what);
  const DType dt = stunet::dtype_of<T>;
  const Tensor x = stunet::testing::random_tensor(Shape{planes, D, H, W}, dt, 41);
  const Shape out_shape{planes, D * sd, H * sh, W * sw};
  Tensor ref = Tensor::zeros(out_shape, dt);
  stunet::cpu::upsample_nearest(x.data<T>(), ref.data<T>(), planes, D, H, W, sd, sh, sw);
  for (int bits : {32, 64}) {
    CAPTURE(bits);
    Tensor emu = Tensor::full(out_shape, -7.0, dt);
    const std::vector<int> writes =
        bits == 32 ? emulate_upsample<std::int32_t>(x.data<T>(), emu.data<T>(), planes, D, H, W, sd, sh, sw)
                   : emulate_upsample<std::int64_t>(x.data<T>(), emu.data<T>(), planes, D, H, W, sd, sh, sw);
    bool once = true;
    for (int w : writes) once &= w == 1;
    CHECK(once);
    CHECK(emu.to_vector<T>() == ref.to_vector<T>());
  }
  const Tensor g = stunet::testing::random_tensor(out_shape, dt, 42);
  Tensor dref = Tensor::zeros(x.shape(), dt);
  stunet::cpu::upsample_nearest_backward(g.data<T>(), dref.data<T>(), planes, D, H, W, sd, sh, sw);
  for (int bits : {32, 64}) {
    CAPTURE(bits);
    Tensor demu = Tensor::full(x.shape(), -7.0, dt);
    if (bits == 32)
      emulate_upsample_backward<std::int32_t>(g.data<T>(), demu.data<T>(), planes, D, H, W, sd, sh, sw);
    else emulate_upsample_backward<std::int64_t>(g.data<T>(), demu.data<T>(), planes, D, H, W, sd, sh, sw);
    CHECK(demu.to_vector<T>() == dref.to_vector<T>());  // same additions in the same order: bitwise
  }
}

}  // namespace

TEST_CASE("cuda elementwise math: leaky_relu forward and backward equal the CPU bitwise") {
  auto run = [&]<class T>() {
    const std::size_t n = 1001;
    const std::vector<T> x = awkward_values<T>(n, 51), g = awkward_values<T>(n, 52);
    for (double slope : {0.01, 0.2, -0.5, 0.0}) {
      CAPTURE(slope);
      std::vector<T> ref(n), emu(n), dref(n), demu(n);
      stunet::cpu::leaky_relu(x.data(), ref.data(), static_cast<T>(slope), static_cast<std::int64_t>(n));
      for (std::size_t i = 0; i < n; ++i) emu[i] = sc::leaky_relu_value<T>(x[i], static_cast<T>(slope));
      CHECK(same_values(emu, ref));
      stunet::cpu::leaky_relu_backward(x.data(), g.data(), dref.data(), static_cast<T>(slope),
                                       static_cast<std::int64_t>(n));
      for (std::size_t i = 0; i < n; ++i) demu[i] = sc::leaky_relu_grad_value<T>(x[i], g[i], static_cast<T>(slope));
      CHECK(same_values(demu, dref));
    }
  };
  run.operator()<float>();
  run.operator()<double>();
}

TEST_CASE("cuda elementwise math: nearest upsampling index math equals the CPU bitwise") {
  check_upsample<float>(6, 5, 7, 9, 2, 2, 2);
  check_upsample<float>(6, 5, 7, 9, 1, 2, 2);  // STU-Net's anisotropic first stages
  check_upsample<double>(6, 5, 7, 9, 3, 1, 2);
  check_upsample<double>(3, 1, 1, 1, 2, 3, 4);
  check_upsample<float>(2, 3, 4, 5, 1, 1, 1);
  check_upsample<double>(1, 4, 4, 4, 2, 2, 2);
}
