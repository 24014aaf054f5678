#pragma once
/// \file
/// safetensors read and write (the Hugging Face format: an 8-byte little-
/// endian header length, a JSON header naming each tensor's dtype, shape and
/// byte range, then the raw little-endian data).
///
/// The reader checks every rule of the format before it allocates: header
/// length within the file, valid JSON, known dtypes, offsets in order,
/// non-overlapping, without holes and covering the data exactly, sizes equal to
/// shape x element size. A bad file raises stunet::Error naming the file, the
/// key and the numbers; it never crashes or allocates absurd memory.

#include <algorithm>
#include <bit>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "stunet/core/tensor.hpp"

namespace stunet::io {

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

/// The contents of a safetensors file, in file order.
struct SafetensorsFile {
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::map<std::string, std::string> metadata;

  /// The tensor stored under `key`; throws naming the key when absent.
  const Tensor& at(const std::string& key) const {
    for (const auto& [k, t] : tensors)
      if (k == key) return t;
    STUNET_FAIL("safetensors: no tensor named '{}' ({} tensors in the file)", key, tensors.size());
  }
  bool contains(const std::string& key) const {
    return std::any_of(tensors.begin(), tensors.end(), [&](const auto& kv) { return kv.first == key; });
  }
};

namespace detail {
inline const char* safetensors_dtype(DType d) {
  switch (d) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::f16: return "F16";
    case DType::bf16: return "BF16";
    case DType::i64: return "I64";
    case DType::i32: return "I32";
    case DType::u8: return "U8";
  }
  return "?";
}
inline bool parse_safetensors_dtype(const std::string& s, DType& out) {
  static const std::pair<const char*, DType> table[] = {{"F32", DType::f32}, {"F64", DType::f64},
                                                        {"F16", DType::f16}, {"BF16", DType::bf16},
                                                        {"I64", DType::i64}, {"I32", DType::i32},
                                                        {"U8", DType::u8}};
  for (const auto& [name, d] : table)
    if (s == name) {
      out = d;
      return true;
    }
  return false;
}
}  // namespace detail

/// Headers larger than this are refused (the reference implementation's limit).
inline constexpr std::uint64_t kMaxSafetensorsHeader = 100'000'000;

/// Reads every tensor of a safetensors file into host memory.
inline SafetensorsFile read_safetensors(const std::filesystem::path& path) {
  const std::string file = path.string();
  std::ifstream in(path, std::ios::binary);
  STUNET_CHECK(in.good(), "safetensors: cannot open '{}'", file);
  std::error_code ec;
  const std::uint64_t file_size = std::filesystem::file_size(path, ec);
  STUNET_CHECK(!ec, "safetensors: cannot stat '{}': {}", file, ec.message());
  STUNET_CHECK(file_size >= 8, "safetensors: '{}' has {} bytes, fewer than the 8-byte header length", file, file_size);
  std::uint64_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), 8);
  STUNET_CHECK(header_len <= kMaxSafetensorsHeader && header_len <= file_size - 8,
               "safetensors: '{}' declares a header of {} bytes but the file has {} bytes after the length field",
               file, header_len, file_size - 8);
  std::string header(static_cast<std::size_t>(header_len), '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  STUNET_CHECK(in.good(), "safetensors: '{}': header truncated", file);
  STUNET_CHECK(!header.empty() && header[0] == '{', "safetensors: '{}': header does not start with '{{'", file);

  nlohmann::json j = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  STUNET_CHECK(!j.is_discarded() && j.is_object(), "safetensors: '{}': header is not a JSON object", file);

  const std::uint64_t data_start = 8 + header_len;
  const std::uint64_t data_size = file_size - data_start;
  struct Entry {
    std::string key;
    DType dtype;
    Shape shape;
    std::uint64_t begin, end;
  };
  std::vector<Entry> entries;
  SafetensorsFile out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    if (key == "__metadata__") {
      STUNET_CHECK(it->is_object(), "safetensors: '{}': __metadata__ is not an object", file);
      for (auto m = it->begin(); m != it->end(); ++m) {
        STUNET_CHECK(m->is_string(), "safetensors: '{}': metadata value '{}' is not a string", file, m.key());
        out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const auto& v = *it;
    STUNET_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
                 "safetensors: '{}': entry '{}' needs dtype, shape and data_offsets", file, key);
    Entry e{key, DType::f32, {}, 0, 0};
    STUNET_CHECK(v["dtype"].is_string() && detail::parse_safetensors_dtype(v["dtype"].get<std::string>(), e.dtype),
                 "safetensors: '{}': tensor '{}' has unsupported dtype {}", file, key, v["dtype"].dump());
    const auto& sh = v["shape"];
    STUNET_CHECK(sh.is_array() && sh.size() <= static_cast<std::size_t>(kMaxRank),
                 "safetensors: '{}': tensor '{}' has shape {} (need an array of rank <= {})", file, key, sh.dump(),
                 kMaxRank);
    std::vector<std::int64_t> dims;
    std::uint64_t numel = 1;
    for (const auto& d : sh) {
      STUNET_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<std::int64_t>() >= 0),
                   "safetensors: '{}': tensor '{}' has a bad extent in shape {}", file, key, sh.dump());
      const std::uint64_t x = d.get<std::uint64_t>();
      STUNET_CHECK(x <= data_size && (x == 0 || numel <= data_size / x),
                   "safetensors: '{}': tensor '{}' shape {} is larger than the file's {} data bytes", file, key,
                   sh.dump(), data_size);
      numel *= x;
      dims.push_back(static_cast<std::int64_t>(x));
    }
    e.shape = Shape(std::span<const std::int64_t>(dims));
    const auto& off = v["data_offsets"];
    STUNET_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                 "safetensors: '{}': tensor '{}' has bad data_offsets {}", file, key, off.dump());
    e.begin = off[0].get<std::uint64_t>();
    e.end = off[1].get<std::uint64_t>();
    STUNET_CHECK(e.begin <= e.end && e.end <= data_size,
                 "safetensors: '{}': tensor '{}' data_offsets [{}, {}] outside the {} data bytes (truncated file?)",
                 file, key, e.begin, e.end, data_size);
    STUNET_CHECK(e.end - e.begin == numel * dtype_size(e.dtype),
                 "safetensors: '{}': tensor '{}' of dtype {} and shape {} needs {} bytes but data_offsets [{}, {}] "
                 "hold {}",
                 file, key, dtype_name(e.dtype), e.shape, numel * dtype_size(e.dtype), e.begin, e.end,
                 e.end - e.begin);
    entries.push_back(std::move(e));
  }
  // The byte ranges must tile the data section exactly: no overlap, no hole.
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const Entry* a, const Entry* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
  std::uint64_t cursor = 0;
  for (const Entry* e : by_offset) {
    STUNET_CHECK(e->begin == cursor,
                 "safetensors: '{}': tensor '{}' starts at byte {} but the previous tensor ends at {} ({})", file,
                 e->key, e->begin, cursor, e->begin < cursor ? "overlap" : "hole");
    cursor = e->end;
  }
  STUNET_CHECK(cursor == data_size, "safetensors: '{}': tensors cover {} bytes but the data section has {}", file,
               cursor, data_size);

  // Read in file order so the stream only moves forward.
  for (const Entry* e : by_offset) {
    Tensor t = Tensor::empty(e->shape, e->dtype);
    in.seekg(static_cast<std::streamoff>(data_start + e->begin));
    in.read(static_cast<char*>(t.raw_data()), static_cast<std::streamsize>(e->end - e->begin));
    STUNET_CHECK(in.good() || e->end == e->begin, "safetensors: '{}': read of tensor '{}' failed", file, e->key);
    out.tensors.emplace_back(e->key, std::move(t));
  }
  return out;
}

/// Writes tensors (host or device, any layout) and string metadata. The file
/// is written to a temporary name and renamed, so a crash never leaves a
/// half-written file under the final name.
inline void write_safetensors(const std::filesystem::path& path,
                              const std::vector<std::pair<std::string, Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  std::vector<Tensor> dense;
  for (const auto& [key, t] : tensors) {
    STUNET_CHECK(key != "__metadata__" && !header.contains(key), "safetensors: duplicate or reserved key '{}'", key);
    Tensor h = t.detach().to(Device::cpu()).contiguous();
    std::vector<std::int64_t> shape(h.shape().begin(), h.shape().end());
    header[key] = {{"dtype", detail::safetensors_dtype(h.dtype())},
                   {"shape", shape},
                   {"data_offsets", {offset, offset + h.nbytes()}}};
    offset += h.nbytes();
    dense.push_back(std::move(h));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data 8-byte aligned
  const std::uint64_t len = text.size();
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    STUNET_CHECK(out.good(), "safetensors: cannot write '{}'", tmp.string());
    out.write(reinterpret_cast<const char*>(&len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const Tensor& h : dense) out.write(static_cast<const char*>(h.raw_data()), static_cast<std::streamsize>(h.nbytes()));
    out.flush();
    STUNET_CHECK(out.good(), "safetensors: write to '{}' failed (disk full?)", tmp.string());
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  STUNET_CHECK(!ec, "safetensors: cannot rename '{}' to '{}': {}", tmp.string(), path.string(), ec.message());
}

}  // namespace stunet::io
