#pragma once
/// \file
/// A deliberately small unpickler for the data.pkl of PyTorch checkpoints.
///
/// Python's pickle is a program: GLOBAL names any callable and REDUCE calls
/// it, which is how a checkpoint can run `os.system`. This reader never calls
/// anything. It knows the opcodes that torch.save (protocol 2, and the
/// siblings of later protocols) emits for tensors and plain containers, and an
/// allowlist of globals that it models as data:
///
///   collections OrderedDict                      -> dict (ordered)
///   torch._utils _rebuild_tensor_v2              -> TensorRef
///   torch._utils _rebuild_parameter              -> TensorRef
///   torch {Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage
///                                                -> storage type tags
///   torch device                                 -> str ("cuda:0")
///   _codecs encode                               -> bytes (protocol 2 bytes)
///   numpy dtype, numpy.core.multiarray scalar,
///   numpy._core.multiarray scalar                -> int / float / bool
///
/// The numpy and _codecs entries exist because nnU-Net checkpoints keep
/// numpy float64 losses and Dice scores in 'plot_stuff' (v1) and 'logging'
/// (v2); without them no official checkpoint would load. torch.device is in
/// nnU-Net v2's 'init_args'. Any other global is refused at the GLOBAL
/// opcode, before anything could use it, as is any other opcode.
///
/// Tensors are not materialised here: BINPERSID yields a StorageRef (the
/// name of the zip entry that holds the bytes) and _rebuild_tensor_v2 a
/// TensorRef (storage, offset, sizes, strides). torch_checkpoint.hpp reads
/// the bytes of the tensors it needs, so optimizer state is never loaded.
///
/// Malformed input raises stunet::Error naming the source, the byte offset
/// and the opcode: truncated arguments, stack underflow, missing marks,
/// undefined memo entries, lengths beyond the data, unsupported dict keys,
/// recursive structures. The reader is iterative, so nesting depth cannot
/// overflow the C++ stack, and work and memory are linear in the input size.

#include <algorithm>
#include <bit>
#include <climits>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "stunet/core/error.hpp"
#include "stunet/core/half.hpp"

namespace stunet::io::pickle {

class Value;
namespace detail {
class Unpickler;
}  // namespace detail
/// Values are shared: the pickle memo and containers refer to one object
/// from several places, and lists and dicts are filled after memoisation.
using ValuePtr = std::shared_ptr<Value>;

/// A persistent id of torch.save: ('storage', <type>, key, location, numel).
struct StorageRef {
  std::string type;      ///< storage class name: "FloatStorage", "HalfStorage", ...
  std::string key;       ///< the bytes are in the zip entry <archive>/data/<key>
  std::string location;  ///< device it was saved from: "cpu", "cuda:0" (ignored on load)
  std::int64_t numel = 0;  ///< elements of `type` in the storage
};

/// A tensor as _rebuild_tensor_v2 describes it: a strided view of a storage.
/// Sizes, strides and offset are checked non-negative; their bounds against
/// the storage are checked when the bytes are read.
struct TensorRef {
  StorageRef storage;                  ///< where the elements live
  std::int64_t offset = 0;             ///< of element [0, ..., 0], in elements
  std::vector<std::int64_t> sizes;     ///< extents, any rank
  std::vector<std::int64_t> strides;   ///< in elements, one per size
  bool requires_grad = false;          ///< as saved (state dicts save false)
};

/// A dict key: Python dicts in checkpoints use str keys (state dicts, plans)
/// and int keys (optimizer state). bool keys are stored as 0/1, as Python
/// treats them as equal to those ints.
using DictKey = std::variant<std::int64_t, std::string>;

/// A Python dict or OrderedDict: insertion order kept, a repeated key
/// replaces the value in place (Python semantics).
class Dict {
 public:
  /// Entries in insertion order.
  const std::vector<std::pair<DictKey, ValuePtr>>& items() const { return items_; }
  /// Number of entries.
  std::size_t size() const { return items_.size(); }
  /// The value under `key`, or nullptr.
  const ValuePtr& lookup(const DictKey& key) const {
    static const ValuePtr none;
    auto it = index_.find(key);
    return it == index_.end() ? none : items_[it->second].second;
  }
  /// The value under a str key, or nullptr.
  const ValuePtr& get(std::string_view key) const { return lookup(DictKey(std::string(key))); }
  /// The value under an int key, or nullptr.
  const ValuePtr& get(std::int64_t key) const { return lookup(DictKey(key)); }
  /// Inserts or replaces.
  void set(DictKey key, ValuePtr value) {
    auto [it, fresh] = index_.emplace(key, items_.size());
    if (fresh) items_.emplace_back(std::move(key), std::move(value));
    else items_[it->second].second = std::move(value);
  }
  /// True for collections.OrderedDict (what state_dict() returns).
  bool ordered = false;
  /// Attributes set by BUILD on an OrderedDict (a state dict's `_metadata`),
  /// null when none.
  ValuePtr state;

 private:
  friend class Value;
  std::vector<std::pair<DictKey, ValuePtr>> items_;
  std::map<DictKey, std::size_t> index_;
};

/// An allowed global (a callable or a storage type tag) as a value.
struct Global {
  std::string module;  ///< "torch._utils"
  std::string name;    ///< "_rebuild_tensor_v2"
};

/// A numpy dtype as `numpy dtype` + BUILD describe it (only what scalar
/// reconstruction needs).
struct NumpyDtype {
  std::string code;      ///< "f8", "i8", "b1", ...
  char byteorder = '=';  ///< '<', '>', '|' or '='
};

/// One unpickled Python value.
class Value {
 public:
  /// Python str (UTF-8, as stored).
  struct String {
    std::string s;
  };
  /// Python bytes.
  struct Bytes {
    std::string s;
  };
  /// Python list.
  struct List {
    std::vector<ValuePtr> items;
  };
  /// Python tuple.
  struct Tuple {
    std::vector<ValuePtr> items;
  };
  /// The alternatives, in the order of Kind.
  using Data = std::variant<std::monostate, bool, std::int64_t, double, String, Bytes, List, Tuple, Dict, TensorRef,
                            StorageRef, Global, NumpyDtype>;
  /// What a Value holds; the order matches Data.
  enum class Kind : std::uint8_t {
    none, boolean, integer, floating, string, bytes, list, tuple, dict, tensor, storage, global, numpy_dtype
  };

  /// None.
  Value() = default;
  /// A value holding `d`.
  explicit Value(Data d) : data_(std::move(d)) {}
  /// Values are shared through ValuePtr, never copied.
  Value(const Value&) = delete;
  Value& operator=(const Value&) = delete;
  /// Destroys children iteratively: a deeply nested pickle (a million TUPLE1
  /// in a row) must not overflow the C++ stack on the way out.
  ~Value() {
    std::vector<ValuePtr> pending;
    take_children(pending);
    while (!pending.empty()) {
      ValuePtr p = std::move(pending.back());
      pending.pop_back();
      if (p && p.use_count() == 1) p->take_children(pending);
    }
  }

  /// What this value holds.
  Kind kind() const { return static_cast<Kind>(data_.index()); }
  /// Python-style name of the kind, for messages.
  static const char* kind_name(Kind k) {
    static const char* names[] = {"None", "bool",   "int",   "float",   "str",    "bytes",      "list",
                                  "tuple", "dict", "tensor", "storage", "global", "numpy.dtype"};
    return names[static_cast<int>(k)];
  }
  /// Python-style name of this value's kind.
  const char* kind_name() const { return kind_name(kind()); }

  /// Kind tests for the common cases.
  bool is_none() const { return kind() == Kind::none; }
  bool is_tensor() const { return kind() == Kind::tensor; }
  bool is_dict() const { return kind() == Kind::dict; }

  /// Typed accessors: throw naming the expected and the actual kind.
  bool as_bool() const { return get<bool>(Kind::boolean); }
  std::int64_t as_int() const { return get<std::int64_t>(Kind::integer); }
  double as_float() const { return get<double>(Kind::floating); }
  /// A float, or an int converted to double.
  double as_number() const { return kind() == Kind::integer ? static_cast<double>(as_int()) : as_float(); }
  const std::string& as_string() const { return get<String>(Kind::string).s; }
  const std::string& as_bytes() const { return get<Bytes>(Kind::bytes).s; }
  const std::vector<ValuePtr>& as_list() const { return get<List>(Kind::list).items; }
  const std::vector<ValuePtr>& as_tuple() const { return get<Tuple>(Kind::tuple).items; }
  const Dict& as_dict() const { return get<Dict>(Kind::dict); }
  const TensorRef& as_tensor() const { return get<TensorRef>(Kind::tensor); }
  const StorageRef& as_storage() const { return get<StorageRef>(Kind::storage); }
  const Global& as_global() const { return get<Global>(Kind::global); }
  const NumpyDtype& as_numpy_dtype() const { return get<NumpyDtype>(Kind::numpy_dtype); }

  /// The variant itself (the unpickler fills containers through it).
  Data& data() { return data_; }
  const Data& data() const { return data_; }

  /// Number of direct children: list and tuple items; dict values, then
  /// the dict's BUILD state (which may be null). For iterative graph walks.
  std::size_t child_count() const {
    if (auto* l = std::get_if<List>(&data_)) return l->items.size();
    if (auto* t = std::get_if<Tuple>(&data_)) return t->items.size();
    if (auto* d = std::get_if<Dict>(&data_)) return d->items_.size() + 1;
    return 0;
  }
  /// Direct child i < child_count() (may be null: an absent dict state).
  const ValuePtr& child(std::size_t i) const {
    if (auto* l = std::get_if<List>(&data_)) return l->items.at(i);
    if (auto* t = std::get_if<Tuple>(&data_)) return t->items.at(i);
    const Dict& d = std::get<Dict>(data_);
    return i < d.items_.size() ? d.items_[i].second : d.state;
  }
  /// Drops every child reference (breaks reference cycles).
  void clear_children() {
    std::vector<ValuePtr> pending;
    take_children(pending);
  }

 private:
  template <class T> const T& get(Kind k) const {
    const T* p = std::get_if<T>(&data_);
    STUNET_CHECK(p != nullptr, "pickle: expected a {} value, found a {}", kind_name(k), kind_name());
    return *p;
  }
  void take_children(std::vector<ValuePtr>& out) {
    if (auto* l = std::get_if<List>(&data_)) {
      for (auto& c : l->items) out.push_back(std::move(c));
      l->items.clear();
    } else if (auto* t = std::get_if<Tuple>(&data_)) {
      for (auto& c : t->items) out.push_back(std::move(c));
      t->items.clear();
    } else if (auto* d = std::get_if<Dict>(&data_)) {
      for (auto& kv : d->items_) out.push_back(std::move(kv.second));
      d->items_.clear();
      d->index_.clear();
      out.push_back(std::move(d->state));
    }
  }
  friend class detail::Unpickler;
  Data data_;
  std::uint8_t visit_ = 0;  // depth-first search colour, used by the unpickler only
};

namespace detail {

/// A pickle string quoted for an error message: control and non-ASCII bytes
/// as \xNN, long strings cut, so hostile input cannot garble the message.
inline std::string printable(std::string_view s, std::size_t max = 80) {
  std::string out;
  for (std::size_t i = 0; i < s.size() && i < max; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') out += static_cast<char>(c);
    else out += fmt::format("\\x{:02x}", c);
  }
  if (s.size() > max) out += "...";
  return out;
}

/// Opcode names for messages (the pickletools names).
inline const char* opcode_name(std::uint8_t op) {
  switch (op) {
    case 0x80: return "PROTO";
    case 0x95: return "FRAME";
    case '.': return "STOP";
    case '(': return "MARK";
    case '0': return "POP";
    case '1': return "POP_MARK";
    case 'N': return "NONE";
    case 0x88: return "NEWTRUE";
    case 0x89: return "NEWFALSE";
    case 'J': return "BININT";
    case 'K': return "BININT1";
    case 'M': return "BININT2";
    case 0x8a: return "LONG1";
    case 0x8b: return "LONG4";
    case 'G': return "BINFLOAT";
    case 'X': return "BINUNICODE";
    case 0x8c: return "SHORT_BINUNICODE";
    case 0x8d: return "BINUNICODE8";
    case 'T': return "BINSTRING";
    case 'U': return "SHORT_BINSTRING";
    case 'B': return "BINBYTES";
    case 'C': return "SHORT_BINBYTES";
    case ')': return "EMPTY_TUPLE";
    case 't': return "TUPLE";
    case 0x85: return "TUPLE1";
    case 0x86: return "TUPLE2";
    case 0x87: return "TUPLE3";
    case ']': return "EMPTY_LIST";
    case 'l': return "LIST";
    case 'a': return "APPEND";
    case 'e': return "APPENDS";
    case '}': return "EMPTY_DICT";
    case 'd': return "DICT";
    case 's': return "SETITEM";
    case 'u': return "SETITEMS";
    case 'h': return "BINGET";
    case 'j': return "LONG_BINGET";
    case 'q': return "BINPUT";
    case 'r': return "LONG_BINPUT";
    case 0x94: return "MEMOIZE";
    case 'c': return "GLOBAL";
    case 0x93: return "STACK_GLOBAL";
    case 'R': return "REDUCE";
    case 0x81: return "NEWOBJ";
    case 'b': return "BUILD";
    case 'Q': return "BINPERSID";
    // Refused, named so that the message says what was found.
    case 'P': return "PERSID";
    case 'I': return "INT";
    case 'L': return "LONG";
    case 'F': return "FLOAT";
    case 'S': return "STRING";
    case 'V': return "UNICODE";
    case 'g': return "GET";
    case 'p': return "PUT";
    case 'i': return "INST";
    case 'o': return "OBJ";
    case '2': return "DUP";
    case 0x82: return "EXT1";
    case 0x83: return "EXT2";
    case 0x84: return "EXT4";
    case 0x8e: return "BINBYTES8";
    case 0x8f: return "EMPTY_SET";
    case 0x90: return "ADDITEMS";
    case 0x91: return "FROZENSET";
    case 0x92: return "NEWOBJ_EX";
    case 0x96: return "BYTEARRAY8";
    case 0x97: return "NEXT_BUFFER";
    case 0x98: return "READONLY_BUFFER";
    default: return "unknown";
  }
}

/// The allowed globals and what they become.
enum class GlobalId { ordered_dict, rebuild_tensor_v2, rebuild_parameter, storage_type, torch_device, codecs_encode,
                      numpy_scalar, numpy_dtype };

inline bool lookup_global(std::string_view module, std::string_view name, GlobalId& id) {
  static constexpr std::string_view storages[] = {"FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage",
                                                  "LongStorage",  "IntStorage",    "ShortStorage", "CharStorage",
                                                  "ByteStorage",  "BoolStorage"};
  if (module == "collections" && name == "OrderedDict") id = GlobalId::ordered_dict;
  else if (module == "torch._utils" && name == "_rebuild_tensor_v2") id = GlobalId::rebuild_tensor_v2;
  else if (module == "torch._utils" && name == "_rebuild_parameter") id = GlobalId::rebuild_parameter;
  else if (module == "torch" && name == "device") id = GlobalId::torch_device;
  else if (module == "_codecs" && name == "encode") id = GlobalId::codecs_encode;
  else if ((module == "numpy.core.multiarray" || module == "numpy._core.multiarray") && name == "scalar")
    id = GlobalId::numpy_scalar;
  else if (module == "numpy" && name == "dtype") id = GlobalId::numpy_dtype;
  else if (module == "torch" && std::find(std::begin(storages), std::end(storages), name) != std::end(storages))
    id = GlobalId::storage_type;
  else return false;
  return true;
}

/// The interpreter. One instance per pickle; see unpickle().
class Unpickler {
 public:
  Unpickler(std::span<const std::uint8_t> data, std::string what)
      : p_(data.data()), n_(data.size()), what_(std::move(what)) {}
  Unpickler(const Unpickler&) = delete;
  Unpickler& operator=(const Unpickler&) = delete;

  /// Cycles among the objects built are broken here: everything not
  /// reachable from the result (all of it after an error) loses its children,
  /// so reference counting frees it.
  ~Unpickler() {
    stack_.clear();
    memo_.clear();
    for (auto& c : containers_)
      if (!success_ || c->visit_ != kBlack) c->clear_children();
  }

  ValuePtr run() {
    while (true) {
      STUNET_CHECK(pos_ < n_, "{}: truncated pickle: no STOP opcode in its {} bytes", what_, n_);
      op_pos_ = pos_;
      op_ = p_[pos_++];
      if (op_ == '.') break;
      step();
    }
    ValuePtr result = pop();
    STUNET_CHECK(pos_ == n_, "{}: {} bytes of trailing data after STOP at byte {}", what_, n_ - pos_, op_pos_);
    check_acyclic(result);
    success_ = true;
    return result;
  }

 private:
  // ---- errors and input ----------------------------------------------------
  std::string where() const {
    return fmt::format("{}: byte {}, opcode {} (0x{:02x})", what_, op_pos_, opcode_name(op_), op_);
  }
  const std::uint8_t* take(std::uint64_t k) {
    STUNET_CHECK(k <= n_ - pos_, "{}: truncated pickle: needs {} more bytes, {} remain", where(), k, n_ - pos_);
    const std::uint8_t* q = p_ + pos_;
    pos_ += static_cast<std::size_t>(k);
    return q;
  }
  std::uint64_t read_le(int bytes) {
    const std::uint8_t* q = take(static_cast<std::uint64_t>(bytes));
    std::uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | q[i];
    return v;
  }
  std::string read_bytes(std::uint64_t len) {
    const std::uint8_t* q = take(len);
    return std::string(reinterpret_cast<const char*>(q), static_cast<std::size_t>(len));
  }
  std::string read_line() {
    const void* nl = std::memchr(p_ + pos_, '\n', n_ - pos_);
    STUNET_CHECK(nl != nullptr, "{}: truncated pickle: unterminated GLOBAL name", where());
    const std::size_t len = static_cast<std::size_t>(static_cast<const std::uint8_t*>(nl) - (p_ + pos_));
    std::string s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len + 1;
    return s;
  }

  // ---- stack -----------------------------------------------------------------
  std::size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(ValuePtr v) { stack_.push_back(std::move(v)); }
  ValuePtr pop() {
    STUNET_CHECK(stack_.size() > floor(), "{}: pickle stack underflow", where());
    ValuePtr v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  const ValuePtr& top() const {
    STUNET_CHECK(stack_.size() > floor(), "{}: pickle stack underflow (no object to act on)", where());
    return stack_.back();
  }
  std::vector<ValuePtr> pop_mark() {
    STUNET_CHECK(!marks_.empty(), "{}: no MARK on the pickle stack", where());
    const std::size_t m = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> items(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(m)),
                                std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }
  ValuePtr make(Value::Data d) {
    auto v = std::make_shared<Value>(std::move(d));
    const auto k = v->kind();
    if (k == Value::Kind::list || k == Value::Kind::tuple || k == Value::Kind::dict) containers_.push_back(v);
    return v;
  }
  ValuePtr make_tuple(std::vector<ValuePtr> items) { return make(Value::Tuple{std::move(items)}); }
  ValuePtr make_string(std::string s) { return make(Value::String{std::move(s)}); }

  DictKey to_key(const Value& k) const {
    switch (k.kind()) {
      case Value::Kind::string: return k.as_string();
      case Value::Kind::integer: return k.as_int();
      case Value::Kind::boolean: return static_cast<std::int64_t>(k.as_bool());
      default: break;
    }
    STUNET_FAIL("{}: dict key of type {} is not supported (only str and int keys)", where(), k.kind_name());
  }
  Dict& dict_at(const ValuePtr& v) {
    Dict* d = std::get_if<Dict>(&v->data());
    STUNET_CHECK(d != nullptr, "{}: SETITEM target is a {}, not a dict", where(), v->kind_name());
    return *d;
  }
  Value::List& list_at(const ValuePtr& v) {
    Value::List* l = std::get_if<Value::List>(&v->data());
    STUNET_CHECK(l != nullptr, "{}: APPEND target is a {}, not a list", where(), v->kind_name());
    return *l;
  }

  // ---- one opcode ------------------------------------------------------------
  void step() {
    switch (op_) {
      case 0x80: {  // PROTO
        const int v = *take(1);
        STUNET_CHECK(v >= 2 && v <= 5, "{}: pickle protocol {} (expected 2 to 5)", where(), v);
        return;
      }
      case 0x95: {  // FRAME: a size hint only; the frame must lie within the data
        const std::uint64_t len = read_le(8);
        STUNET_CHECK(len <= n_ - pos_, "{}: frame of {} bytes but {} remain", where(), len, n_ - pos_);
        return;
      }
      case '(': marks_.push_back(stack_.size()); return;
      case '0':
        if (stack_.size() == floor() && !marks_.empty()) marks_.pop_back();  // as CPython does
        else pop();
        return;
      case '1': pop_mark(); return;
      case 'N': push(make(std::monostate{})); return;
      case 0x88: push(make(true)); return;
      case 0x89: push(make(false)); return;
      case 'J': push(make(static_cast<std::int64_t>(static_cast<std::int32_t>(read_le(4))))); return;
      case 'K': push(make(static_cast<std::int64_t>(read_le(1)))); return;
      case 'M': push(make(static_cast<std::int64_t>(read_le(2)))); return;
      case 0x8a: push(make(read_long(read_le(1)))); return;
      case 0x8b: push(make(read_long(read_le(4)))); return;
      case 'G': {
        const std::uint8_t* q = take(8);
        std::uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | q[i];  // big-endian
        push(make(std::bit_cast<double>(bits)));
        return;
      }
      case 'X': push(make_string(read_bytes(read_le(4)))); return;
      case 0x8c: push(make_string(read_bytes(read_le(1)))); return;
      case 0x8d: push(make_string(read_bytes(read_le(8)))); return;
      // Python 2 str: Python 3 decodes them as ASCII text by default.
      case 'T': push(make_string(read_bytes(static_cast<std::uint32_t>(read_le(4))))); return;
      case 'U': push(make_string(read_bytes(read_le(1)))); return;
      case 'B': push(make(Value::Bytes{read_bytes(read_le(4))})); return;
      case 'C': push(make(Value::Bytes{read_bytes(read_le(1))})); return;
      case ')': push(make_tuple({})); return;
      case 't': push(make_tuple(pop_mark())); return;
      case 0x85: {
        ValuePtr a = pop();
        push(make_tuple({std::move(a)}));
        return;
      }
      case 0x86: {
        ValuePtr b = pop(), a = pop();
        push(make_tuple({std::move(a), std::move(b)}));
        return;
      }
      case 0x87: {
        ValuePtr c = pop(), b = pop(), a = pop();
        push(make_tuple({std::move(a), std::move(b), std::move(c)}));
        return;
      }
      case ']': push(make(Value::List{})); return;
      case 'l': push(make(Value::List{pop_mark()})); return;
      case 'a': {
        ValuePtr v = pop();
        list_at(top()).items.push_back(std::move(v));
        return;
      }
      case 'e': {
        std::vector<ValuePtr> items = pop_mark();
        auto& l = list_at(top()).items;
        for (auto& v : items) l.push_back(std::move(v));
        return;
      }
      case '}': push(make(Dict{})); return;
      case 'd': {
        std::vector<ValuePtr> items = pop_mark();
        ValuePtr d = make(Dict{});
        set_items(dict_at(d), items);
        push(std::move(d));
        return;
      }
      case 's': {
        ValuePtr v = pop(), k = pop();
        dict_at(top()).set(to_key(*k), std::move(v));
        return;
      }
      case 'u': {
        std::vector<ValuePtr> items = pop_mark();
        set_items(dict_at(top()), items);
        return;
      }
      case 'h': memo_get(read_le(1)); return;
      case 'j': memo_get(read_le(4)); return;
      case 'q': memo_put(read_le(1)); return;
      case 'r': memo_put(read_le(4)); return;
      case 0x94: memo_put(memo_.size()); return;
      case 'c': {
        std::string module = read_line();
        std::string name = read_line();
        push_global(module, name);
        return;
      }
      case 0x93: {
        ValuePtr name = pop(), module = pop();
        STUNET_CHECK(name->kind() == Value::Kind::string && module->kind() == Value::Kind::string,
                     "{}: STACK_GLOBAL needs two str, found {} and {}", where(), module->kind_name(),
                     name->kind_name());
        push_global(module->as_string(), name->as_string());
        return;
      }
      case 'R': {
        ValuePtr args = pop(), callable = pop();
        push(call(*callable, *args));
        return;
      }
      case 0x81: {  // NEWOBJ: cls.__new__(cls, *args); only OrderedDict is a class we build
        ValuePtr args = pop(), cls = pop();
        STUNET_CHECK(cls->kind() == Value::Kind::global && cls->as_global().module == "collections" &&
                         cls->as_global().name == "OrderedDict",
                     "{}: NEWOBJ of a {} (only collections.OrderedDict is supported)", where(), describe(*cls));
        push(call(*cls, *args));
        return;
      }
      case 'b': {
        ValuePtr state = pop();
        build(*top(), std::move(state));
        return;
      }
      case 'Q': {
        ValuePtr pid = pop();
        push(persistent_load(*pid));
        return;
      }
      default: break;
    }
    STUNET_FAIL("{}: unsupported pickle opcode (only those torch.save writes for tensors and containers are read)",
                where());
  }

  std::int64_t read_long(std::uint64_t nbytes) {
    STUNET_CHECK(nbytes <= 8, "{}: integer of {} bytes does not fit in 64 bits", where(), nbytes);
    const std::uint8_t* q = take(nbytes);
    std::uint64_t v = 0;
    for (std::uint64_t i = nbytes; i-- > 0;) v = (v << 8) | q[i];
    if (nbytes > 0 && nbytes < 8 && (q[nbytes - 1] & 0x80)) v |= ~std::uint64_t{0} << (8 * nbytes);  // sign-extend
    return static_cast<std::int64_t>(v);
  }

  void set_items(Dict& d, std::vector<ValuePtr>& items) {
    STUNET_CHECK(items.size() % 2 == 0, "{}: odd number of items ({}) for a dict", where(), items.size());
    for (std::size_t i = 0; i < items.size(); i += 2) d.set(to_key(*items[i]), std::move(items[i + 1]));
  }

  void memo_get(std::uint64_t idx) {
    auto it = memo_.find(idx);
    STUNET_CHECK(it != memo_.end(), "{}: memo entry {} is not defined ({} entries)", where(), idx, memo_.size());
    push(it->second);
  }
  void memo_put(std::uint64_t idx) { memo_[idx] = top(); }

  void push_global(const std::string& module, const std::string& name) {
    GlobalId id;
    STUNET_CHECK(lookup_global(module, name, id),
                 "{}: refusing pickle global '{} {}': a checkpoint may only name PyTorch tensor, storage and container "
                 "globals (anything else could run code)",
                 where(), printable(module), printable(name));
    push(make(Global{module, name}));
  }

  static std::string describe(const Value& v) {
    if (v.kind() == Value::Kind::global) return fmt::format("global '{} {}'", v.as_global().module, v.as_global().name);
    return v.kind_name();
  }

  const std::vector<ValuePtr>& args_of(const Value& args, const Global& g, std::size_t lo, std::size_t hi) const {
    STUNET_CHECK(args.kind() == Value::Kind::tuple, "{}: arguments of '{} {}' are a {}, not a tuple", where(),
                 g.module, g.name, args.kind_name());
    const auto& a = args.as_tuple();
    STUNET_CHECK(a.size() >= lo && a.size() <= hi, "{}: '{} {}' called with {} arguments (expected {} to {})", where(),
                 g.module, g.name, a.size(), lo, hi);
    return a;
  }
  void expect(const ValuePtr& v, Value::Kind k, const Global& g, int arg) const {
    STUNET_CHECK(v->kind() == k, "{}: argument {} of '{} {}' is a {}, expected a {}", where(), arg, g.module, g.name,
                 v->kind_name(), Value::kind_name(k));
  }
  std::vector<std::int64_t> int_tuple(const ValuePtr& v, const Global& g, int arg) const {
    expect(v, Value::Kind::tuple, g, arg);
    std::vector<std::int64_t> out;
    for (const auto& x : v->as_tuple()) {
      STUNET_CHECK(x->kind() == Value::Kind::integer && x->as_int() >= 0,
                   "{}: argument {} of '{} {}' must hold non-negative ints, found a {}", where(), arg, g.module,
                   g.name, describe(*x));
      out.push_back(x->as_int());
    }
    return out;
  }

  ValuePtr call(const Value& callable, const Value& args) {
    STUNET_CHECK(callable.kind() == Value::Kind::global, "{}: REDUCE on a {} (only allowed globals can be called)",
                 where(), callable.kind_name());
    const Global& g = callable.as_global();
    GlobalId id{};
    lookup_global(g.module, g.name, id);
    switch (id) {
      case GlobalId::ordered_dict: {
        args_of(args, g, 0, 0);
        Dict d;
        d.ordered = true;
        return make(std::move(d));
      }
      case GlobalId::rebuild_tensor_v2: {
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        const auto& a = args_of(args, g, 6, 7);
        expect(a[0], Value::Kind::storage, g, 0);
        expect(a[1], Value::Kind::integer, g, 1);
        expect(a[4], Value::Kind::boolean, g, 4);
        TensorRef t;
        t.storage = a[0]->as_storage();
        t.offset = a[1]->as_int();
        STUNET_CHECK(t.offset >= 0, "{}: negative storage offset {}", where(), t.offset);
        t.sizes = int_tuple(a[2], g, 2);
        t.strides = int_tuple(a[3], g, 3);
        STUNET_CHECK(t.sizes.size() == t.strides.size(), "{}: tensor with {} sizes but {} strides", where(),
                     t.sizes.size(), t.strides.size());
        t.requires_grad = a[4]->as_bool();
        return make(std::move(t));
      }
      case GlobalId::rebuild_parameter: {  // (data, requires_grad, backward_hooks)
        const auto& a = args_of(args, g, 3, 3);
        expect(a[0], Value::Kind::tensor, g, 0);
        expect(a[1], Value::Kind::boolean, g, 1);
        TensorRef t = a[0]->as_tensor();
        t.requires_grad = a[1]->as_bool();
        return make(std::move(t));
      }
      case GlobalId::torch_device: {  // ('cuda',) or ('cuda', 0)
        const auto& a = args_of(args, g, 1, 2);
        expect(a[0], Value::Kind::string, g, 0);
        std::string s = a[0]->as_string();
        if (a.size() == 2 && !a[1]->is_none()) {
          expect(a[1], Value::Kind::integer, g, 1);
          s += fmt::format(":{}", a[1]->as_int());
        }
        return make_string(std::move(s));
      }
      case GlobalId::codecs_encode: {  // protocol 2 writes bytes as _codecs.encode(str, 'latin1')
        const auto& a = args_of(args, g, 2, 2);
        expect(a[0], Value::Kind::string, g, 0);
        expect(a[1], Value::Kind::string, g, 1);
        STUNET_CHECK(a[1]->as_string() == "latin1" || a[1]->as_string() == "latin-1",
                     "{}: '_codecs encode' with encoding '{}' (only latin1 is used for bytes)", where(),
                     printable(a[1]->as_string()));
        return make(Value::Bytes{latin1(a[0]->as_string())});
      }
      case GlobalId::numpy_dtype: {  // ('f8', False, True)
        const auto& a = args_of(args, g, 1, 3);
        expect(a[0], Value::Kind::string, g, 0);
        const std::string& code = a[0]->as_string();
        STUNET_CHECK(numpy_itemsize(code) > 0, "{}: numpy dtype '{}' is not supported (plain numbers only)", where(),
                     printable(code));
        return make(NumpyDtype{code, '='});
      }
      case GlobalId::numpy_scalar: return make(numpy_scalar(args, g));
      case GlobalId::storage_type: break;
    }
    STUNET_FAIL("{}: '{} {}' cannot be called", where(), g.module, g.name);
  }

  std::string latin1(const std::string& utf8) const {
    std::string out;
    out.reserve(utf8.size());
    for (std::size_t i = 0; i < utf8.size(); ++i) {
      const auto c = static_cast<unsigned char>(utf8[i]);
      if (c < 0x80) {
        out += static_cast<char>(c);
      } else {
        const bool two = (c == 0xc2 || c == 0xc3) && i + 1 < utf8.size() &&
                         (static_cast<unsigned char>(utf8[i + 1]) & 0xc0) == 0x80;
        STUNET_CHECK(two, "{}: '_codecs encode' argument is not latin-1 text (byte {} of the string)", where(), i);
        out += static_cast<char>(((c & 0x03) << 6) | (static_cast<unsigned char>(utf8[i + 1]) & 0x3f));
        ++i;
      }
    }
    return out;
  }

  static int numpy_itemsize(const std::string& code) {
    if (code.size() != 2) return 0;
    const char k = code[0], s = code[1];
    if (k == 'f' && (s == '2' || s == '4' || s == '8')) return s - '0';
    if ((k == 'i' || k == 'u') && (s == '1' || s == '2' || s == '4' || s == '8')) return s - '0';
    if (k == 'b' && s == '1') return 1;
    return 0;
  }

  Value::Data numpy_scalar(const Value& args, const Global& g) {
    const auto& a = args_of(args, g, 2, 2);
    expect(a[0], Value::Kind::numpy_dtype, g, 0);
    expect(a[1], Value::Kind::bytes, g, 1);
    const NumpyDtype& dt = a[0]->as_numpy_dtype();
    std::string raw = a[1]->as_bytes();
    const int size = numpy_itemsize(dt.code);
    STUNET_CHECK(static_cast<int>(raw.size()) == size, "{}: numpy scalar of dtype '{}' with {} bytes (expected {})",
                 where(), dt.code, raw.size(), size);
    if (dt.byteorder == '>') std::reverse(raw.begin(), raw.end());
    std::uint64_t bits = 0;
    for (std::size_t i = raw.size(); i-- > 0;) bits = (bits << 8) | static_cast<unsigned char>(raw[i]);
    const char k = dt.code[0];
    if (k == 'b') return bits != 0;
    if (k == 'f') {
      if (size == 8) return std::bit_cast<double>(bits);
      if (size == 4) return static_cast<double>(std::bit_cast<float>(static_cast<std::uint32_t>(bits)));
      f16 h;
      h.bits = static_cast<std::uint16_t>(bits);
      return static_cast<double>(static_cast<float>(h));
    }
    if (k == 'u') {
      STUNET_CHECK(bits <= static_cast<std::uint64_t>(INT64_MAX), "{}: numpy uint64 {} does not fit in int64",
                   where(), bits);
      return static_cast<std::int64_t>(bits);
    }
    if (size < 8 && (bits >> (8 * size - 1)) & 1) bits |= ~std::uint64_t{0} << (8 * size);  // sign-extend
    return static_cast<std::int64_t>(bits);
  }

  void build(Value& target, ValuePtr state) {
    if (Dict* d = std::get_if<Dict>(&target.data()); d && d->ordered) {
      STUNET_CHECK(state->kind() == Value::Kind::dict, "{}: BUILD of an OrderedDict with a {} state", where(),
                   state->kind_name());
      d->state = std::move(state);
      return;
    }
    if (NumpyDtype* dt = std::get_if<NumpyDtype>(&target.data())) {
      // (version, byteorder, subdescr, names, fields, elsize, alignment, flags[, metadata])
      STUNET_CHECK(state->kind() == Value::Kind::tuple && state->as_tuple().size() >= 2 &&
                       state->as_tuple()[1]->kind() == Value::Kind::string,
                   "{}: BUILD of a numpy dtype with an unexpected {} state", where(), state->kind_name());
      const std::string& order = state->as_tuple()[1]->as_string();
      STUNET_CHECK(order == "<" || order == ">" || order == "|" || order == "=",
                   "{}: numpy dtype byte order '{}'", where(), printable(order));
      dt->byteorder = order[0];
      return;
    }
    STUNET_FAIL("{}: BUILD on a {} is not supported", where(), target.kind_name());
  }

  ValuePtr persistent_load(const Value& pid) {
    // torch.save: ('storage', storage_type, key, location, numel)
    const bool shape_ok = pid.kind() == Value::Kind::tuple && pid.as_tuple().size() == 5;
    STUNET_CHECK(shape_ok, "{}: persistent id is a {} (expected torch's ('storage', type, key, location, numel))",
                 where(), pid.kind() == Value::Kind::tuple ? fmt::format("tuple of {}", pid.as_tuple().size())
                                                           : std::string(pid.kind_name()));
    const auto& a = pid.as_tuple();
    STUNET_CHECK(a[0]->kind() == Value::Kind::string && a[0]->as_string() == "storage",
                 "{}: persistent id of kind {} (only 'storage' is known)", where(), describe(*a[0]));
    GlobalId id{};
    const bool storage_type = a[1]->kind() == Value::Kind::global &&
                              lookup_global(a[1]->as_global().module, a[1]->as_global().name, id) &&
                              id == GlobalId::storage_type;
    STUNET_CHECK(storage_type, "{}: storage type is a {}, not a torch storage class", where(), describe(*a[1]));
    STUNET_CHECK(a[2]->kind() == Value::Kind::string && a[3]->kind() == Value::Kind::string &&
                     a[4]->kind() == Value::Kind::integer && a[4]->as_int() >= 0,
                 "{}: storage id needs (str key, str location, int numel >= 0), found ({}, {}, {})", where(),
                 a[2]->kind_name(), a[3]->kind_name(), describe(*a[4]));
    return make(StorageRef{a[1]->as_global().name, a[2]->as_string(), a[3]->as_string(), a[4]->as_int()});
  }

  /// Refuses a result that contains itself (torch never writes one, and
  /// consumers walk results assuming none), and marks what is reachable
  /// (black) so that the destructor keeps it intact. Iterative: the depth of
  /// the data is bounded only by its size.
  void check_acyclic(const ValuePtr& root) {
    struct Frame {
      Value* v;
      std::size_t next;
    };
    std::vector<Frame> path;
    root->visit_ = kGrey;
    path.push_back({root.get(), 0});
    while (!path.empty()) {
      Frame& f = path.back();
      if (f.next == f.v->child_count()) {
        f.v->visit_ = kBlack;
        path.pop_back();
        continue;
      }
      Value* c = f.v->child(f.next++).get();
      if (c == nullptr) continue;
      STUNET_CHECK(c->visit_ != kGrey, "{}: the pickled object contains itself (a {} inside its own {})", what_,
                   c->kind_name(), f.v->kind_name());
      if (c->visit_ == 0) {
        c->visit_ = kGrey;
        path.push_back({c, 0});
      }
    }
  }

  static constexpr std::uint8_t kGrey = 1, kBlack = 2;
  const std::uint8_t* p_;
  std::size_t n_;
  std::size_t pos_ = 0, op_pos_ = 0;
  std::uint8_t op_ = 0;
  std::string what_;
  std::vector<ValuePtr> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint64_t, ValuePtr> memo_;
  std::vector<ValuePtr> containers_;
  bool success_ = false;
};

}  // namespace detail

/// Unpickles `data` (a torch.save data.pkl). `what` names the source in
/// error messages (e.g. "'x.model' entry 'archive/data.pkl'").
inline ValuePtr unpickle(std::span<const std::uint8_t> data, const std::string& what = "pickle") {
  detail::Unpickler u(data, what);
  return u.run();
}

/// Overload for a byte string (the contents of a zip entry).
inline ValuePtr unpickle(std::string_view data, const std::string& what = "pickle") {
  return unpickle(std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(data.data()), data.size()), what);
}

}  // namespace stunet::io::pickle
