#pragma once
/// \file
/// The recorded graph: a Node per differentiable op, holding edges to the
/// nodes (or leaf accumulators) of its inputs and the tensors its backward
/// needs. Ops build nodes with should_record() / connect() / set_history().

#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "stunet/core/tensor.hpp"
#include "stunet/autograd/grad_mode.hpp"

namespace stunet::autograd {

class Node;

/// Where the gradient of one input goes, with the input's shape and dtype so
/// the engine can check what a backward returns.
struct Edge {
  std::shared_ptr<Node> node;  // null: this input needs no gradient
  Shape shape;
  DType dtype = DType::f32;
};

/// A tensor kept for backward, with the storage version at save time: if an
/// in-place op writes it before backward, unpacking throws instead of
/// silently computing a wrong gradient.
class SavedTensor {
 public:
  SavedTensor() = default;
  explicit SavedTensor(const Tensor& t) : data_(t.detach()), version_(t.storage()->version()) {}
  Tensor unpack(const char* node_name) const {
    STUNET_CHECK(data_.defined(),
                 "{}: saved tensors were already freed (backward through the same graph twice)", node_name);
    STUNET_CHECK(data_.storage()->version() == version_,
                 "{}: a tensor of shape {} saved for backward was modified in place afterwards (version {} -> {})",
                 node_name, data_.shape(), version_, data_.storage()->version());
    return data_;
  }

 private:
  Tensor data_;
  std::uint64_t version_ = 0;
};

/// One recorded op. apply() maps the gradient of the output to gradients of
/// the inputs (one per edge; undefined where an input needs none).
class Node {
 public:
  virtual ~Node() = default;
  /// The op's name as PyTorch would print it ("Conv3dBackward").
  virtual std::string name() const = 0;
  /// grad_output has the output's shape; returns next_edges.size() tensors.
  virtual std::vector<Tensor> apply(const Tensor& grad_output) = 0;

  /// Keeps `t` for backward; returns its slot for saved(i).
  std::size_t save(const Tensor& t) {
    saved_.emplace_back(t);
    return saved_.size() - 1;
  }
  /// The tensor saved in slot i (throws if freed or modified in place).
  Tensor saved(std::size_t i) const {
    STUNET_CHECK(!released_, "{}: saved tensors were already freed (backward through the same graph twice)", name());
    return saved_.at(i).unpack(name().c_str());
  }
  /// Frees what was saved; the engine calls it right after apply().
  void release_saved() {
    saved_.clear();
    saved_.shrink_to_fit();
    released_ = true;
  }
  bool needs_input_grad(std::size_t i) const { return i < next_edges.size() && next_edges[i].node != nullptr; }

  std::vector<Edge> next_edges;

 private:
  std::vector<SavedTensor> saved_;
  bool released_ = false;
};

/// The sink for a leaf that requires grad: adds incoming gradients into
/// leaf.grad(). Shared by all uses of that leaf in a graph.
class AccumulateGrad final : public Node {
 public:
  explicit AccumulateGrad(Tensor leaf) : leaf_(std::move(leaf)) {}
  std::string name() const override { return "AccumulateGrad"; }
  std::vector<Tensor> apply(const Tensor& grad_output) override;
  const Tensor& leaf() const { return leaf_; }

 private:
  Tensor leaf_;
};

/// True when an op on `inputs` must record a node (grad mode on and at least
/// one defined input requires grad).
inline bool should_record(std::initializer_list<Tensor> inputs) {
  if (!grad_enabled()) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

/// The edge that a gradient for `t` must follow.
inline Edge edge_for(const Tensor& t) {
  Edge e;
  if (!t.defined() || !t.requires_grad()) return e;
  e.shape = t.shape();
  e.dtype = t.dtype();
  AutogradMeta& m = t.autograd_meta();
  if (m.grad_fn) {
    e.node = m.grad_fn;
  } else {
    auto acc = m.accumulator.lock();
    if (!acc) {
      acc = std::make_shared<AccumulateGrad>(t);
      m.accumulator = acc;
    }
    e.node = std::move(acc);
  }
  return e;
}

/// Sets node.next_edges from the op's inputs, in the order apply() returns.
inline void connect(Node& node, std::initializer_list<Tensor> inputs) {
  node.next_edges.clear();
  for (const Tensor& t : inputs) node.next_edges.push_back(edge_for(t));
}

/// Makes `node` the producer of `out` (out becomes a non-leaf).
inline void set_history(const Tensor& out, std::shared_ptr<Node> node) {
  AutogradMeta& m = out.autograd_meta();
  m.requires_grad = true;
  m.grad_fn = std::move(node);
}

}  // namespace stunet::autograd

#include "stunet/autograd/tensor_methods.hpp"
#include "stunet/autograd/engine.hpp"
