#pragma once
/// \file
/// Tensor: a handle (like torch.Tensor) to a typed, strided view of a Storage,
/// plus the autograd metadata that makes it part of a recorded graph.
///
/// Copying a Tensor copies the handle: both copies share data, grad and
/// history. Storage is contiguous; views (box(), reshape()) share it with
/// other strides or offsets. Ops take any input and call contiguous() where
/// they need dense data.

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "stunet/core/cuda_kernels.hpp"
#include "stunet/core/device.hpp"
#include "stunet/core/dtype.hpp"
#include "stunet/core/error.hpp"
#include "stunet/core/shape.hpp"
#include "stunet/core/storage.hpp"

namespace stunet {

namespace autograd {
class Node;
}  // namespace autograd

struct TensorImpl;
struct AutogradMeta;

class Tensor {
 public:
  /// An undefined tensor (no storage); defined() is false.
  Tensor() = default;

  // ---- creation --------------------------------------------------------
  /// Uninitialised tensor of the given shape. x: any shape up to rank 5.
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  /// Tensor filled with zeros.
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  /// Tensor filled with ones.
  static Tensor ones(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  /// Tensor filled with `value` (converted to dtype).
  static Tensor full(const Shape& shape, double value, DType dtype = DType::f32, Device device = Device::cpu());
  /// Host tensor holding a copy of `values` (values.size() must equal shape.numel()).
  template <class T> static Tensor from_vector(std::span<const T> values, const Shape& shape);
  template <class T> static Tensor from_vector(const std::vector<T>& values, const Shape& shape) {
    return from_vector<T>(std::span<const T>(values), shape);
  }

  // ---- properties ------------------------------------------------------
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const;
  const Shape& strides() const;
  int rank() const { return shape().rank(); }
  /// Extent of dimension i; negative i counts from the end as in PyTorch.
  std::int64_t size(int i) const;
  std::int64_t numel() const { return shape().numel(); }
  DType dtype() const;
  Device device() const;
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype()); }
  /// True when the elements are dense in row-major order (views may not be).
  bool is_contiguous() const;
  /// The shared storage (for version checks and identity tests).
  const std::shared_ptr<Storage>& storage() const;
  /// Offset of element [0,...,0] in elements of dtype from the storage start.
  std::int64_t storage_offset() const;

  /// Typed pointer to element [0,...,0]; throws if T does not match dtype().
  /// The pointer is valid on device(), which may not be the host.
  template <class T> T* data() const;
  /// Untyped pointer to element [0,...,0].
  void* raw_data() const;

  // ---- element access (host, for tests and small reads) ---------------
  /// The value of a one-element tensor, converted to double.
  double item() const;
  /// The element at `index` (one entry per dimension), converted to double.
  double at(std::initializer_list<std::int64_t> index) const;
  /// All elements in row-major order, converted to T.
  template <class T> std::vector<T> to_vector() const;

  // ---- views and copies -----------------------------------------------
  /// View of the sub-box [start, start + sizes) (patch extraction, tile
  /// write-back target). Shares storage; not differentiable.
  Tensor box(std::span<const std::int64_t> start, const Shape& sizes) const;
  Tensor box(std::initializer_list<std::int64_t> start, const Shape& sizes) const {
    return box(std::span<const std::int64_t>(start.begin(), start.size()), sizes);
  }
  /// Same elements under another shape (numel must match; a view when
  /// contiguous, a copy otherwise). Differentiable.
  Tensor reshape(const Shape& shape) const;
  /// This tensor if contiguous, else a dense copy (differentiable).
  Tensor contiguous() const;
  /// A dense copy that shares nothing with this tensor (differentiable).
  Tensor clone() const;
  /// Conversion to another element type (rounding to nearest for floats,
  /// truncation for integers). Not differentiable unless both are float
  /// types, in which case the gradient converts back.
  Tensor to(DType dtype) const;
  /// Copy to another device (contiguous result).
  Tensor to(Device device) const;
  /// Writes src into this tensor (or view) element by element, converting
  /// dtype. Shapes must be equal. Not differentiable.
  Tensor& copy_(const Tensor& src);
  /// Sets every element to `value`.
  Tensor& fill_(double value);
  Tensor& zero_() { return fill_(0.0); }

  // ---- autograd ---------------------------------------------------------
  /// Whether gradients flow to (or through) this tensor.
  bool requires_grad() const;
  /// Marks a leaf tensor (a parameter or an input) as needing its gradient.
  Tensor& set_requires_grad(bool value = true);
  /// True for tensors not produced by a recorded op.
  bool is_leaf() const;
  /// Accumulated gradient of a leaf after backward(); undefined before.
  const Tensor& grad() const;
  /// Replaces the accumulated gradient (an undefined tensor clears it).
  void set_grad(const Tensor& g);
  /// Clears the accumulated gradient, as optimizer.zero_grad(set_to_none=True).
  void zero_grad() { set_grad(Tensor()); }
  /// The node that produced this tensor, null for leaves.
  const std::shared_ptr<autograd::Node>& grad_fn() const;
  /// Same data, no history, requires_grad false.
  Tensor detach() const;
  /// Reverse-mode pass from this tensor. Without `gradient` this must hold
  /// one element (a loss). Defined in <stunet/autograd/engine.hpp>.
  void backward(const Tensor& gradient = Tensor()) const;

  /// Two handles to the same tensor object.
  bool is_same(const Tensor& other) const { return impl_ == other.impl_; }

  /// Makes this tensor object refer to `src`'s storage, shape, strides and
  /// dtype, keeping its identity and autograd state (torch's `param.data =
  /// src`): every handle to it, an optimiser's included, sees the new data.
  /// Used to move a module's parameters to another device. Any gradient is
  /// dropped (it would live on the old device).
  void set_data(const Tensor& src);

  // For autograd internals.
  AutogradMeta& autograd_meta() const;
  bool has_autograd_meta() const;

 private:
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}
  TensorImpl& impl() const {
    STUNET_CHECK(impl_ != nullptr, "use of an undefined tensor");
    return *impl_;
  }
  std::shared_ptr<TensorImpl> impl_;
  friend struct TensorImpl;
  friend Tensor make_view(const Tensor&, const Shape&, const Shape&, std::int64_t);
};

/// Autograd state of a tensor: leaf flag, accumulated grad, producing node.
struct AutogradMeta {
  bool requires_grad = false;
  Tensor grad;
  std::shared_ptr<autograd::Node> grad_fn;
  /// The AccumulateGrad node of a leaf, shared by all its uses in one graph.
  std::weak_ptr<autograd::Node> accumulator;
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  std::int64_t offset = 0;
  Shape shape;
  Shape strides;
  DType dtype = DType::f32;
  std::shared_ptr<AutogradMeta> meta;
};

/// A view of `base`'s storage with another shape/strides/offset; no autograd.
inline Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, std::int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = base.impl().storage;
  impl->dtype = base.impl().dtype;
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  return Tensor(std::move(impl));
}

// ======================================================================
// Implementation
// ======================================================================

namespace detail {

/// Shape and strides padded to rank 5 (leading extents 1) for loop nests.
struct Loop5 {
  std::int64_t n[5];
  std::int64_t s[5];
};
inline Loop5 pad_to_5(const Shape& shape, const Shape& strides) {
  Loop5 l{{1, 1, 1, 1, 1}, {0, 0, 0, 0, 0}};
  int off = 5 - shape.rank();
  for (int i = 0; i < shape.rank(); ++i) {
    l.n[off + i] = shape[i];
    l.s[off + i] = strides[i];
  }
  return l;
}

/// dst[i] = convert(src[i]) over two strided host views of equal shape.
template <class TD, class TS>
void strided_convert(TD* dst, const Loop5& ld, const TS* src, const Loop5& ls) {
  for (std::int64_t a = 0; a < ld.n[0]; ++a)
    for (std::int64_t b = 0; b < ld.n[1]; ++b)
      for (std::int64_t c = 0; c < ld.n[2]; ++c)
        for (std::int64_t d = 0; d < ld.n[3]; ++d) {
          TD* drow = dst + a * ld.s[0] + b * ld.s[1] + c * ld.s[2] + d * ld.s[3];
          const TS* srow = src + a * ls.s[0] + b * ls.s[1] + c * ls.s[2] + d * ls.s[3];
          for (std::int64_t e = 0; e < ld.n[4]; ++e) {
            if constexpr (std::is_same_v<TD, TS>) drow[e * ld.s[4]] = srow[e * ls.s[4]];
            else drow[e * ld.s[4]] = from_double<TD>(to_double(srow[e * ls.s[4]]));
          }
        }
}

inline void check_host(const Tensor& t, const char* what) {
  STUNET_CHECK(t.device().is_cpu(), "{}: tensor of shape {} is on {}, this needs a host tensor (use .to(Device::cpu()))",
               what, t.shape(), t.device());
}

/// Copies src into dst (both host, equal shapes), converting dtype.
inline void host_copy(const Tensor& dst, const Tensor& src) {
  Loop5 ld = pad_to_5(dst.shape(), dst.strides());
  Loop5 ls = pad_to_5(src.shape(), src.strides());
  dispatch_all(dst.dtype(), [&]<class TD>() {
    dispatch_all(src.dtype(), [&]<class TS>() { strided_convert(dst.data<TD>(), ld, src.data<TS>(), ls); });
  });
}

}  // namespace detail

inline const Shape& Tensor::shape() const { return impl().shape; }
inline const Shape& Tensor::strides() const { return impl().strides; }
inline DType Tensor::dtype() const { return impl().dtype; }
inline Device Tensor::device() const { return impl().storage->device(); }
inline const std::shared_ptr<Storage>& Tensor::storage() const { return impl().storage; }
inline std::int64_t Tensor::storage_offset() const { return impl().offset; }

inline std::int64_t Tensor::size(int i) const {
  int r = rank();
  int j = i < 0 ? i + r : i;
  STUNET_CHECK(j >= 0 && j < r, "size({}): dimension out of range for a tensor of shape {}", i, shape());
  return shape()[j];
}

inline bool Tensor::is_contiguous() const {
  std::int64_t expected = 1;
  const Shape& sh = shape();
  const Shape& st = strides();
  for (int i = sh.rank() - 1; i >= 0; --i) {
    if (sh[i] != 1 && st[i] != expected) return false;
    expected *= sh[i];
  }
  return true;
}

inline Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int i = 0; i < shape.rank(); ++i)
    STUNET_CHECK(shape[i] >= 0, "Tensor::empty: negative extent in shape {}", shape);
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<Storage>(static_cast<std::size_t>(shape.numel()) * dtype_size(dtype), device);
  impl->shape = shape;
  impl->strides = shape.contiguous_strides();
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

inline Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  if (device.is_cpu()) {
    if (t.nbytes()) std::memset(t.raw_data(), 0, t.nbytes());
  } else {
    require_cuda_backend("Tensor::zeros").memset_zero(t.raw_data(), t.nbytes(), device.index);
  }
  return t;
}

inline Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }

inline Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.fill_(value);
  return t;
}

template <class T> Tensor Tensor::from_vector(std::span<const T> values, const Shape& shape) {
  STUNET_CHECK(static_cast<std::int64_t>(values.size()) == shape.numel(),
               "Tensor::from_vector: {} values do not fill shape {} ({} elements)", values.size(), shape, shape.numel());
  Tensor t = empty(shape, dtype_of<T>, Device::cpu());
  if (!values.empty()) std::memcpy(t.raw_data(), values.data(), values.size() * sizeof(T));
  return t;
}

template <class T> T* Tensor::data() const {
  STUNET_CHECK(dtype_of<T> == dtype(), "data<{}>() on a tensor of dtype {} (shape {})", dtype_name(dtype_of<T>),
               dtype(), shape());
  return reinterpret_cast<T*>(raw_data());
}

inline void* Tensor::raw_data() const {
  auto& im = impl();
  return static_cast<char*>(im.storage->data()) + im.offset * static_cast<std::int64_t>(dtype_size(im.dtype));
}

inline double Tensor::item() const {
  STUNET_CHECK(numel() == 1, "item() needs a one-element tensor, got shape {}", shape());
  // On a GPU: one element copied to the host, which waits for the kernels
  // that produce it (as torch's item()).
  if (!device().is_cpu()) return to(Device::cpu()).item();
  return dispatch_all(dtype(), [&]<class T>() { return to_double(*data<T>()); });
}

inline double Tensor::at(std::initializer_list<std::int64_t> index) const {
  STUNET_CHECK(static_cast<int>(index.size()) == rank(), "at(): {} indices for a tensor of shape {}", index.size(),
               shape());
  detail::check_host(*this, "at()");
  std::int64_t off = 0;
  int i = 0;
  for (std::int64_t v : index) {
    STUNET_CHECK(v >= 0 && v < shape()[i], "at(): index {} out of range for dimension {} of shape {}", v, i, shape());
    off += v * strides()[i];
    ++i;
  }
  return dispatch_all(dtype(), [&]<class T>() { return to_double(data<T>()[off]); });
}

template <class T> std::vector<T> Tensor::to_vector() const {
  Tensor host = device().is_cpu() ? *this : to(Device::cpu());
  std::vector<T> out(static_cast<std::size_t>(numel()));
  Tensor dst = Tensor::from_vector<T>(std::span<const T>(out), shape());
  detail::host_copy(dst, host);
  std::memcpy(out.data(), dst.raw_data(), out.size() * sizeof(T));
  return out;
}

inline Tensor Tensor::box(std::span<const std::int64_t> start, const Shape& sizes) const {
  STUNET_CHECK(static_cast<int>(start.size()) == rank() && sizes.rank() == rank(),
               "box(): start has {} entries and sizes {} for a tensor of shape {}", start.size(), sizes, shape());
  STUNET_CHECK(!(requires_grad()), "box(): views are not differentiable; call detach() first (tensor of shape {})",
               shape());
  std::int64_t off = storage_offset();
  for (int i = 0; i < rank(); ++i) {
    STUNET_CHECK(start[i] >= 0 && sizes[i] >= 0 && start[i] + sizes[i] <= shape()[i],
                 "box(): dimension {} range [{}, {}) outside shape {}", i, start[i], start[i] + sizes[i], shape());
    off += start[i] * strides()[i];
  }
  return make_view(*this, sizes, strides(), off);
}

inline Tensor& Tensor::copy_(const Tensor& src) {
  STUNET_CHECK(src.shape() == shape(), "copy_(): source shape {} differs from destination shape {}", src.shape(),
               shape());
  STUNET_CHECK(!(is_leaf() && requires_grad()),
               "copy_(): in-place write into a leaf tensor that requires grad (shape {}); detach it first", shape());
  if (device().is_cpu() && src.device().is_cpu()) {
    detail::host_copy(*this, src);
  } else if (device() != src.device() && (!is_contiguous() || !src.is_contiguous() || dtype() != src.dtype())) {
    // Across devices with a layout or dtype change: move src as it is, then
    // convert on the destination's device.
    Tensor moved = src.contiguous().detach().to(device());
    copy_(moved);
    return *this;
  } else if (device() == src.device() && (!is_contiguous() || !src.is_contiguous() || dtype() != src.dtype())) {
    // Strided or converting copy within one GPU: one kernel.
    const detail::Loop5 ld = detail::pad_to_5(shape(), strides()), ls = detail::pad_to_5(src.shape(), src.strides());
    require_cuda_kernel(cuda_kernels().strided_copy, "copy_()")(raw_data(), dtype(), ld, src.raw_data(), src.dtype(),
                                                                ls, device().index);
  } else {
    STUNET_CHECK(is_contiguous() && src.is_contiguous() && dtype() == src.dtype(),
                 "copy_() between {} and {}: needs contiguous tensors of one dtype (got {} and {})", src.device(),
                 device(), src.dtype(), dtype());
    require_cuda_backend("copy_()").copy(raw_data(), device(), src.raw_data(), src.device(), nbytes());
  }
  storage()->bump_version();
  return *this;
}

inline void Tensor::set_data(const Tensor& src) {
  STUNET_CHECK(src.defined(), "set_data(): undefined source for a tensor of shape {}", shape());
  TensorImpl& me = impl();
  const TensorImpl& other = src.impl();
  me.storage = other.storage;
  me.offset = other.offset;
  me.shape = other.shape;
  me.strides = other.strides;
  me.dtype = other.dtype;
  if (me.meta) me.meta->grad = Tensor();
}

inline Tensor& Tensor::fill_(double value) {
  STUNET_CHECK(!(is_leaf() && requires_grad()),
               "fill_(): in-place write into a leaf tensor that requires grad (shape {})", shape());
  detail::Loop5 l = detail::pad_to_5(shape(), strides());
  if (!device().is_cpu()) {
    if (numel() > 0) require_cuda_kernel(cuda_kernels().fill, "fill_()")(raw_data(), dtype(), l, value, device().index);
    storage()->bump_version();
    return *this;
  }
  dispatch_all(dtype(), [&]<class T>() {
    T v = from_double<T>(value);
    T* p = data<T>();
    for (std::int64_t a = 0; a < l.n[0]; ++a)
      for (std::int64_t b = 0; b < l.n[1]; ++b)
        for (std::int64_t c = 0; c < l.n[2]; ++c)
          for (std::int64_t d = 0; d < l.n[3]; ++d) {
            T* row = p + a * l.s[0] + b * l.s[1] + c * l.s[2] + d * l.s[3];
            for (std::int64_t e = 0; e < l.n[4]; ++e) row[e * l.s[4]] = v;
          }
  });
  storage()->bump_version();
  return *this;
}

inline Tensor Tensor::to(Device target) const {
  if (target == device()) return *this;
  Tensor src = contiguous();
  Tensor out = Tensor::empty(shape(), dtype(), target);
  if (out.nbytes())
    require_cuda_backend("Tensor::to(device)").copy(out.raw_data(), target, src.raw_data(), src.device(), nbytes());
  return out;
}

inline bool Tensor::has_autograd_meta() const { return impl().meta != nullptr; }

inline AutogradMeta& Tensor::autograd_meta() const {
  auto& im = impl();
  if (!im.meta) im.meta = std::make_shared<AutogradMeta>();
  return *im.meta;
}

inline bool Tensor::requires_grad() const {
  auto& im = impl();
  return im.meta && (im.meta->requires_grad || im.meta->grad_fn);
}

inline bool Tensor::is_leaf() const {
  auto& im = impl();
  return !im.meta || !im.meta->grad_fn;
}

inline Tensor& Tensor::set_requires_grad(bool value) {
  STUNET_CHECK(is_leaf(), "set_requires_grad(): only leaf tensors can be marked (this one has a grad_fn), shape {}",
               shape());
  STUNET_CHECK(!value || is_floating(dtype()), "set_requires_grad(): a {} tensor cannot require grad (shape {})",
               dtype(), shape());
  autograd_meta().requires_grad = value;
  return *this;
}

inline const Tensor& Tensor::grad() const {
  static const Tensor undefined;
  auto& im = impl();
  return im.meta ? im.meta->grad : undefined;
}

inline void Tensor::set_grad(const Tensor& g) {
  if (g.defined())
    STUNET_CHECK(g.shape() == shape(), "set_grad(): gradient shape {} differs from tensor shape {}", g.shape(),
                 shape());
  if (!g.defined() && !has_autograd_meta()) return;
  autograd_meta().grad = g;
}

inline const std::shared_ptr<autograd::Node>& Tensor::grad_fn() const {
  static const std::shared_ptr<autograd::Node> none;
  auto& im = impl();
  return im.meta ? im.meta->grad_fn : none;
}

inline Tensor Tensor::detach() const { return make_view(*this, shape(), strides(), storage_offset()); }

}  // namespace stunet

// The graph structures need a complete Tensor; they in turn define the
// differentiable members declared above (reshape, contiguous, clone, to,
// backward). Included here so that <stunet/core/tensor.hpp> is complete alone.
#include "stunet/autograd/node.hpp"
