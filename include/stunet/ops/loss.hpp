#pragma once
/// \file
/// The nnU-Net v2 training loss: cross-entropy on logits, soft Dice on
/// softmax probabilities (MemoryEfficientSoftDiceLoss), and their weighted
/// sum (DC_and_CE_loss).
///
/// Targets are label maps, [N, 1, spatial...] as nnU-Net's data loader
/// delivers them or [N, spatial...], of an integer dtype or a float dtype
/// holding whole numbers (nnU-Net keeps segmentations as floats and casts
/// inside the loss). Every label must be a class index in [0, C); ignore
/// labels and region-based (one-hot / sigmoid) training are not supported.

#include <cmath>
#include <string>
#include <vector>

#include "stunet/core/tensor.hpp"
#include "stunet/cpu/loss.hpp"
#include "stunet/ops/elementwise.hpp"
#include "stunet/ops/softmax.hpp"

namespace stunet {

namespace detail {

/// Checks that `input` ([N, C, spatial...] float scores) and `target` (a
/// label map for it) fit together and returns the labels as dense int32
/// [N, V], V = voxels per image. `op` and `input_name` go into the errors.
inline Tensor loss_class_labels(const Tensor& input, const Tensor& target, const char* op, const char* input_name) {
  STUNET_CHECK(input.defined() && target.defined(), "{}: undefined {} or target", op, input_name);
  const int r = input.rank();
  STUNET_CHECK(r >= 2, "{}: {} must be [N, C, spatial...], got shape {}", op, input_name, input.shape());
  STUNET_CHECK(input.dtype() == DType::f32 || input.dtype() == DType::f64 ||
                   (input.device().is_cuda() && is_floating(input.dtype())),
               "{}: {} must be float32 or float64{}, got {} (shape {})", op, input_name,
               input.device().is_cuda() ? " (or float16 / bfloat16 on CUDA)" : "", input.dtype(), input.shape());
  STUNET_CHECK(input.device() == target.device(), "{}: {} of shape {} is on {} but target of shape {} on {}", op,
               input_name, input.shape(), input.device(), target.shape(), target.device());
  const std::int64_t N = input.size(0), C = input.size(1);
  STUNET_CHECK(C >= 1, "{}: {} of shape {} has no classes", op, input_name, input.shape());
  STUNET_CHECK(input.numel() > 0, "{}: {} of shape {} is empty (the mean over no voxels is undefined)", op,
               input_name, input.shape());

  const int rt = target.rank();
  STUNET_CHECK(rt == r || rt == r - 1,
               "{}: target of shape {} does not fit {} of shape {}: expected [N, 1, spatial...] or [N, spatial...]",
               op, target.shape(), input_name, input.shape());
  STUNET_CHECK(rt == r - 1 || target.size(1) == 1,
               "{}: target of shape {} has {} channels, expected a label map [N, 1, spatial...] for {} of shape {} "
               "(one-hot targets are not supported)",
               op, target.shape(), target.size(1), input_name, input.shape());
  STUNET_CHECK(target.size(0) == N,
               "{}: target batch size {} differs from {} batch size {} (target shape {}, {} shape {})",
               op, target.size(0), input_name, N, target.shape(), input_name, input.shape());
  const int t_off = rt - r;  // target dim of input dim i is i + t_off (for i >= 2)
  bool spatial_ok = true;
  for (int i = 2; i < r; ++i) spatial_ok = spatial_ok && target.size(i + t_off) == input.size(i);
  if (!spatial_ok) {
    Shape in_sp(input.shape().span().subspan(2));
    Shape t_sp(target.shape().span().subspan(static_cast<std::size_t>(2 + t_off)));
    STUNET_FAIL("{}: target spatial shape {} differs from {} spatial shape {} (target shape {}, {} shape {})", op, t_sp,
                input_name, in_sp, target.shape(), input_name, input.shape());
  }

  const std::int64_t V = input.numel() / (N * C);
  Tensor tc = target.detach().contiguous();
  Tensor labels = Tensor::empty(Shape{N, V}, DType::i32, input.device());
  const std::int64_t bad =
      input.device().is_cuda()
          ? cuda_entry(cuda_kernels().class_labels, op)(target.dtype(), tc.raw_data(), labels.data<std::int32_t>(),
                                                        N * V, C, input.device().index)
          : dispatch_all(target.dtype(), [&]<class L>() {
              return cpu::class_labels(tc.data<L>(), labels.data<std::int32_t>(), N * V, C);
            });
  if (bad >= 0) {
    if (!tc.device().is_cpu()) tc = tc.to(Device::cpu());  // for the message only
    const double value = dispatch_all(target.dtype(), [&]<class L>() { return to_double(tc.data<L>()[bad]); });
    // The position as [n, spatial...] so a bad voxel can be found in the volume.
    std::string where = fmt::format("[{}", bad / V);
    std::int64_t rest = bad % V, stride = V;
    for (int i = 2; i < r; ++i) {
      stride /= input.size(i);
      where += fmt::format(", {}", rest / stride);
      rest %= stride;
    }
    where += "]";
    const bool integral = std::isfinite(value) && value == std::floor(value);
    STUNET_FAIL("{}: target value {} at {} is {}; labels must be integers in [0, C) with C = {} ({} shape {}, "
                "target {} of shape {})",
                op, value, where, integral ? "not a valid class" : "not an integral class index", C, input_name,
                input.shape(), target.dtype(), target.shape());
  }
  return labels;
}

}  // namespace detail

namespace autograd {

/// Gradient of the mean cross-entropy w.r.t. the logits:
/// (softmax - onehot) * g / (N * V). Saves the logits, the labels and the
/// per-voxel log-sum-exp, so no [N, C, V] softmax buffer is kept.
class CrossEntropyBackward final : public Node {
 public:
  std::string name() const override { return "CrossEntropyBackward"; }
  std::vector<Tensor> apply(const Tensor& g) override {
    Tensor x = saved(0), labels = saved(1), lse = saved(2);
    const std::int64_t N = x.size(0), C = x.size(1), V = labels.size(1);
    Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device());
    const double factor = g.item() / static_cast<double>(N * V);
    if (x.device().is_cuda()) {
      detail::cuda_entry(cuda_kernels().cross_entropy_backward, "cross_entropy backward")(
          x.dtype(), x.raw_data(), labels.data<std::int32_t>(), lse.raw_data(), dx.raw_data(), N, C, V, factor,
          x.device().index);
      return {dx};
    }
    dispatch_float(x.dtype(), "cross_entropy backward", [&]<class T>() {
      cpu::cross_entropy_backward(x.data<T>(), labels.data<std::int32_t>(), lse.data<T>(), dx.data<T>(), N, C, V,
                                  static_cast<T>(factor));
    });
    return {dx};
  }
};

/// Gradient of soft Dice w.r.t. the probabilities: the loss depends on p only
/// through the per-group sums, so dp[n, c, v] = g * (a[n, c] * onehot + b[n, c])
/// with a, b fixed in the forward pass (zero for a dropped background).
class SoftDiceBackward final : public Node {
 public:
  SoftDiceBackward(Shape shape, std::vector<double> a, std::vector<double> b)
      : shape_(shape), a_(std::move(a)), b_(std::move(b)) {}
  std::string name() const override { return "SoftDiceBackward"; }
  std::vector<Tensor> apply(const Tensor& g) override {
    Tensor labels = saved(0);
    const std::int64_t N = shape_[0], C = shape_[1], V = labels.size(1);
    const double gv = g.item();
    std::vector<double> a(a_.size()), b(b_.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      a[i] = gv * a_[i];
      b[i] = gv * b_[i];
    }
    Tensor dx = Tensor::empty(shape_, g.dtype(), g.device());
    if (g.device().is_cuda()) {
      detail::cuda_entry(cuda_kernels().dice_backward, "soft_dice_loss backward")(
          g.dtype(), labels.data<std::int32_t>(), dx.raw_data(), N, C, V, a.data(), b.data(), g.device().index);
      return {dx};
    }
    dispatch_float(g.dtype(), "soft_dice_loss backward", [&]<class T>() {
      cpu::dice_backward(labels.data<std::int32_t>(), dx.data<T>(), N, C, V, a.data(), b.data());
    });
    return {dx};
  }

 private:
  Shape shape_;
  std::vector<double> a_, b_;
};

}  // namespace autograd

/// Mean cross-entropy of class scores against a label map, as
/// torch.nn.CrossEntropyLoss() (reduction "mean") and nnU-Net's
/// RobustCrossEntropyLoss: mean over n and voxels of
/// logsumexp_c(logits) - logits[target]. Fused log-sum-exp, summed in double.
/// logits: [N, C, spatial...] float32/float64 (rank >= 2);
/// target: [N, 1, spatial...] or [N, spatial...], integer or integral-valued
/// float, every value in [0, C) (else stunet::Error naming the value and C).
/// Returns a rank-0 tensor of the logits' dtype; differentiable w.r.t.
/// logits only.
inline Tensor cross_entropy(const Tensor& logits, const Tensor& target) {
  Tensor labels = detail::loss_class_labels(logits, target, "cross_entropy", "logits");
  const std::int64_t N = logits.size(0), C = logits.size(1), V = labels.size(1);
  Tensor xc = logits.detach().contiguous();
  Tensor lse = Tensor::empty(Shape{N, V}, logits.dtype(), logits.device());
  const double total =
      logits.device().is_cuda()
          ? detail::cuda_entry(cuda_kernels().cross_entropy_forward, "cross_entropy")(
                logits.dtype(), xc.raw_data(), labels.data<std::int32_t>(), lse.raw_data(), N, C, V,
                logits.device().index)
          : dispatch_float(logits.dtype(), "cross_entropy", [&]<class T>() {
              return cpu::cross_entropy_forward(xc.data<T>(), labels.data<std::int32_t>(), lse.data<T>(), N, C, V);
            });
  Tensor out = Tensor::full(Shape{}, total / static_cast<double>(N * V), logits.dtype(), logits.device());
  if (autograd::should_record({logits})) {
    auto node = std::make_shared<autograd::CrossEntropyBackward>();
    node->save(xc);
    node->save(labels);
    node->save(lse);
    autograd::connect(*node, {logits});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

/// Options of soft Dice; the defaults are what nnU-Net v2's trainer passes
/// (its batch_dice comes from the plans' configuration).
struct SoftDiceOptions {
  /// Sum intersect / pred / gt over the batch before the ratio (one Dice per
  /// class) instead of one Dice per (image, class).
  bool batch_dice = true;
  /// Include channel 0 (background) in the mean.
  bool do_bg = false;
  /// Added to numerator and denominator; makes an absent class score 1.
  double smooth = 1e-5;
};

/// Negative mean soft Dice, exactly nnU-Net v2's MemoryEfficientSoftDiceLoss
/// on probabilities the caller has already softmaxed (apply_nonlin). Per
/// (n, c), with y the one-hot target: intersect = sum x*y, sum_pred = sum x,
/// sum_gt = sum y over spatial axes (summed over n too when batch_dice;
/// channel 0 dropped unless do_bg); dc = (2*intersect + smooth) /
/// max(sum_gt + sum_pred + smooth, 1e-8); loss = -mean(dc).
/// probs: [N, C, spatial...] float32/float64; target: as for cross_entropy.
/// Returns a rank-0 tensor of probs' dtype; differentiable w.r.t. probs only.
inline Tensor soft_dice_loss(const Tensor& probs, const Tensor& target, SoftDiceOptions opt = {}) {
  Tensor labels = detail::loss_class_labels(probs, target, "soft_dice_loss", "probs");
  const std::int64_t N = probs.size(0), C = probs.size(1), V = labels.size(1);
  const std::int64_t c0 = opt.do_bg ? 0 : 1;
  STUNET_CHECK(C > c0, "soft_dice_loss: probs of shape {} have no class left to score with do_bg = false",
               probs.shape());
  Tensor pc = probs.detach().contiguous();

  const std::size_t rows = static_cast<std::size_t>(N * C);
  std::vector<double> inter(rows, 0.0), pred(rows, 0.0), gt(rows, 0.0);
  if (probs.device().is_cuda()) {
    detail::cuda_entry(cuda_kernels().dice_sums, "soft_dice_loss")(probs.dtype(), pc.raw_data(),
                                                                   labels.data<std::int32_t>(), N, C, V, c0,
                                                                   inter.data(), pred.data(), gt.data(),
                                                                   probs.device().index);
  } else {
    dispatch_float(probs.dtype(), "soft_dice_loss", [&]<class T>() {
      cpu::dice_sums(pc.data<T>(), labels.data<std::int32_t>(), N, C, V, c0, inter.data(), pred.data(), gt.data());
    });
  }

  // Group k of row (n, c): c with batch_dice, (n, c) otherwise.
  const std::int64_t groups_n = opt.batch_dice ? 1 : N;
  const std::int64_t K = groups_n * (C - c0);
  auto group_of = [&](std::int64_t n, std::int64_t c) { return (opt.batch_dice ? 0 : n) * C + c; };
  std::vector<double> gi(static_cast<std::size_t>(groups_n * C), 0.0), gp(gi), gg(gi);
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = c0; c < C; ++c) {
      const auto k = static_cast<std::size_t>(group_of(n, c));
      const auto row = static_cast<std::size_t>(n * C + c);
      gi[k] += inter[row];
      gp[k] += pred[row];
      gg[k] += gt[row];
    }

  // dc_k = (2 I + s) / D, D = max(G + P + s, 1e-8). With L = -mean(dc):
  // dL/dI = -2 / (K D); dL/dP = (2 I + s) / (K D^2) unless D was clipped,
  // where the denominator is a constant and passes no gradient.
  double dc_sum = 0.0;
  std::vector<double> da(gi.size(), 0.0), db(gi.size(), 0.0);
  for (std::int64_t g = 0; g < groups_n; ++g)
    for (std::int64_t c = c0; c < C; ++c) {
      const auto k = static_cast<std::size_t>(g * C + c);
      const double num = 2.0 * gi[k] + opt.smooth;
      const double raw_den = gg[k] + gp[k] + opt.smooth;
      const bool clipped = raw_den < 1e-8;
      const double den = clipped ? 1e-8 : raw_den;
      dc_sum += num / den;
      da[k] = -2.0 / (static_cast<double>(K) * den);
      db[k] = clipped ? 0.0 : num / (static_cast<double>(K) * den * den);
    }
  Tensor out = Tensor::full(Shape{}, -dc_sum / static_cast<double>(K), probs.dtype(), probs.device());

  if (autograd::should_record({probs})) {
    std::vector<double> a(rows, 0.0), b(rows, 0.0);
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t c = c0; c < C; ++c) {
        const auto k = static_cast<std::size_t>(group_of(n, c));
        a[static_cast<std::size_t>(n * C + c)] = da[k];
        b[static_cast<std::size_t>(n * C + c)] = db[k];
      }
    auto node = std::make_shared<autograd::SoftDiceBackward>(probs.shape(), std::move(a), std::move(b));
    node->save(labels);
    autograd::connect(*node, {probs});
    autograd::set_history(out, std::move(node));
  }
  return out;
}

/// Weights of the compound loss; the defaults are nnU-Net v2's.
struct DcCeOptions {
  double weight_ce = 1;
  double weight_dice = 1;
  SoftDiceOptions dice;
};

/// nnU-Net v2's DC_and_CE_loss: weight_ce * cross_entropy(logits, target) +
/// weight_dice * soft_dice_loss(softmax(logits, 1), target, opt.dice). As in
/// nnU-Net, a term whose weight is 0 is not computed (with both weights 0 the
/// result is 0 * cross_entropy, which still has a graph to backpropagate).
/// logits: [N, C, spatial...] float32/float64; target: as for cross_entropy.
/// Returns a rank-0 tensor; differentiable w.r.t. logits.
inline Tensor dc_and_ce_loss(const Tensor& logits, const Tensor& target, DcCeOptions opt = {}) {
  auto weighted = [](const Tensor& t, double w) { return w == 1.0 ? t : scale(t, w); };
  Tensor dc, ce;
  // Cross-entropy first: its checks name the logits, where softmax's would not.
  if (opt.weight_ce != 0.0 || opt.weight_dice == 0.0) ce = weighted(cross_entropy(logits, target), opt.weight_ce);
  if (opt.weight_dice != 0.0) dc = weighted(soft_dice_loss(softmax(logits, 1), target, opt.dice), opt.weight_dice);
  if (!dc.defined()) return ce;
  if (!ce.defined()) return dc;
  return add(ce, dc);
}

}  // namespace stunet
