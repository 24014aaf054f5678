// stunet-quickstart: the smallest end-to-end use of the library. A tiny
// residual segmentation network learns to find a sphere in a noisy volume on
// the CPU, with the nnU-Net DC+CE loss and plain SGD, in a few seconds.
//
// It shows the pieces a user composes: tensors, ops with autograd, backward,
// and an update under NoGradGuard. The full STU-Net, data pipeline and
// trainer build on exactly these.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <stunet/stunet.hpp>

using namespace stunet;

namespace {

/// A volume [1, 1, S, S, S] with a bright noisy sphere, and its label map.
void make_case(int size, std::uint64_t seed, Tensor& image, Tensor& label) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> centre(size * 0.35, size * 0.65), radius(size * 0.18, size * 0.3);
  std::normal_distribution<float> noise(0.0f, 0.3f);
  const double cz = centre(rng), cy = centre(rng), cx = centre(rng), r = radius(rng);
  image = Tensor::empty({1, 1, size, size, size});
  label = Tensor::empty({1, 1, size, size, size}, DType::u8);
  float* im = image.data<float>();
  std::uint8_t* lb = label.data<std::uint8_t>();
  for (int z = 0, i = 0; z < size; ++z)
    for (int y = 0; y < size; ++y)
      for (int x = 0; x < size; ++x, ++i) {
        const bool inside = std::hypot(z - cz, y - cy, x - cx) < r;
        lb[i] = inside ? 1 : 0;
        im[i] = (inside ? 1.0f : 0.0f) + noise(rng);
      }
}

Tensor kaiming(Shape s, std::mt19937_64& rng) {
  const double fan_in = static_cast<double>(s.numel() / s[0]);
  std::normal_distribution<float> dist(0.0f, static_cast<float>(std::sqrt(2.0 / (1 + 1e-4) / fan_in)));
  Tensor t = Tensor::empty(s);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = dist(rng);
  return t.set_requires_grad();
}

}  // namespace

int main() {
  const int size = 24, channels = 8, steps = 60;
  std::mt19937_64 rng(0);
  // conv(1->C) IN lrelu conv(C->C) IN + 1x1 shortcut, lrelu, 1x1 head -> 2 classes.
  std::vector<Tensor> w{kaiming({channels, 1, 3, 3, 3}, rng), Tensor::zeros({channels}).set_requires_grad(),
                        Tensor::ones({channels}).set_requires_grad(), Tensor::zeros({channels}).set_requires_grad(),
                        kaiming({channels, channels, 3, 3, 3}, rng), Tensor::zeros({channels}).set_requires_grad(),
                        Tensor::ones({channels}).set_requires_grad(), Tensor::zeros({channels}).set_requires_grad(),
                        kaiming({channels, 1, 1, 1, 1}, rng), Tensor::zeros({channels}).set_requires_grad(),
                        kaiming({2, channels, 1, 1, 1}, rng), Tensor::zeros({2}).set_requires_grad()};
  auto forward = [&](const Tensor& x) {
    Conv3dOptions same{{1, 1, 1}, {1, 1, 1}};
    Tensor h = leaky_relu(instance_norm(conv3d(x, w[0], w[1], same), w[2], w[3]));
    h = instance_norm(conv3d(h, w[4], w[5], same), w[6], w[7]);
    h = leaky_relu(add(h, conv3d(x, w[8], w[9])));
    return conv3d(h, w[10], w[11]);
  };

  std::printf("stunet quickstart: a %d^3 sphere, a residual block with %d channels, DC+CE, SGD\n", size, channels);
  const auto t0 = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    Tensor image, label;
    make_case(size, static_cast<std::uint64_t>(step % 8), image, label);
    Tensor loss = dc_and_ce_loss(forward(image), label);
    for (Tensor& p : w) p.zero_grad();
    loss.backward();
    {
      NoGradGuard no_grad;
      for (Tensor& p : w) {
        float* pv = p.data<float>();
        const float* gv = p.grad().data<float>();
        for (std::int64_t i = 0; i < p.numel(); ++i) pv[i] -= 0.1f * gv[i];
      }
    }
    if (step % 10 == 0 || step == steps - 1) std::printf("  step %3d  loss %+.4f\n", step, loss.item());
  }
  // Dice of the sphere on an unseen case.
  Tensor image, label;
  make_case(size, 1234, image, label);
  NoGradGuard no_grad;
  Tensor logits = forward(image);
  const float* l = logits.data<float>();
  const std::uint8_t* y = label.data<std::uint8_t>();
  const std::int64_t vox = label.numel();
  double inter = 0, pred = 0, truth = 0;
  for (std::int64_t i = 0; i < vox; ++i) {
    const bool p = l[vox + i] > l[i];
    inter += p && y[i];
    pred += p;
    truth += y[i];
  }
  const double dice = 2 * inter / std::max(1.0, pred + truth);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("held-out case: sphere Dice %.3f after %d steps (%.1f s)\n", dice, steps, seconds);
  return dice > 0.8 ? 0 : 1;
}
