#pragma once
/// \file
/// Whether ops record a graph: on by default, off inside a NoGradGuard
/// (inference, optimiser updates). Per thread, like torch.no_grad().

namespace stunet {

namespace autograd {
inline bool& grad_mode_flag() {
  thread_local bool enabled = true;
  return enabled;
}
}  // namespace autograd

/// True when ops on tensors that require grad record backward nodes.
inline bool grad_enabled() { return autograd::grad_mode_flag(); }

/// RAII: disables recording for its scope and restores the previous mode.
class NoGradGuard {
 public:
  NoGradGuard() : previous_(autograd::grad_mode_flag()) { autograd::grad_mode_flag() = false; }
  ~NoGradGuard() { autograd::grad_mode_flag() = previous_; }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

}  // namespace stunet
