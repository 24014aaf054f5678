// STU-Net as a model: the official key/shape sets of S/B/L/H, parameter and
// MAC counts, the golden forward/loss/gradients computed by PyTorch, and
// state_dict loading errors.
#include <fstream>
#include <sstream>

#include "testing.hpp"
#include "stunet/io/safetensors.hpp"
#include "stunet/nn/pretrained.hpp"
#include "stunet/nn/stunet.hpp"
#include "stunet/train/deep_supervision.hpp"

using namespace stunet;
using doctest::Contains;

namespace {

/// The "## <name>:" section of shared/spec/stunet_state_dict.txt as "key [shape]" lines.
std::vector<std::string> spec_keys(const std::string& name) {
  std::ifstream in(testing::shared_dir() / "spec" / "stunet_state_dict.txt");
  std::vector<std::string> out;
  std::string line;
  bool on = false;
  while (std::getline(in, line)) {
    if (line.rfind("## ", 0) == 0) {
      on = line.rfind("## " + name + ":", 0) == 0;
      continue;
    }
    if (on && !line.empty() && line[0] != '#') out.push_back(line);
  }
  return out;
}

std::vector<std::string> model_keys(const nn::Module& m) {
  std::vector<std::string> out;
  for (const auto& [k, t] : m.named_parameters()) out.push_back(fmt::format("{} {}", k, t.shape()));
  return out;
}

/// A configuration as a template argument: what a teacher's scaling
/// experiment can do with the presets at compile time.
template <nn::STUNetConfig C> constexpr std::int64_t params_of() { return nn::parameter_count(C); }
static_assert(params_of<nn::presets::huge>() == 1'457'326'221);
static_assert(params_of<nn::STUNetConfig{.depth = {2, 2, 2, 2, 2, 2}, .dims = {32, 64, 128, 256, 512, 512}}>() >
              params_of<nn::presets::base>());

}  // namespace

TEST_CASE("parameter counts and forward MACs of the four presets match the paper") {
  static_assert(nn::parameter_count(nn::presets::small) == 14'596'941);
  CHECK(nn::parameter_count(nn::presets::base) == 58'262'669);
  CHECK(nn::parameter_count(nn::presets::large) == 440'302'605);
  CHECK(nn::parameter_count(nn::presets::huge) == 1'457'326'221);
  const nn::Int3 p{128, 128, 128};
  CHECK(nn::forward_macs(nn::presets::small, p) / 1e12 == doctest::Approx(0.129).epsilon(0.004));
  CHECK(nn::forward_macs(nn::presets::base, p) / 1e12 == doctest::Approx(0.506).epsilon(0.002));
  CHECK(nn::forward_macs(nn::presets::large, p) / 1e12 == doctest::Approx(3.804).epsilon(0.0003));
  CHECK(nn::forward_macs(nn::presets::huge, p) / 1e12 == doctest::Approx(12.593).epsilon(0.0001));
  CHECK(nn::STUNet(nn::presets::small).parameter_count() == 14'596'941);
  CHECK(nn::preset("b") == nn::presets::base);
  CHECK_THROWS_WITH_AS(nn::preset("giant"), Contains("giant"), Error);
}

TEST_CASE("module keys, shapes and order equal the official state_dict of S, B, L and H") {
  if (testing::shared_dir().empty()) {
    MESSAGE("skipping: ../shared is absent (spec/stunet_state_dict.txt)");
    return;
  }
  for (const char* name : {"small", "base", "large", "huge"}) {
    CAPTURE(name);
    auto spec = spec_keys(name);
    REQUIRE(!spec.empty());
    // bfloat16 halves the memory of building H (2.9 GB) just to list it.
    nn::STUNet net(nn::preset(name), DType::bf16);
    CHECK(model_keys(net) == spec);
  }
}

TEST_CASE("custom depth/width and anisotropic pool kernels") {
  nn::STUNetConfig c{.in_channels = 2, .num_classes = 4, .depth = {1, 2, 1, 1, 1, 1}, .dims = {4, 6, 8, 8, 10, 10}};
  c.pool = {nn::Int3{1, 2, 2}, nn::Int3{2, 2, 2}, nn::Int3{2, 2, 2}, nn::Int3{1, 2, 2}, nn::Int3{1, 1, 2}};
  nn::STUNet net(c);
  net.init_he(1);
  CHECK(net.parameter_count() == nn::parameter_count(c));
  Tensor x = testing::random_tensor({1, 2, 4, 16, 32}, DType::f32, 3);
  auto out = net.forward(x);
  REQUIRE(out.size() == 5);
  CHECK(out[0].shape() == Shape{1, 4, 4, 16, 32});
  CHECK(out[1].shape() == Shape{1, 4, 4, 8, 16});
  CHECK(out[2].shape() == Shape{1, 4, 2, 4, 8});
  CHECK(out[3].shape() == Shape{1, 4, 1, 2, 4});
  CHECK(out[4].shape() == Shape{1, 4, 1, 1, 2});
  CHECK_THROWS_WITH_AS(net.forward(testing::random_tensor({1, 2, 4, 16, 30}, DType::f32, 3)),
                       Contains("not divisible"), Error);
  CHECK_THROWS_WITH_AS(net.forward(testing::random_tensor({1, 1, 4, 16, 32}, DType::f32, 3)), Contains("[N, 2"),
                       Error);
  nn::STUNetConfig bad = c;
  bad.dims[3] = 0;
  CHECK_THROWS_WITH_AS(nn::STUNet{bad}, Contains("stage 3"), Error);
}

TEST_CASE("He initialisation: zero biases, weight std sqrt(2/(1+a^2)/fan_in), reproducible per seed") {
  nn::STUNet a(nn::presets::small), b(nn::presets::small);
  a.init_he(7);
  b.init_he(7);
  auto w = a.conv_blocks_context->operator[](1)[0].conv2->weight;  // 32x32x27 weights, fan_in 864
  auto v = w.to_vector<double>();
  double m = 0, s = 0;
  for (double x : v) m += x;
  m /= static_cast<double>(v.size());
  for (double x : v) s += (x - m) * (x - m);
  s = std::sqrt(s / static_cast<double>(v.size()));
  CHECK(s == doctest::Approx(std::sqrt(2.0 / (1 + 1e-4) / 864.0)).epsilon(0.02));
  CHECK(std::abs(m) < 0.002);
  CHECK(a.conv_blocks_context->operator[](1)[0].conv2->bias.to_vector<double>() == std::vector<double>(32, 0.0));
  CHECK(testing::max_abs_diff(w, b.conv_blocks_context->operator[](1)[0].conv2->weight) == 0.0);
}

TEST_CASE("golden: the tiny STU-Net matches PyTorch's outputs, DC+CE loss and every gradient") {
  if (testing::shared_dir().empty()) {
    MESSAGE("skipping: ../shared is absent (golden/stunet_tiny.safetensors)");
    return;
  }
  auto g = io::read_safetensors(testing::shared_dir() / "golden" / "stunet_tiny.safetensors");
  nn::STUNetConfig c{.in_channels = 1, .num_classes = 3, .depth = {1, 1, 1, 1, 1, 1}, .dims = {4, 8, 8, 16, 16, 16}};
  nn::STUNet net(c);
  nn::StateDict weights;
  for (const auto& [k, t] : g.tensors)
    if (k.rfind("conv_blocks", 0) == 0 || k.rfind("upsample", 0) == 0 || k.rfind("seg_outputs", 0) == 0)
      weights.emplace_back(k, t);
  auto report = net.load_state_dict(weights, /*strict=*/true);
  CHECK(report.loaded.size() == weights.size());

  Tensor x = g.at("input").detach().clone().set_requires_grad();
  auto outputs = net.forward(x);
  REQUIRE(outputs.size() == 5);
  std::vector<Tensor> targets;
  double worst_output = 0, worst_grad = 0;
  for (int i = 0; i < 5; ++i) {
    CAPTURE(i);
    const Tensor& ref = g.at(fmt::format("output.{}", i));
    REQUIRE(outputs[static_cast<std::size_t>(i)].shape() == ref.shape());
    const double rel = testing::max_rel_diff(outputs[static_cast<std::size_t>(i)], ref);
    worst_output = std::max(worst_output, rel);
    CHECK(rel < 1e-4);
    targets.push_back(g.at(fmt::format("target.{}", i)));
  }
  auto w = train::deep_supervision_weights(5);
  Tensor loss = train::deep_supervision_loss(outputs, targets, w);
  const double ref_loss = std::stod(g.metadata.at("loss"));
  const double loss_rel = std::abs(loss.item() - ref_loss) / std::abs(ref_loss);
  CHECK(loss_rel < 1e-5);
  loss.backward();
  // Relative error against the gradient scale of the layer. A conv bias that
  // feeds an instance norm has a true gradient of exactly zero (the norm
  // removes per-channel constants: PyTorch's float64 value is ~1e-15), so its
  // scale is taken from the weight gradient of the same conv. The coarsest
  // head has loss weight 0: no gradient at all, as in PyTorch (zeros there).
  auto max_abs = [](const Tensor& t) {
    double m = 0;
    for (double v : t.to_vector<double>()) m = std::max(m, std::abs(v));
    return m;
  };
  for (const auto& [k, p] : net.named_parameters()) {
    CAPTURE(k);
    const Tensor& ref = g.at("grad." + k);
    Tensor mine = p.grad().defined() ? p.grad() : Tensor::zeros(p.shape());
    double scale = max_abs(ref);
    if (k.size() > 5 && k.compare(k.size() - 5, 5, ".bias") == 0)
      scale = std::max(scale, max_abs(g.at("grad." + k.substr(0, k.size() - 5) + ".weight")));
    if (scale == 0.0) {
      CHECK(max_abs(mine) == 0.0);
    } else {
      const double rel = testing::max_abs_diff(mine, ref) / scale;
      worst_grad = std::max(worst_grad, rel);
      CHECK(rel < 1e-3);
    }
  }
  const double input_rel = testing::max_rel_diff(x.grad(), g.at("input.grad"));
  CHECK(input_rel < 1e-3);
  MESSAGE(fmt::format("golden float32 vs PyTorch float64: outputs {:.2e}, loss {:.2e}, parameter grads {:.2e}, "
                      "input grad {:.2e} (relative)",
                      worst_output, loss_rel, worst_grad, input_rel));
}

TEST_CASE("load_state_dict: strict refuses missing, unexpected and mis-shaped keys and changes nothing") {
  nn::STUNetConfig c{.in_channels = 1, .num_classes = 3, .depth = {1, 1, 1, 1, 1, 1}, .dims = {4, 8, 8, 16, 16, 16}};
  nn::STUNet net(c);
  net.init_he(3);
  nn::StateDict sd;
  for (const auto& [k, t] : net.state_dict()) sd.emplace_back(k, t.detach().clone());
  nn::STUNet other(c);
  CHECK(other.load_state_dict(sd).loaded.size() == sd.size());
  CHECK(testing::max_abs_diff(other.seg_outputs->operator[](0).weight, net.seg_outputs->operator[](0).weight) == 0);

  nn::STUNet fresh(c);
  auto missing = sd;
  missing.pop_back();
  CHECK_THROWS_WITH_AS(fresh.load_state_dict(missing), Contains("seg_outputs.4.bias"), Error);
  auto extra = sd;
  extra.emplace_back("decoder.extra.weight", Tensor::zeros({2}));
  CHECK_THROWS_WITH_AS(fresh.load_state_dict(extra), Contains("decoder.extra.weight"), Error);
  auto wrong = sd;
  wrong[0].second = Tensor::zeros({4, 2, 3, 3, 3});
  CHECK_THROWS_WITH_AS(fresh.load_state_dict(wrong), Contains("[4, 2, 3, 3, 3]"), Error);
  // Nothing was copied by the failed strict loads.
  CHECK(fresh.seg_outputs->operator[](0).weight.to_vector<double>() ==
        std::vector<double>(static_cast<std::size_t>(fresh.seg_outputs->operator[](0).weight.numel()), 0.0));
  auto report = fresh.load_state_dict(wrong, /*strict=*/false);
  CHECK(report.mismatched.size() == 1);
  CHECK(report.loaded.size() == sd.size() - 1);
}

TEST_CASE("fine-tuning load: heads stay fresh, input channels repeated, mismatches refused") {
  nn::STUNetConfig c{.in_channels = 1, .num_classes = 3, .depth = {1, 1, 1, 1, 1, 1}, .dims = {4, 8, 8, 16, 16, 16}};
  nn::STUNet pre(c);
  pre.init_he(11);
  nn::StateDict sd;
  for (const auto& [k, t] : pre.state_dict()) sd.emplace_back(k, t.detach().clone());

  nn::STUNetConfig down = c;
  down.in_channels = 3;
  down.num_classes = 5;
  nn::STUNet net(down);
  net.init_he(12);
  const Tensor fresh_head = net.seg_outputs->operator[](4).weight.detach().clone();
  auto report = nn::load_pretrained(net, sd);
  CHECK(report.missing.empty());
  CHECK(report.reshaped.size() == 2);
  CHECK(report.skipped.size() == 10);  // 5 heads x (weight, bias)
  CHECK(report.loaded.size() == sd.size() - 10);
  CHECK(testing::max_abs_diff(net.seg_outputs->operator[](4).weight, fresh_head) == 0.0);
  // Every input channel of the first conv holds the pretrained single channel.
  const Tensor& w_new = net.conv_blocks_context->operator[](0)[0].conv1->weight;
  const Tensor& w_old = pre.conv_blocks_context->operator[](0)[0].conv1->weight;
  for (std::int64_t ch = 0; ch < 3; ++ch)
    CHECK(testing::max_abs_diff(w_new.detach().box({0, ch, 0, 0, 0}, {4, 1, 3, 3, 3}), w_old.detach()) == 0.0);
  CHECK(testing::max_abs_diff(net.upsample_layers->operator[](2).conv->weight,
                              pre.upsample_layers->operator[](2).conv->weight) == 0.0);
  // A pretrained model of another width cannot be fine-tuned into this one.
  nn::STUNetConfig wide = down;
  wide.dims[2] = 12;
  nn::STUNet other(wide);
  CHECK_THROWS_WITH_AS(nn::load_pretrained(other, sd), Contains("conv_blocks_context.2.0.conv1.weight"), Error);
}
