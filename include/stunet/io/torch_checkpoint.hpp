#pragma once
/// \file
/// Loads PyTorch checkpoints (torch.save zip files, PyTorch >= 1.6) without
/// Python: the official STU-Net / nnU-Net weights.
///
/// A torch.save file is a zip archive holding `<archive>/data.pkl` (a pickle
/// of the saved object in which every tensor refers to a storage by key) and
/// one entry `<archive>/data/<key>` of raw little-endian bytes per storage.
/// nnU-Net v1 `.model` files pickle {'state_dict': OrderedDict, 'epoch',
/// 'optimizer_state_dict', 'plot_stuff', 'amp_grad_scaler', ...}; nnU-Net v2
/// `.pth` files keep the weights under 'network_weights'. A plain
/// torch.save(model.state_dict()) is accepted too.
///
/// The pickle is read by stunet::io::pickle, which runs no code and refuses
/// any global outside PyTorch's tensor and container vocabulary. Only the
/// storages of the selected state dict are read: optimizer moments are
/// skipped. Each tensor is checked against its storage (dtype, element count
/// equal to the entry size, offset + extent within the storage) and returned
/// as a dense host tensor of its saved dtype. Errors are stunet::Error naming
/// the file, the tensor key, the zip entry and the numbers.
///
/// Needs libzip; see zip_reader.hpp (define STUNET_WITH_LIBZIP).

// First: stops with a clear #error when libzip is not enabled.
#include "stunet/io/zip_reader.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/ranges.h>

#include "stunet/core/tensor.hpp"
#include "stunet/io/pickle.hpp"

namespace stunet::io {

/// data.pkl larger than this is refused before it is read (nnU-Net's,
/// plans and logs included, are well under a few MB).
inline constexpr std::uint64_t kMaxTorchPickleBytes = std::uint64_t{1} << 30;

namespace detail {

/// DType of a torch storage class, false for those stunet cannot hold.
/// BoolStorage becomes uint8: torch stores bools as one byte 0/1.
inline bool torch_storage_dtype(std::string_view type, DType& out) {
  static const std::pair<std::string_view, DType> table[] = {
      {"FloatStorage", DType::f32}, {"DoubleStorage", DType::f64}, {"HalfStorage", DType::f16},
      {"BFloat16Storage", DType::bf16}, {"LongStorage", DType::i64}, {"IntStorage", DType::i32},
      {"ByteStorage", DType::u8}, {"BoolStorage", DType::u8}};
  for (const auto& [name, d] : table)
    if (name == type) {
      out = d;
      return true;
    }
  return false;
}

/// The first `n` bytes of a file (fewer if it is shorter).
inline std::string file_head(const std::filesystem::path& path, std::size_t n) {
  std::ifstream in(path, std::ios::binary);
  std::string s(n, '\0');
  in.read(s.data(), static_cast<std::streamsize>(n));
  s.resize(static_cast<std::size_t>(std::max<std::streamsize>(in.gcount(), 0)));
  return s;
}

/// The unique entry "<archive>/data.pkl" (one path component before it), or
/// an empty string with `why` filled in.
inline std::string find_data_pkl(const ZipReader& zip, std::string& why) {
  std::vector<std::string> found;
  for (const auto& e : zip.entries()) {
    const std::string& n = e.name;
    constexpr std::string_view suffix = "/data.pkl";
    if (n.size() > suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0 &&
        n.find('/') == n.size() - suffix.size())
      found.push_back(n);
  }
  if (found.size() == 1) return found[0];
  why = found.empty() ? fmt::format("no '<archive>/data.pkl' among its {} entries", zip.entries().size())
                      : fmt::format("{} data.pkl entries ('{}', '{}', ...)", found.size(), found[0], found[1]);
  return {};
}

/// Strips the wrappers that prefix parameter names: DataParallel /
/// DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
inline std::string strip_wrapper_prefixes(std::string key) {
  for (;;) {
    if (key.starts_with("module.")) key.erase(0, 7);
    else if (key.starts_with("_orig_mod.")) key.erase(0, 10);
    else return key;
  }
}

/// dst (dense) <- the strided view (sizes, strides in elements) at src.
inline void gather_strided(char* dst, const char* src, const std::vector<std::int64_t>& sizes,
                           const std::vector<std::int64_t>& strides, std::size_t esize) {
  std::int64_t n[5] = {1, 1, 1, 1, 1}, s[5] = {0, 0, 0, 0, 0};
  const int off = 5 - static_cast<int>(sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    n[off + static_cast<int>(i)] = sizes[i];
    s[off + static_cast<int>(i)] = strides[i];
  }
  const auto es = static_cast<std::int64_t>(esize);
  for (std::int64_t a = 0; a < n[0]; ++a)
    for (std::int64_t b = 0; b < n[1]; ++b)
      for (std::int64_t c = 0; c < n[2]; ++c)
        for (std::int64_t d = 0; d < n[3]; ++d) {
          const char* row = src + (a * s[0] + b * s[1] + c * s[2] + d * s[3]) * es;
          if (s[4] == 1) {
            std::memcpy(dst, row, static_cast<std::size_t>(n[4] * es));
            dst += n[4] * es;
          } else {
            for (std::int64_t e = 0; e < n[4]; ++e, dst += es) std::memcpy(dst, row + e * s[4] * es, esize);
          }
        }
}

}  // namespace detail

/// An opened torch.save checkpoint: the unpickled object (no tensor bytes
/// read yet) and the archive to read storages from on demand.
class TorchCheckpoint {
 public:
  /// Opens the zip, finds the single `<archive>/data.pkl` and unpickles it.
  explicit TorchCheckpoint(const std::filesystem::path& path) : file_(path.string()), zip_(checked(path)) {
    std::string why;
    pickle_name_ = detail::find_data_pkl(zip_, why);
    STUNET_CHECK(!pickle_name_.empty(), "torch checkpoint '{}': {} (not a torch.save archive?)", file_, why);
    prefix_ = pickle_name_.substr(0, pickle_name_.size() - std::string_view("/data.pkl").size());
    if (const ZipEntry* bo = zip_.find(prefix_ + "/byteorder")) {
      const std::string order = zip_.read(bo->name, 64);
      STUNET_CHECK(order == "little", "torch checkpoint '{}': saved with byte order '{}' (only little-endian is read)",
                   file_, pickle::detail::printable(order));
    }
    const std::string bytes = zip_.read(pickle_name_, kMaxTorchPickleBytes);
    root_ = pickle::unpickle(bytes, fmt::format("torch checkpoint '{}' entry '{}'", file_, pickle_name_));
  }

  /// The checkpoint path, as given.
  const std::string& path() const { return file_; }
  /// The archive's top-level folder name (torch uses the file stem or "archive").
  const std::string& archive_name() const { return prefix_; }
  /// The unpickled object: for nnU-Net a dict holding 'epoch', 'plot_stuff',
  /// 'init_args', ... next to the weights.
  const pickle::ValuePtr& root() const { return root_; }

  /// The dict of tensors to load: 'state_dict' (nnU-Net v1), else
  /// 'network_weights' (nnU-Net v2), else the top-level dict itself when all
  /// its values are tensors.
  const pickle::Dict& weights_dict() const {
    STUNET_CHECK(root_->is_dict(), "torch checkpoint '{}': data.pkl holds a {}, expected a dict", file_,
                 root_->kind_name());
    const pickle::Dict& top = root_->as_dict();
    for (const char* name : {"state_dict", "network_weights"}) {
      if (const pickle::ValuePtr& v = top.get(name)) {
        STUNET_CHECK(v->is_dict(), "torch checkpoint '{}': '{}' is a {}, expected a dict of tensors", file_, name,
                     v->kind_name());
        return v->as_dict();
      }
    }
    bool all_tensors = top.size() > 0;
    for (const auto& [k, v] : top.items()) all_tensors = all_tensors && v->is_tensor();
    if (all_tensors) return top;
    std::string keys;
    for (std::size_t i = 0; i < top.items().size() && i < 12; ++i) {
      const auto& k = top.items()[i].first;
      keys += (i ? ", " : "") + (std::holds_alternative<std::string>(k)
                                     ? "'" + pickle::detail::printable(std::get<std::string>(k)) + "'"
                                     : std::to_string(std::get<std::int64_t>(k)));
    }
    STUNET_FAIL("torch checkpoint '{}': no weights found: expected a 'state_dict' (nnU-Net v1) or 'network_weights' "
                "(nnU-Net v2) entry or a dict of tensors, the top-level dict has keys [{}{}]",
                file_, keys, top.size() > 12 ? ", ..." : "");
  }

  /// The state dict: key (wrapper prefixes "module." and "_orig_mod."
  /// stripped) -> dense host tensor of the saved dtype, in saved order.
  std::vector<std::pair<std::string, Tensor>> state_dict() const {
    const pickle::Dict& dict = weights_dict();
    std::vector<std::pair<std::string, Tensor>> out;
    out.reserve(dict.size());
    std::set<std::string> seen;
    Cache cache;
    for (const auto& [k, v] : dict.items()) {
      STUNET_CHECK(std::holds_alternative<std::string>(k), "torch checkpoint '{}': state dict key {} is an int, not a "
                   "parameter name", file_, std::get<std::int64_t>(k));
      const std::string& raw = std::get<std::string>(k);
      STUNET_CHECK(v->is_tensor(), "torch checkpoint '{}': state dict entry '{}' is a {}, not a tensor", file_,
                   pickle::detail::printable(raw), v->kind_name());
      std::string key = detail::strip_wrapper_prefixes(raw);
      STUNET_CHECK(seen.insert(key).second, "torch checkpoint '{}': key '{}' occurs twice once prefixes are stripped",
                   file_, pickle::detail::printable(key));
      Tensor t = materialise(v->as_tensor(), raw, cache);
      out.emplace_back(std::move(key), std::move(t));
    }
    return out;
  }

  /// Reads one tensor (for entries outside the state dict); `key` names it
  /// in messages.
  Tensor tensor(const pickle::TensorRef& ref, const std::string& key) const {
    Cache cache;
    return materialise(ref, key, cache);
  }

 private:
  /// Storage bytes already read, by storage key: a storage shared by several
  /// tensors is decompressed once per call.
  using Cache = std::map<std::string, Tensor>;

  static const std::filesystem::path& checked(const std::filesystem::path& path) {
    const std::string file = path.string();
    std::error_code ec;
    STUNET_CHECK(std::filesystem::is_regular_file(path, ec), "torch checkpoint '{}' does not exist or is not a file",
                 file);
    const std::string head = detail::file_head(path, 4);
    // Before 1.6 torch.save wrote a sequence of pickles starting with a
    // magic number (PROTO 2, LONG1 of 10 bytes); name it instead of "not a zip".
    STUNET_CHECK(!(head.size() >= 4 && head.compare(0, 4, "\x80\x02\x8a\x0a") == 0),
                 "torch checkpoint '{}' is in the legacy format of PyTorch < 1.6, which is not read; re-save it with "
                 "a newer PyTorch (torch.save(torch.load(f), f))", file);
    STUNET_CHECK(head.size() == 4 && head.compare(0, 4, "PK\x03\x04") == 0,
                 "torch checkpoint '{}' is not a zip archive (starts with {}); expected a torch.save file", file,
                 head.empty() ? std::string("nothing, the file is empty")
                              : fmt::format("bytes '{}'", pickle::detail::printable(head)));
    return path;
  }

  Tensor materialise(const pickle::TensorRef& t, const std::string& key, Cache& cache) const {
    const std::string k = pickle::detail::printable(key);
    DType dt{};
    STUNET_CHECK(detail::torch_storage_dtype(t.storage.type, dt),
                 "torch checkpoint '{}': tensor '{}' is stored as torch.{}, which stunet cannot hold (float32, "
                 "float64, float16, bfloat16, int64, int32, uint8, bool are read)",
                 file_, k, t.storage.type);
    STUNET_CHECK(t.sizes.size() <= static_cast<std::size_t>(kMaxRank),
                 "torch checkpoint '{}': tensor '{}' has rank {}, more than stunet's {}", file_, k, t.sizes.size(),
                 kMaxRank);
    const Shape shape{std::span<const std::int64_t>(t.sizes)};
    std::int64_t numel = 1, last = t.offset;
    bool overflow = false;
    for (std::size_t i = 0; i < t.sizes.size(); ++i) {
      std::int64_t reach = 0;
      overflow = overflow || __builtin_mul_overflow(numel, t.sizes[i], &numel);
      if (t.sizes[i] > 0) overflow = overflow || __builtin_mul_overflow(t.sizes[i] - 1, t.strides[i], &reach) ||
                                     __builtin_add_overflow(last, reach, &last);
    }
    STUNET_CHECK(!overflow, "torch checkpoint '{}': tensor '{}' of sizes {} and strides {} overflows 64-bit indexing",
                 file_, k, t.sizes, t.strides);
    if (numel == 0) return Tensor::empty(shape, dt);

    const std::string entry = prefix_ + "/data/" + t.storage.key;
    const ZipEntry* e = zip_.find(entry);
    STUNET_CHECK(e != nullptr, "torch checkpoint '{}': tensor '{}' refers to storage '{}' but the archive has no entry "
                 "'{}'", file_, k, pickle::detail::printable(t.storage.key), pickle::detail::printable(entry));
    const std::uint64_t esize = dtype_size(dt);
    const auto storage_numel = static_cast<std::uint64_t>(t.storage.numel);
    STUNET_CHECK(storage_numel <= e->size / esize && storage_numel * esize == e->size,
                 "torch checkpoint '{}': storage '{}' of tensor '{}' declares {} elements of {} ({} bytes) but entry "
                 "'{}' holds {} bytes", file_, pickle::detail::printable(t.storage.key), k, storage_numel,
                 t.storage.type, storage_numel * esize, e->name, e->size);
    STUNET_CHECK(static_cast<std::uint64_t>(last) < storage_numel,
                 "torch checkpoint '{}': tensor '{}' (offset {}, sizes {}, strides {}) reaches element {} of a storage "
                 "of {} elements", file_, k, t.offset, t.sizes, t.strides, last, storage_numel);
    // Overlapping views (expand: stride 0) can describe more elements than
    // the storage holds; refusing them bounds the allocation by the file.
    STUNET_CHECK(static_cast<std::uint64_t>(numel) <= storage_numel,
                 "torch checkpoint '{}': tensor '{}' has {} elements but its storage only {} (an expanded view; not "
                 "read)", file_, k, numel, storage_numel);

    Tensor out = Tensor::empty(shape, dt);
    auto hit = cache.find(t.storage.key);
    const bool dense = t.offset == 0 && static_cast<std::uint64_t>(numel) == storage_numel && is_dense(t);
    if (hit == cache.end() && dense) {
      // The common case: the tensor is its whole storage; read straight in.
      zip_.read_into(*e, out.raw_data(), e->size);
      cache.emplace(t.storage.key, out);
      return out;
    }
    if (hit == cache.end()) {
      Tensor bytes = Tensor::empty({static_cast<std::int64_t>(e->size)}, DType::u8);
      zip_.read_into(*e, bytes.raw_data(), e->size);
      hit = cache.emplace(t.storage.key, std::move(bytes)).first;
    }
    const char* base = static_cast<const char*>(hit->second.raw_data());
    detail::gather_strided(static_cast<char*>(out.raw_data()), base + t.offset * static_cast<std::int64_t>(esize),
                           t.sizes, t.strides, esize);
    return out;
  }

  static bool is_dense(const pickle::TensorRef& t) {
    std::int64_t expected = 1;
    for (std::size_t i = t.sizes.size(); i-- > 0;) {
      if (t.sizes[i] != 1 && t.strides[i] != expected) return false;
      expected *= t.sizes[i];
    }
    return true;
  }

  std::string file_;
  ZipReader zip_;
  std::string pickle_name_, prefix_;
  pickle::ValuePtr root_;
};

/// Loads the weights of a torch.save checkpoint (nnU-Net v1 .model, v2 .pth,
/// or a saved state dict) as (key, dense host tensor) pairs in saved order,
/// "module." prefixes stripped.
inline std::vector<std::pair<std::string, Tensor>> load_torch_state_dict(const std::filesystem::path& path) {
  return TorchCheckpoint(path).state_dict();
}

/// True when `path` is a zip archive with a single `<archive>/data.pkl`, i.e.
/// looks like a torch.save file. Never throws; says nothing about whether the
/// pickle is valid.
inline bool is_torch_zip_checkpoint(const std::filesystem::path& path) noexcept {
  try {
    if (detail::file_head(path, 4) != std::string_view("PK\x03\x04", 4)) return false;
    ZipReader zip(path);
    std::string why;
    return !detail::find_data_pkl(zip, why).empty();
  } catch (...) {
    return false;
  }
}

}  // namespace stunet::io
