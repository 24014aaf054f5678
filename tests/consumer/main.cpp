// Downstream smoke test: a program that only knows stunet::stunet.
// loss = sum((a + b) + a): d loss / d a = 2 (a feeds two consumers, so its
// gradients accumulate), d loss / d b = 1.
#include <stunet/core/tensor.hpp>
#include <stunet/ops/elementwise.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <vector>

int main() {
  using stunet::Shape;
  using stunet::Tensor;
  try {
    Tensor a = Tensor::from_vector<float>(std::vector<float>{1, 2, 3, 4, 5, 6}, Shape{2, 3});
    Tensor b = Tensor::full(Shape{2, 3}, 0.5);
    a.set_requires_grad();
    b.set_requires_grad();

    Tensor loss = stunet::sum(stunet::add(stunet::add(a, b), a));
    loss.backward();

    const std::vector<float> ga = a.grad().to_vector<float>();
    const std::vector<float> gb = b.grad().to_vector<float>();
    std::printf("loss = %g\ngrad a =", loss.item());
    for (float g : ga) std::printf(" %g", g);
    std::printf("\ngrad b =");
    for (float g : gb) std::printf(" %g", g);
    std::printf("\n");

    bool ok = std::fabs(loss.item() - 45.0) < 1e-6 && ga.size() == 6 && gb.size() == 6;
    for (float g : ga) ok = ok && g == 2.0f;
    for (float g : gb) ok = ok && g == 1.0f;
    if (!ok) {
      std::fprintf(stderr, "stunet_consumer: wrong result (expected loss 45, grad a 2, grad b 1)\n");
      return 1;
    }
    std::printf("stunet_consumer: OK\n");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "stunet_consumer: %s\n", e.what());
    return 1;
  }
}
