// A whole graph: a residual block that downsamples anisotropically, a decoder
// step (nearest upsample + 1x1 conv + skip concat) and the DC+CE loss. Every
// input and parameter gradient is checked against finite differences, which
// exercises gradient accumulation (the residual add and the skip concat make
// tensors feed two consumers) across all ops together.
#include "testing.hpp"
#include "stunet/stunet.hpp"

using namespace stunet;

namespace {

struct TinyNet {
  // BasicResBlock(2 -> 4, stride (1,2,2)), then decoder: up (1,2,2), 1x1 conv to 2 channels,
  // concat with the skip (the input), 3x3 conv to 3 classes.
  std::vector<Tensor> params;
  explicit TinyNet(DType dt) {
    std::uint64_t seed = 100;
    auto p = [&](Shape s) {
      params.push_back(testing::random_tensor(s, dt, seed++, -0.5, 0.5).set_requires_grad());
    };
    p({4, 2, 3, 3, 3}); p({4});  // conv1
    p({4}); p({4});              // norm1
    p({4, 4, 3, 3, 3}); p({4});  // conv2
    p({4}); p({4});              // norm2
    p({4, 2, 1, 1, 1}); p({4});  // conv3 (shortcut)
    p({2, 4, 1, 1, 1}); p({2});  // up conv
    p({3, 4, 3, 3, 3}); p({3});  // head
  }
  static Tensor forward(const Tensor& x, const std::vector<Tensor>& w) {
    Conv3dOptions down{{1, 2, 2}, {1, 1, 1}};
    Conv3dOptions same{{1, 1, 1}, {1, 1, 1}};
    Tensor h = conv3d(x, w[0], w[1], down);
    h = leaky_relu(instance_norm(h, w[2], w[3]));
    h = instance_norm(conv3d(h, w[4], w[5], same), w[6], w[7]);
    Tensor shortcut = conv3d(x, w[8], w[9], Conv3dOptions{{1, 2, 2}, {0, 0, 0}});
    h = leaky_relu(add(h, shortcut));
    Tensor up = conv3d(upsample_nearest(h, {1, 2, 2}), w[10], w[11]);
    Tensor cat = concat({up, x}, 1);
    return conv3d(cat, w[12], w[13], same);
  }
};

}  // namespace

TEST_CASE("residual block + skip concat + DC+CE: all gradients match finite differences") {
  TinyNet net(DType::f64);
  Tensor x = testing::random_tensor({2, 2, 3, 6, 4}, DType::f64, 7).set_requires_grad();
  Tensor target = testing::random_labels({2, 1, 3, 6, 4}, 3, 8);
  std::vector<Tensor> inputs{x};
  inputs.insert(inputs.end(), net.params.begin(), net.params.end());
  auto f = [&](const std::vector<Tensor>& in) {
    std::vector<Tensor> w(in.begin() + 1, in.end());
    return dc_and_ce_loss(TinyNet::forward(in[0], w), target);
  };
  testing::check_gradients(f, inputs, 1e-6, 1e-6, 60);
  // Logits too, not only the scalar loss.
  auto g = [&](const std::vector<Tensor>& in) {
    std::vector<Tensor> w(in.begin() + 1, in.end());
    return TinyNet::forward(in[0], w);
  };
  testing::check_gradients(g, inputs, 1e-6, 1e-6, 60);
}

TEST_CASE("the same graph in float32 tracks float64") {
  TinyNet net64(DType::f64);
  std::vector<Tensor> w32;
  for (const Tensor& p : net64.params) w32.push_back(p.detach().to(DType::f32).set_requires_grad());
  Tensor x64 = testing::random_tensor({2, 2, 3, 6, 4}, DType::f64, 7);
  Tensor target = testing::random_labels({2, 1, 3, 6, 4}, 3, 8);
  Tensor y64 = TinyNet::forward(x64, net64.params);
  Tensor y32 = TinyNet::forward(x64.to(DType::f32), w32);
  CHECK(testing::max_rel_diff(y32, y64) < 1e-5);
  dc_and_ce_loss(y64, target).backward();
  dc_and_ce_loss(y32, target).backward();
  // Conv biases 1 and 5 feed an instance norm: their true gradient is zero
  // (the norm removes per-channel constants), so they are measured against
  // the gradient scale of their conv's weight instead of their own.
  auto max_abs = [](const Tensor& t) {
    double m = 0;
    for (double v : t.to_vector<double>()) m = std::max(m, std::abs(v));
    return m;
  };
  for (std::size_t i = 0; i < w32.size(); ++i) {
    CAPTURE(i);
    const Tensor& ref = net64.params[i].grad();
    double scale = max_abs(ref);
    if (i == 1 || i == 5) scale = max_abs(net64.params[i - 1].grad());
    CHECK(testing::max_abs_diff(w32[i].grad(), ref) / scale < 1e-4);
  }
}
