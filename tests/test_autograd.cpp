// The tape: gradient accumulation, no-grad, freeing saved tensors, in-place
// detection, error cases. Square below is also the smallest example of how a
// user writes an op with its backward.
#include <memory>

#include "testing.hpp"
#include "stunet/ops/elementwise.hpp"

using namespace stunet;
using doctest::Contains;

namespace {

/// y = x * x elementwise (float64), saving x for backward. `wrong` makes the
/// backward deliberately incorrect, to show the gradient check can fail.
class SquareBackward final : public autograd::Node {
 public:
  explicit SquareBackward(bool wrong) : wrong_(wrong) {}
  std::string name() const override { return "SquareBackward"; }
  std::vector<Tensor> apply(const Tensor& g) override {
    Tensor x = saved(0);
    Tensor dx = Tensor::empty(x.shape(), DType::f64);
    const double* px = x.data<double>();
    const double* pg = g.contiguous().data<double>();
    double* pd = dx.data<double>();
    for (std::int64_t i = 0; i < x.numel(); ++i) pd[i] = (wrong_ ? 1.9 : 2.0) * px[i] * pg[i];
    return {dx};
  }

 private:
  bool wrong_;
};

Tensor square(const Tensor& x, bool wrong = false) {
  Tensor xc = x.contiguous();
  Tensor y = Tensor::empty(x.shape(), DType::f64);
  for (std::int64_t i = 0; i < x.numel(); ++i) y.data<double>()[i] = xc.data<double>()[i] * xc.data<double>()[i];
  if (autograd::should_record({x})) {
    auto node = std::make_shared<SquareBackward>(wrong);
    node->save(xc);
    autograd::connect(*node, {x});
    autograd::set_history(y, node);
  }
  return y;
}

}  // namespace

TEST_CASE("a tensor feeding several consumers receives the sum of their gradients") {
  Tensor x = Tensor::from_vector<double>({1, 2, 3}, {3}).set_requires_grad();
  sum(add(x, x)).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{2, 2, 2});
  // Paths of different length to one node: y feeds both add and scale->scale.
  x.zero_grad();
  CHECK_FALSE(x.grad().defined());
  Tensor y = scale(x, 2);
  sum(add(scale(scale(y, 3), 1), y)).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{8, 8, 8});
  // A second backward adds to what is there, as in PyTorch.
  sum(scale(x, 0.5)).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{8.5, 8.5, 8.5});
}

TEST_CASE("grad of a custom op with saved tensors - the checker catches a wrong backward") {
  Tensor x = testing::random_tensor({3, 4}, DType::f64, 7).set_requires_grad();
  testing::check_gradients([](const std::vector<Tensor>& in) { return square(add(in[0], in[0])); }, {x});
  auto err = testing::gradient_error([](const std::vector<Tensor>& in) { return square(in[0], /*wrong=*/true); }, {x});
  CHECK(err.worst > 1e-3);
}

TEST_CASE("NoGradGuard records nothing") {
  Tensor x = Tensor::ones({4}, DType::f64).set_requires_grad();
  {
    NoGradGuard guard;
    CHECK_FALSE(grad_enabled());
    Tensor y = square(scale(x, 3));
    CHECK_FALSE(y.requires_grad());
    CHECK(y.grad_fn() == nullptr);
    CHECK_THROWS_WITH_AS(y.backward(), Contains("does not require grad"), Error);
  }
  CHECK(grad_enabled());
  CHECK(scale(x, 3).requires_grad());
}

TEST_CASE("saved tensors are freed as soon as backward has used them") {
  Tensor x = testing::random_tensor({16}, DType::f64, 1).set_requires_grad();
  Tensor t = square(x);  // intermediate: only the next node keeps it
  std::weak_ptr<Storage> t_storage = t.storage();
  Tensor loss = sum(square(t));
  t = Tensor();
  CHECK_FALSE(t_storage.expired());  // held by the second SquareBackward
  loss.backward();
  CHECK(t_storage.expired());
  CHECK_THROWS_WITH_AS(loss.backward(), Contains("already freed"), Error);
}

TEST_CASE("an in-place write to a saved tensor makes backward fail loudly") {
  Tensor x = Tensor::from_vector<double>({1, 2}, {2}).set_requires_grad();
  Tensor h = scale(x, 1.0);
  Tensor loss = sum(square(h));
  h.detach().fill_(5.0);  // same storage, version bumped
  CHECK_THROWS_WITH_AS(loss.backward(), Contains("modified in place"), Error);
}

TEST_CASE("errors: backward needs a scalar or an explicit gradient - only float leaves require grad") {
  Tensor x = Tensor::ones({2, 3}, DType::f64).set_requires_grad();
  Tensor y = scale(x, 2);
  CHECK_THROWS_WITH_AS(y.backward(), Contains("[2, 3]"), Error);
  CHECK_THROWS_WITH_AS(y.backward(Tensor::ones({3, 2}, DType::f64)), Contains("[3, 2]"), Error);
  y.backward(Tensor::full({2, 3}, 0.5, DType::f64));
  CHECK(x.grad().to_vector<double>() == std::vector<double>(6, 1.0));
  CHECK_THROWS_WITH_AS(y.set_requires_grad(), Contains("leaf"), Error);
  CHECK_THROWS_WITH_AS(Tensor::zeros({2}, DType::i64).set_requires_grad(), Contains("int64"), Error);
  CHECK_THROWS_WITH_AS(x.fill_(1.0), Contains("leaf"), Error);
  CHECK_THROWS_WITH_AS(x.box({0, 0}, {1, 1}), Contains("detach"), Error);
}

TEST_CASE("detach shares data without history - dtype conversion is differentiable") {
  Tensor x = Tensor::from_vector<double>({1, 2, 3}, {3}).set_requires_grad();
  Tensor d = x.detach();
  CHECK(d.storage() == x.storage());
  CHECK_FALSE(d.requires_grad());
  Tensor y = x.to(DType::f32);
  CHECK(y.requires_grad());
  Tensor loss = sum(scale(y, 4)).to(DType::f64);
  loss.backward();
  CHECK(x.grad().dtype() == DType::f64);
  CHECK(x.grad().to_vector<double>() == std::vector<double>{4, 4, 4});
  CHECK_THROWS_WITH_AS(x.to(DType::i32), Contains("not differentiable"), Error);
}

TEST_CASE("a leaf used as the root accumulates ones") {
  Tensor x = Tensor::full({}, 3.0, DType::f64).set_requires_grad();
  x.backward();
  CHECK(x.grad().item() == 1.0);
}
