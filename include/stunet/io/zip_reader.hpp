#pragma once
/// \file
/// Read-only access to the entries of a zip archive (the container of
/// PyTorch's torch.save format), on top of libzip.
///
/// Opt-in: libzip is an optional dependency (the GPU machines lack it), so
/// this header compiles only where the build says libzip is linked, by
/// defining STUNET_WITH_LIBZIP (the CMake target stunet::checkpoint does).
/// Without it the include stops with an #error naming what to do, instead
/// of failing later with undefined references to zip_open.
///
/// Every failure raises stunet::Error naming the archive and, where there is
/// one, the entry: a missing file, a file that is not a zip, an inconsistent
/// or truncated archive, an encrypted entry, a CRC mismatch.

#if !defined(STUNET_WITH_LIBZIP)
#error "stunet/io/zip_reader.hpp and torch_checkpoint.hpp need libzip: install libzip-dev, link -lzip and \
define STUNET_WITH_LIBZIP (the CMake target stunet::checkpoint does both)"
#endif

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <zip.h>

#include "stunet/core/error.hpp"

namespace stunet::io {

/// What the central directory says about one entry of a zip archive.
struct ZipEntry {
  std::string name;                  ///< path inside the archive, as stored
  std::uint64_t index = 0;           ///< libzip index (central directory order)
  std::uint64_t size = 0;            ///< uncompressed size in bytes
  std::uint64_t compressed_size = 0; ///< stored size in bytes
  std::uint16_t method = 0;          ///< 0 = stored, 8 = deflate, ...
  bool encrypted = false;            ///< encrypted entries cannot be read
};

/// An open zip archive, read-only. Not thread-safe (libzip archives are not):
/// use one reader per thread.
class ZipReader {
 public:
  /// Opens `path`, with libzip's consistency checks (local headers must agree
  /// with the central directory), and lists its entries. Throws naming the
  /// path when the file is missing, is not a zip, or is inconsistent.
  explicit ZipReader(const std::filesystem::path& path) : path_(path.string()) {
    std::error_code ec;
    STUNET_CHECK(std::filesystem::is_regular_file(path, ec), "zip: '{}' does not exist or is not a regular file",
                 path_);
    int code = 0;
    // ZIP_CHECKCONS: a torch.save archive is written in one pass and is always
    // consistent, so an inconsistency means damage or tampering.
    archive_ = zip_open(path_.c_str(), ZIP_RDONLY | ZIP_CHECKCONS, &code);
    STUNET_CHECK(archive_ != nullptr, "zip: cannot open '{}': {}", path_, error_string(code));
    try {
      const zip_int64_t n = zip_get_num_entries(archive_, 0);
      STUNET_CHECK(n >= 0, "zip: '{}': cannot count the entries", path_);
      entries_.reserve(static_cast<std::size_t>(n));
      for (zip_int64_t i = 0; i < n; ++i) {
        zip_stat_t st;
        zip_stat_init(&st);
        STUNET_CHECK(zip_stat_index(archive_, static_cast<zip_uint64_t>(i), 0, &st) == 0,
                     "zip: '{}': cannot read the directory record of entry {}: {}", path_, i,
                     zip_strerror(archive_));
        STUNET_CHECK((st.valid & ZIP_STAT_NAME) && (st.valid & ZIP_STAT_SIZE) && st.name != nullptr,
                     "zip: '{}': entry {} has no name or size in the central directory", path_, i);
        ZipEntry e;
        e.name = st.name;
        e.index = static_cast<std::uint64_t>(i);
        e.size = st.size;
        e.compressed_size = (st.valid & ZIP_STAT_COMP_SIZE) ? st.comp_size : st.size;
        e.method = (st.valid & ZIP_STAT_COMP_METHOD) ? st.comp_method : 0;
        e.encrypted = (st.valid & ZIP_STAT_ENCRYPTION_METHOD) && st.encryption_method != ZIP_EM_NONE;
        // Two entries of one name would make the lookup ambiguous: a reader
        // and a tool inspecting the file could see different data.
        const bool fresh = by_name_.emplace(e.name, entries_.size()).second;
        STUNET_CHECK(fresh, "zip: '{}': entry name '{}' occurs twice", path_, e.name);
        entries_.push_back(std::move(e));
      }
    } catch (...) {
      zip_discard(archive_);
      throw;
    }
  }

  /// One owner per open archive.
  ZipReader(const ZipReader&) = delete;
  ZipReader& operator=(const ZipReader&) = delete;
  /// Moves the open archive; the source is left closed.
  ZipReader(ZipReader&& other) noexcept
      : path_(std::move(other.path_)), archive_(std::exchange(other.archive_, nullptr)),
        entries_(std::move(other.entries_)), by_name_(std::move(other.by_name_)) {}
  /// Closes this archive and takes over `other`'s.
  ZipReader& operator=(ZipReader&& other) noexcept {
    if (this != &other) {
      if (archive_) zip_discard(archive_);
      path_ = std::move(other.path_);
      archive_ = std::exchange(other.archive_, nullptr);
      entries_ = std::move(other.entries_);
      by_name_ = std::move(other.by_name_);
    }
    return *this;
  }
  /// Closes the archive (read-only: nothing is written back).
  ~ZipReader() {
    if (archive_) zip_discard(archive_);
  }

  /// The archive path, as given (for messages).
  const std::string& path() const { return path_; }
  /// All entries in central-directory order.
  const std::vector<ZipEntry>& entries() const { return entries_; }
  /// The entry named `name`, or nullptr.
  const ZipEntry* find(std::string_view name) const {
    auto it = by_name_.find(std::string(name));
    return it == by_name_.end() ? nullptr : &entries_[it->second];
  }
  /// The entry named `name`; throws naming the archive and the entry when absent.
  const ZipEntry& at(std::string_view name) const {
    const ZipEntry* e = find(name);
    STUNET_CHECK(e != nullptr, "zip: '{}' has no entry '{}' ({} entries)", path_, name, entries_.size());
    return *e;
  }

  /// The whole entry as bytes. Entries larger than `max_bytes` are refused
  /// before anything is allocated (a directory can claim any size).
  std::string read(std::string_view name, std::uint64_t max_bytes) const {
    const ZipEntry& e = at(name);
    STUNET_CHECK(e.size <= max_bytes, "zip: '{}': entry '{}' is {} bytes, more than the {} allowed", path_, e.name,
                 e.size, max_bytes);
    std::string out(static_cast<std::size_t>(e.size), '\0');
    read_into(e, out.data(), e.size);
    return out;
  }

  /// Decompresses the entry into dst, which must hold exactly its size:
  /// `nbytes` is the caller's expectation and must equal the entry size. The
  /// CRC is verified (a read past the end makes libzip check it).
  void read_into(const ZipEntry& e, void* dst, std::uint64_t nbytes) const {
    STUNET_CHECK(nbytes == e.size, "zip: '{}': entry '{}' holds {} bytes but {} were expected", path_, e.name, e.size,
                 nbytes);
    STUNET_CHECK(!e.encrypted, "zip: '{}': entry '{}' is encrypted", path_, e.name);
    zip_file_t* f = zip_fopen_index(archive_, e.index, 0);
    STUNET_CHECK(f != nullptr, "zip: '{}': cannot open entry '{}': {}", path_, e.name, zip_strerror(archive_));
    struct Closer {
      zip_file_t* f;
      ~Closer() {
        if (f) zip_fclose(f);
      }
    } closer{f};
    char* out = static_cast<char*>(dst);
    std::uint64_t done = 0;
    // zip_fread takes a zip_uint64_t but returns a signed count: read in
    // chunks well below 2^63 (and below what any platform maps at once).
    constexpr std::uint64_t kChunk = std::uint64_t{1} << 30;
    while (done < nbytes) {
      const std::uint64_t want = std::min(kChunk, nbytes - done);
      const zip_int64_t got = zip_fread(f, out + done, want);
      STUNET_CHECK(got >= 0, "zip: '{}': reading entry '{}' failed after {} of {} bytes: {}", path_, e.name, done,
                   nbytes, zip_file_strerror(f));
      STUNET_CHECK(got > 0, "zip: '{}': entry '{}' ends after {} of its {} bytes (truncated archive?)", path_, e.name,
                   done, nbytes);
      done += static_cast<std::uint64_t>(got);
    }
    // libzip verifies the CRC when the stream reports its end, which a read
    // of exactly `size` bytes never asks for.
    char extra = 0;
    const zip_int64_t tail = zip_fread(f, &extra, 1);
    STUNET_CHECK(tail >= 0, "zip: '{}': entry '{}' is damaged: {}", path_, e.name, zip_file_strerror(f));
    STUNET_CHECK(tail == 0, "zip: '{}': entry '{}' holds more data than the {} bytes its directory record declares",
                 path_, e.name, nbytes);
    closer.f = nullptr;
    const int rc = zip_fclose(f);
    STUNET_CHECK(rc == 0, "zip: '{}': closing entry '{}' failed: {}", path_, e.name, error_string(rc));
  }

 private:
  static std::string error_string(int code) {
    zip_error_t err;
    zip_error_init_with_code(&err, code);
    std::string s = zip_error_strerror(&err);
    zip_error_fini(&err);
    return s;
  }

  std::string path_;
  zip_t* archive_ = nullptr;
  std::vector<ZipEntry> entries_;
  std::unordered_map<std::string, std::size_t> by_name_;
};

}  // namespace stunet::io
