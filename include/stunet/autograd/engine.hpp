#pragma once
/// \file
/// The backward pass: walks the graph from a root in dependency order, sums
/// the gradients that reach a node from several consumers (residual adds, skip
/// concats), runs each node once and frees what it saved right after.

#include <unordered_map>
#include <vector>

#include "stunet/autograd/node.hpp"

namespace stunet {

namespace detail {
/// acc += g elementwise (host, same shape and dtype, acc dense).
inline void accumulate_into(const Tensor& acc, const Tensor& g) {
  STUNET_CHECK(acc.shape() == g.shape() && acc.dtype() == g.dtype(),
               "gradient accumulation: {} {} += {} {}", acc.dtype(), acc.shape(), g.dtype(), g.shape());
  STUNET_CHECK(acc.device() == g.device(), "gradient accumulation: {} gradient on {} into {}", g.shape(), g.device(),
               acc.device());
  Tensor gc = g.contiguous();
  if (acc.device().is_cuda()) {
    if (acc.numel() > 0)
      require_cuda_kernel(cuda_kernels().add, "gradient accumulation")(acc.dtype(), acc.raw_data(), gc.raw_data(), 1.0,
                                                                       acc.raw_data(), acc.numel(),
                                                                       acc.device().index);
    acc.storage()->bump_version();
    return;
  }
  dispatch_float(acc.dtype(), "gradient accumulation", [&]<class T>() {
    T* a = acc.data<T>();
    const T* b = gc.data<T>();
    const std::int64_t n = acc.numel();
    for (std::int64_t i = 0; i < n; ++i) a[i] += b[i];
  });
  acc.storage()->bump_version();
}
}  // namespace detail

namespace autograd {

inline std::vector<Tensor> AccumulateGrad::apply(const Tensor& g) {
  AutogradMeta& m = leaf_.autograd_meta();
  if (!m.grad.defined()) {
    // Own the buffer: g may alias a tensor the caller or another node holds.
    m.grad = detail::dense_copy(g, g.dtype());
  } else {
    detail::accumulate_into(m.grad, g);
  }
  return {};
}

/// Reverse-mode pass from `root` with d(root) = `gradient` (ones for a
/// one-element root when undefined). Leaves that require grad receive their
/// gradient in .grad(), added to what is there.
inline void run_backward(const Tensor& root, const Tensor& gradient) {
  STUNET_CHECK(root.defined(), "backward(): undefined tensor");
  STUNET_CHECK(root.requires_grad(),
               "backward(): the tensor of shape {} does not require grad (no input of its graph requires grad, or it "
               "was computed under NoGradGuard)",
               root.shape());
  Tensor g = gradient;
  if (!g.defined()) {
    STUNET_CHECK(root.numel() == 1,
                 "backward(): a gradient must be given for a non-scalar tensor of shape {} (as in PyTorch)",
                 root.shape());
    g = Tensor::ones(root.shape(), root.dtype(), root.device());
  }
  STUNET_CHECK(g.shape() == root.shape() && g.dtype() == root.dtype(),
               "backward(): gradient {} {} does not match tensor {} {}", g.dtype(), g.shape(), root.dtype(),
               root.shape());

  NoGradGuard no_grad;
  Edge root_edge = edge_for(root);

  // Count, for every node reachable from the root, how many edges lead to it:
  // a node runs only once all of its consumers have delivered their gradient.
  std::unordered_map<Node*, int> dependencies;
  {
    std::vector<Node*> stack{root_edge.node.get()};
    std::unordered_map<Node*, bool> seen{{root_edge.node.get(), true}};
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      for (const Edge& e : n->next_edges) {
        if (!e.node) continue;
        ++dependencies[e.node.get()];
        if (!seen[e.node.get()]) {
          seen[e.node.get()] = true;
          stack.push_back(e.node.get());
        }
      }
    }
  }

  std::unordered_map<Node*, Tensor> pending;
  pending[root_edge.node.get()] = g;
  // Hold the root alive for the walk; children are kept alive by edges.
  std::shared_ptr<Node> root_node = root_edge.node;
  std::vector<Node*> ready{root_node.get()};
  while (!ready.empty()) {
    Node* n = ready.back();
    ready.pop_back();
    Tensor grad_out;
    if (auto it = pending.find(n); it != pending.end()) {
      grad_out = std::move(it->second);
      pending.erase(it);
    }
    std::vector<Tensor> grads;
    if (grad_out.defined()) {
      grads = n->apply(grad_out);
      grad_out = Tensor();
      STUNET_CHECK(grads.size() == n->next_edges.size() || grads.empty(),
                   "{} returned {} gradients for {} inputs", n->name(), grads.size(), n->next_edges.size());
    }
    n->release_saved();
    for (std::size_t i = 0; i < n->next_edges.size(); ++i) {
      const Edge& e = n->next_edges[i];
      if (!e.node) continue;
      if (i < grads.size() && grads[i].defined()) {
        const Tensor& gi = grads[i];
        STUNET_CHECK(gi.shape() == e.shape && gi.dtype() == e.dtype,
                     "{}: gradient {} {} for input {} does not match the input's {} {}", n->name(), gi.dtype(),
                     gi.shape(), i, e.dtype, e.shape);
        Tensor& slot = pending[e.node.get()];
        if (!slot.defined()) {
          slot = gi;
        } else {
          // A second consumer's gradient: sum into a buffer we own.
          Tensor sum = detail::dense_copy(slot, slot.dtype());
          detail::accumulate_into(sum, gi);
          slot = std::move(sum);
        }
      }
      if (--dependencies[e.node.get()] == 0) ready.push_back(e.node.get());
    }
  }
}

}  // namespace autograd

inline void Tensor::backward(const Tensor& gradient) const { autograd::run_backward(*this, gradient); }

}  // namespace stunet
