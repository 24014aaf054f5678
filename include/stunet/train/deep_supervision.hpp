#pragma once
/// \file
/// nnU-Net's deep-supervision loss: the DC+CE loss of each decoder output
/// against the target downsampled (nearest) to its resolution, weighted
/// 1, 1/2, 1/4, ... with the coarsest output at weight 0, normalised to sum 1.

#include <vector>

#include "stunet/ops/elementwise.hpp"
#include "stunet/ops/loss.hpp"

namespace stunet::train {

/// nnU-Net v2's weights for n outputs: 1/2^i, the last set to 0, normalised.
/// For 5 outputs: 8/15, 4/15, 2/15, 1/15, 0.
inline std::vector<double> deep_supervision_weights(int n) {
  STUNET_CHECK(n >= 1, "deep_supervision_weights: {} outputs", n);
  std::vector<double> w(static_cast<std::size_t>(n));
  double total = 0;
  for (int i = 0; i < n; ++i) {
    w[static_cast<std::size_t>(i)] = (n > 1 && i == n - 1) ? 0.0 : 1.0 / static_cast<double>(1 << i);
    total += w[static_cast<std::size_t>(i)];
  }
  for (double& x : w) x /= total;
  return w;
}

/// sum_i weights[i] * DC_and_CE(outputs[i], targets[i]); terms of weight 0
/// are skipped entirely (as nnU-Net's DeepSupervisionWrapper does).
/// outputs[i]: [N, C, ...], targets[i]: [N, 1, ...] or [N, ...] label maps.
inline Tensor deep_supervision_loss(const std::vector<Tensor>& outputs, const std::vector<Tensor>& targets,
                                    const std::vector<double>& weights, DcCeOptions options = {}) {
  STUNET_CHECK(outputs.size() == targets.size() && outputs.size() == weights.size(),
               "deep_supervision_loss: {} outputs, {} targets, {} weights", outputs.size(), targets.size(),
               weights.size());
  Tensor total;
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    if (weights[i] == 0.0) continue;
    Tensor term = scale(dc_and_ce_loss(outputs[i], targets[i], options), weights[i]);
    total = total.defined() ? add(total, term) : term;
  }
  STUNET_CHECK(total.defined(), "deep_supervision_loss: every weight is zero");
  return total;
}

}  // namespace stunet::train
