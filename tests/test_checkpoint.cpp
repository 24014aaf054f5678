// PyTorch checkpoints: the golden nnU-Net v1 .model against the safetensors
// reference, hand-built torch.save archives for the cases the golden file
// lacks (v2 layout, prefixes, every dtype, views of shared storages, the
// numpy and torch.device values of real nnU-Net files), every way a file
// can be malformed or hostile, and a truncation / bit-flip sweep.
// The suite writes its zip fixtures with libzip itself, so it is only ever
// built where libzip is linked: say so to the opt-in of zip_reader.hpp.
#ifndef STUNET_WITH_LIBZIP
#define STUNET_WITH_LIBZIP 1
#endif

#include <zip.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <random>

#include "testing.hpp"
#include "stunet/io/safetensors.hpp"
#include "stunet/io/torch_checkpoint.hpp"
#include "stunet/io/weights.hpp"

using namespace stunet;
using doctest::Contains;
using namespace std::string_literals;
namespace fs = std::filesystem;
namespace pk = stunet::io::pickle;

namespace {

/// A directory unique to this process and test (ctest may run the cases of
/// this file in parallel), removed with everything in it at scope exit.
struct TempDir {
  fs::path dir;
  explicit TempDir(const std::string& name) {
    dir = fs::temp_directory_path() / fmt::format("stunet_ckpt_{}_{}", ::getpid(), name);
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  fs::path operator/(const std::string& file) const { return dir / file; }
};

/// Emits pickle opcodes the way CPython's pickler does for torch.save
/// (protocol 2), so that fixtures read like real data.pkl files.
class PickleWriter {
 public:
  PickleWriter() { out_ += "\x80\x02"; }
  PickleWriter& raw(std::string_view bytes) {
    out_ += bytes;
    return *this;
  }
  PickleWriter& op(char c) {
    out_ += c;
    return *this;
  }
  PickleWriter& mark() { return op('('); }
  PickleWriter& none() { return op('N'); }
  PickleWriter& boolean(bool v) { return op(v ? '\x88' : '\x89'); }
  PickleWriter& str(std::string_view s) {
    op('X');
    le(s.size(), 4);
    return raw(s);
  }
  PickleWriter& integer(std::int64_t v) {
    if (v >= 0 && v < 256) return op('K'), le(static_cast<std::uint64_t>(v), 1), *this;
    if (v >= 0 && v < 65536) return op('M'), le(static_cast<std::uint64_t>(v), 2), *this;
    if (v >= INT32_MIN && v <= INT32_MAX) return op('J'), le(static_cast<std::uint64_t>(v), 4), *this;
    op('\x8a');
    out_ += '\x08';
    le(static_cast<std::uint64_t>(v), 8);
    return *this;
  }
  PickleWriter& floating(double v) {
    op('G');
    const auto bits = std::bit_cast<std::uint64_t>(v);
    for (int i = 7; i >= 0; --i) out_ += static_cast<char>((bits >> (8 * i)) & 0xff);
    return *this;
  }
  PickleWriter& global(std::string_view module, std::string_view name) {
    op('c');
    out_ += module;
    out_ += '\n';
    out_ += name;
    out_ += '\n';
    return *this;
  }
  PickleWriter& put(int memo) { return op('q'), le(static_cast<std::uint64_t>(memo), 1), *this; }
  PickleWriter& get(int memo) { return op('h'), le(static_cast<std::uint64_t>(memo), 1), *this; }
  /// collections.OrderedDict() as its __reduce__ pickles it.
  PickleWriter& ordered_dict() { return global("collections", "OrderedDict").op(')').op('R'); }
  /// A tuple of ints (sizes, strides).
  PickleWriter& int_tuple(const std::vector<std::int64_t>& v) {
    mark();
    for (auto x : v) integer(x);
    return op('t');
  }
  /// What torch.Tensor.__reduce_ex__ writes: _rebuild_tensor_v2(storage
  /// persistent id, offset, sizes, strides, requires_grad, OrderedDict()).
  PickleWriter& tensor(std::string_view storage_type, std::string_view key, std::int64_t storage_numel,
                       std::int64_t offset, const std::vector<std::int64_t>& sizes,
                       const std::vector<std::int64_t>& strides) {
    global("torch._utils", "_rebuild_tensor_v2").mark();
    mark().str("storage").global("torch", storage_type).str(key).str("cpu").integer(storage_numel).op('t').op('Q');
    integer(offset).int_tuple(sizes).int_tuple(strides).boolean(false).ordered_dict();
    return op('t').op('R');
  }
  /// A numpy scalar as protocol 2 writes it (numpy dtype + _codecs bytes).
  PickleWriter& numpy_scalar(std::string_view code, std::string_view order, std::string_view bytes) {
    global("numpy._core.multiarray", "scalar");
    global("numpy", "dtype").str(code).boolean(false).boolean(true).op('\x87').op('R');
    mark().integer(3).str(order).none().none().none().integer(-1).integer(-1).integer(0).op('t').op('b');
    std::string utf8;
    for (unsigned char c : bytes) {
      if (c < 0x80) utf8 += static_cast<char>(c);
      else utf8 += {static_cast<char>(0xc0 | (c >> 6)), static_cast<char>(0x80 | (c & 0x3f))};
    }
    global("_codecs", "encode").str(utf8).str("latin1").op('\x86').op('R');
    return op('\x86').op('R');
  }
  /// The pickle with its STOP.
  std::string finish() const { return out_ + "."; }

 private:
  void le(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_ += static_cast<char>((v >> (8 * i)) & 0xff);
  }
  std::string out_;
};

template <class T> std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

using Entries = std::vector<std::pair<std::string, std::string>>;

/// A zip of stored (uncompressed) entries, as torch writes them, with a
/// fixed mtime so the bytes are the same on every run.
void write_zip(const fs::path& path, const Entries& entries) {
  int err = 0;
  zip_t* za = zip_open(path.c_str(), ZIP_CREATE | ZIP_TRUNCATE, &err);
  REQUIRE(za != nullptr);
  for (const auto& [name, data] : entries) {
    zip_source_t* src = zip_source_buffer(za, data.data(), data.size(), 0);
    REQUIRE(src != nullptr);
    const zip_int64_t idx = zip_file_add(za, name.c_str(), src, ZIP_FL_ENC_UTF_8);
    if (idx < 0) zip_source_free(src);
    REQUIRE(idx >= 0);
    REQUIRE(zip_set_file_compression(za, static_cast<zip_uint64_t>(idx), ZIP_CM_STORE, 0) == 0);
    REQUIRE(zip_file_set_mtime(za, static_cast<zip_uint64_t>(idx), 1700000000, 0) == 0);
  }
  REQUIRE(zip_close(za) == 0);
}

/// A torch.save-like archive: <prefix>/data.pkl, <prefix>/version and one
/// <prefix>/data/<key> per storage.
void write_checkpoint(const fs::path& path, const std::string& pickle, const Entries& storages,
                      const std::string& prefix = "archive") {
  Entries e{{prefix + "/data.pkl", pickle}};
  for (const auto& [key, bytes] : storages) e.emplace_back(prefix + "/data/" + key, bytes);
  e.emplace_back(prefix + "/version", "3\n");
  write_zip(path, e);
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_file(const fs::path& p, std::string_view bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

pk::ValuePtr unpickle(const std::string& bytes) { return pk::unpickle(bytes, "test"); }

const Tensor& find(const std::vector<std::pair<std::string, Tensor>>& sd, const std::string& key) {
  for (const auto& [k, t] : sd)
    if (k == key) return t;
  FAIL("no key " << key);
  static Tensor none;
  return none;
}

/// A small checkpoint exercising views: its pickle and its storages.
std::pair<std::string, Entries> strided_fixture() {
  std::vector<float> f(24);
  for (int i = 0; i < 24; ++i) f[static_cast<std::size_t>(i)] = static_cast<float>(i);
  PickleWriter w;
  w.op('}').mark();
  w.str("state_dict").ordered_dict().mark();
  w.str("transposed").tensor("FloatStorage", "0", 24, 3, {2, 3}, {1, 2});
  w.str("whole").tensor("FloatStorage", "0", 24, 0, {2, 3, 4}, {12, 4, 1});
  w.str("every6th").tensor("FloatStorage", "0", 24, 0, {4}, {6});
  w.str("scalar").tensor("FloatStorage", "0", 24, 5, {}, {});
  w.op('u').op('u');
  return {w.finish(), {{"0", bytes_of(f)}}};
}

}  // namespace

// ---------------------------------------------------------------------------
// The golden checkpoint
// ---------------------------------------------------------------------------

TEST_CASE("torch checkpoint: the golden nnU-Net v1 .model equals the safetensors reference bit for bit") {
  const fs::path shared = testing::shared_dir();
  if (shared.empty()) {
    MESSAGE("skipping: ../shared is absent");
    return;
  }
  const fs::path model = shared / "golden" / "stunet_tiny_nnunet_v1.model";
  const fs::path reference = shared / "golden" / "stunet_tiny.safetensors";
  REQUIRE(io::is_torch_zip_checkpoint(model));
  CHECK_FALSE(io::is_torch_zip_checkpoint(reference));
  CHECK_FALSE(io::is_torch_zip_checkpoint(shared / "golden" / "no_such_file.model"));

  auto sd = io::load_torch_state_dict(model);
  auto ref = io::read_safetensors(reference);
  std::size_t expected = 0;
  for (const auto& [k, t] : ref.tensors)
    for (const char* prefix : {"conv_blocks_context", "upsample_layers", "conv_blocks_localization", "seg_outputs"})
      if (k.starts_with(prefix)) ++expected;
  REQUIRE(expected > 0);
  CHECK(sd.size() == expected);
  for (const auto& [key, t] : sd) {
    CAPTURE(key);
    REQUIRE(ref.contains(key));
    const Tensor& r = ref.at(key);
    CHECK(t.dtype() == DType::f32);
    CHECK(t.is_contiguous());
    CHECK(t.device().is_cpu());
    REQUIRE(t.shape() == r.shape());
    CHECK(std::memcmp(t.raw_data(), r.contiguous().raw_data(), r.nbytes()) == 0);
  }

  // The rest of the pickle is readable as plain data.
  io::TorchCheckpoint ck(model);
  CHECK(ck.archive_name() == "stunet_tiny_nnunet_v1");
  const pk::Dict& top = ck.root()->as_dict();
  CHECK(top.get("epoch")->as_int() == 4000);
  CHECK(top.get("amp_grad_scaler")->as_dict().get("scale")->as_float() == 65536.0);
  CHECK(top.get("plot_stuff")->as_tuple().size() == 4);
  CHECK(top.get("optimizer_state_dict")->is_dict());
  const pk::Dict& state = top.get("state_dict")->as_dict();
  CHECK(state.ordered);
  REQUIRE(state.state != nullptr);
  CHECK(state.state->as_dict().get("_metadata") != nullptr);
  CHECK(std::get<std::string>(state.items().front().first) == "conv_blocks_context.0.0.conv1.weight");
}

// ---------------------------------------------------------------------------
// Layouts and values the golden file does not have
// ---------------------------------------------------------------------------

TEST_CASE("torch checkpoint: nnU-Net v2 'network_weights', 'module.' prefixes and the extras of real files") {
  TempDir tmp("v2");
  const std::vector<float> w = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -1e-3f};
  const std::vector<float> b = {0.5f, 0.25f, -0.125f};
  PickleWriter p;
  p.op('}').put(0).mark();
  p.str("network_weights").ordered_dict().put(1).mark();
  p.str("module.encoder.weight").tensor("FloatStorage", "0", 6, 0, {2, 3}, {3, 1});
  p.str("module.decoder.bias").tensor("FloatStorage", "1", 3, 0, {3}, {1});
  p.op('u');
  // What nnU-Net v2's save_checkpoint adds next to the weights.
  p.str("init_args").op('}').mark();
  p.str("fold").integer(0);
  p.str("device").global("torch", "device").str("cuda").integer(0).op('\x86').op('R');
  p.str("plans").op('}').str("patch_size").mark().integer(128).integer(128).integer(128).op('l').op('s');
  p.op('u');
  p.str("trainer_name").str("nnUNetTrainer");
  p.str("inference_allowed_mirroring_axes").mark().integer(0).integer(1).integer(2).op('t');
  p.str("current_epoch").integer(1000);
  p.str("_best_ema").numpy_scalar("f8", "<", bytes_of(std::vector<double>{0.875}));
  p.str("logging").op('}').str("mean_fg_dice").op(']').mark();
  p.numpy_scalar("f8", "<", bytes_of(std::vector<double>{0.5}));
  p.numpy_scalar("f4", "<", bytes_of(std::vector<float>{0.25f}));
  p.numpy_scalar("i8", "<", bytes_of(std::vector<std::int64_t>{-3}));
  p.numpy_scalar("b1", "|", std::string("\x01", 1));
  p.numpy_scalar("f8", ">", std::string("\x3f\xf8\x00\x00\x00\x00\x00\x00", 8));  // 1.5 big-endian
  p.op('e').op('s');
  p.op('u');
  const fs::path path = tmp / "checkpoint_final.pth";
  write_checkpoint(path, p.finish(), {{"0", bytes_of(w)}, {"1", bytes_of(b)}}, "checkpoint_final");

  CHECK(io::is_torch_zip_checkpoint(path));
  auto sd = io::load_torch_state_dict(path);
  REQUIRE(sd.size() == 2);
  CHECK(sd[0].first == "encoder.weight");
  CHECK(sd[1].first == "decoder.bias");
  CHECK(sd[0].second.shape() == Shape{2, 3});
  CHECK(sd[0].second.to_vector<float>() == w);
  CHECK(sd[1].second.to_vector<float>() == b);

  io::TorchCheckpoint ck(path);
  const pk::Dict& top = ck.root()->as_dict();
  CHECK(top.get("init_args")->as_dict().get("device")->as_string() == "cuda:0");
  CHECK(top.get("_best_ema")->as_float() == 0.875);
  const auto& dice = top.get("logging")->as_dict().get("mean_fg_dice")->as_list();
  REQUIRE(dice.size() == 5);
  CHECK(dice[0]->as_float() == 0.5);
  CHECK(dice[1]->as_float() == 0.25);
  CHECK(dice[2]->as_int() == -3);
  CHECK(dice[3]->as_bool());
  CHECK(dice[4]->as_float() == 1.5);
  CHECK(top.get("inference_allowed_mirroring_axes")->as_tuple().size() == 3);

  // torch.save(model.state_dict()): the top level is the dict of tensors,
  // with DataParallel and torch.compile prefixes.
  PickleWriter q;
  q.ordered_dict().mark();
  q.str("module._orig_mod.encoder.weight").tensor("FloatStorage", "0", 6, 0, {2, 3}, {3, 1});
  q.op('u');
  const fs::path plain = tmp / "state_dict.pt";
  write_checkpoint(plain, q.finish(), {{"0", bytes_of(w)}});
  auto sd2 = io::load_torch_state_dict(plain);
  REQUIRE(sd2.size() == 1);
  CHECK(sd2[0].first == "encoder.weight");
  CHECK(sd2[0].second.to_vector<float>() == w);
}

TEST_CASE("torch checkpoint: storage offsets, strides and storages shared by several tensors") {
  TempDir tmp("strided");
  auto [pickle, storages] = strided_fixture();
  const fs::path path = tmp / "strided.model";
  write_checkpoint(path, pickle, storages);
  auto sd = io::load_torch_state_dict(path);
  REQUIRE(sd.size() == 4);
  // A transposed view at offset 3: element [i][j] = storage[3 + i + 2j].
  const Tensor& tr = find(sd, "transposed");
  CHECK(tr.shape() == Shape{2, 3});
  CHECK(tr.is_contiguous());
  CHECK(tr.to_vector<float>() == std::vector<float>{3, 5, 7, 4, 6, 8});
  const Tensor& whole = find(sd, "whole");
  CHECK(whole.shape() == Shape{2, 3, 4});
  CHECK(whole.to_vector<float>()[23] == 23.0f);
  CHECK(find(sd, "every6th").to_vector<float>() == std::vector<float>{0, 6, 12, 18});
  CHECK(find(sd, "scalar").rank() == 0);
  CHECK(find(sd, "scalar").item() == 5.0);
  // Each result owns its memory, even where the checkpoint shared a storage.
  CHECK(tr.storage() != whole.storage());
}

TEST_CASE("torch checkpoint: every storage type stunet holds materialises with its dtype and bits") {
  TempDir tmp("dtypes");
  // float16: 1, -2.5, 0.0999755859375 (0x2e66), 65504 (largest finite)
  const std::vector<std::uint16_t> half = {0x3c00, 0xc100, 0x2e66, 0x7bff};
  const std::vector<std::uint16_t> bf = {0x3f80, 0xc040};  // 1, -3
  const std::vector<double> dbl = {1.0 / 3.0, -1e300};
  const std::vector<std::int64_t> lng = {-5, std::int64_t{1} << 40, INT64_MAX};
  const std::vector<std::int32_t> i32 = {-7, 123456};
  const std::vector<std::uint8_t> u8 = {0, 200, 255};
  const std::vector<std::uint8_t> boolean = {1, 0, 1};
  PickleWriter p;
  p.op('}').mark().str("state_dict").ordered_dict().mark();
  p.str("half").tensor("HalfStorage", "h", 4, 0, {4}, {1});
  p.str("half_view").tensor("HalfStorage", "h", 4, 1, {2}, {2});  // -2.5, 65504
  p.str("bf16").tensor("BFloat16Storage", "bf", 2, 0, {2}, {1});
  p.str("f64").tensor("DoubleStorage", "d", 2, 0, {2}, {1});
  p.str("i64").tensor("LongStorage", "l", 3, 0, {3}, {1});
  p.str("i32").tensor("IntStorage", "i", 2, 0, {1, 2}, {2, 1});
  p.str("u8").tensor("ByteStorage", "u", 3, 0, {3}, {1});
  p.str("bool").tensor("BoolStorage", "b", 3, 0, {3}, {1});
  p.str("empty").tensor("FloatStorage", "e", 0, 0, {0, 3}, {3, 1});
  p.op('u').op('u');
  // A storage type stunet cannot hold is fine where it is not loaded.
  const fs::path path = tmp / "dtypes.model";
  write_checkpoint(path, p.finish(),
                   {{"h", bytes_of(half)}, {"bf", bytes_of(bf)}, {"d", bytes_of(dbl)}, {"l", bytes_of(lng)},
                    {"i", bytes_of(i32)}, {"u", bytes_of(u8)}, {"b", bytes_of(boolean)}, {"e", ""}});
  auto sd = io::load_torch_state_dict(path);
  REQUIRE(sd.size() == 9);
  const Tensor& h = find(sd, "half");
  REQUIRE(h.dtype() == DType::f16);
  CHECK(std::memcmp(h.raw_data(), half.data(), 8) == 0);
  CHECK(h.to_vector<float>() == std::vector<float>{1.0f, -2.5f, 0.0999755859375f, 65504.0f});
  CHECK(find(sd, "half_view").to_vector<float>() == std::vector<float>{-2.5f, 65504.0f});
  CHECK(find(sd, "bf16").dtype() == DType::bf16);
  CHECK(find(sd, "bf16").to_vector<float>() == std::vector<float>{1.0f, -3.0f});
  CHECK(find(sd, "f64").to_vector<double>() == dbl);
  CHECK(find(sd, "i64").to_vector<std::int64_t>() == lng);
  CHECK(find(sd, "i32").dtype() == DType::i32);
  CHECK(find(sd, "i32").to_vector<std::int32_t>() == i32);
  CHECK(find(sd, "u8").to_vector<std::uint8_t>() == u8);
  CHECK(find(sd, "bool").dtype() == DType::u8);
  CHECK(find(sd, "bool").to_vector<std::uint8_t>() == boolean);
  CHECK(find(sd, "empty").shape() == Shape{0, 3});

  // Optimizer state may hold storage types stunet cannot hold: only the
  // weights are materialised, so that is no obstacle.
  PickleWriter q;
  q.op('}').mark();
  q.str("state_dict").ordered_dict().mark().str("w").tensor("FloatStorage", "0", 1, 0, {1}, {1}).op('u');
  q.str("optimizer_state_dict").op('}').str("odd").tensor("ShortStorage", "1", 1, 0, {1}, {1}).op('s');
  q.op('u');
  const fs::path opt = tmp / "optimizer.model";
  write_checkpoint(opt, q.finish(), {{"0", bytes_of(std::vector<float>{2.0f})}, {"1", std::string(2, '\0')}});
  CHECK(io::load_torch_state_dict(opt).at(0).second.item() == 2.0);
}

// ---------------------------------------------------------------------------
// Malformed and hostile files
// ---------------------------------------------------------------------------

namespace {

/// A one-tensor checkpoint whose tensor is described by the arguments.
fs::path one_tensor(const TempDir& tmp, const std::string& name, std::string_view type, std::int64_t numel,
                    std::int64_t offset, const std::vector<std::int64_t>& sizes,
                    const std::vector<std::int64_t>& strides, const std::string& storage_bytes,
                    const std::string& storage_key = "0") {
  PickleWriter p;
  p.op('}').str("state_dict").ordered_dict().str("w").tensor(type, "0", numel, offset, sizes, strides).op('s').op('s');
  const fs::path path = tmp / name;
  write_checkpoint(path, p.finish(), {{storage_key, storage_bytes}});
  return path;
}

}  // namespace

TEST_CASE("torch checkpoint: malformed files are refused with a message naming the problem") {
  TempDir tmp("malformed");
  const std::string four_floats = bytes_of(std::vector<float>{1, 2, 3, 4});

  SUBCASE("not a checkpoint at all") {
    const fs::path text = tmp / "notes.model";
    write_file(text, "these are not the weights you are looking for\n");
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(text), Contains("is not a zip archive"), Error);
    CHECK_FALSE(io::is_torch_zip_checkpoint(text));
    const fs::path empty = tmp / "empty.model";
    write_file(empty, "");
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(empty), Contains("the file is empty"), Error);
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(tmp / "absent.model"), Contains("does not exist"), Error);
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(tmp.dir), Contains("not a file"), Error);
    const fs::path legacy = tmp / "legacy.model";
    write_file(legacy, std::string("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.", 15));
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(legacy), Contains("legacy format"), Error);
  }
  SUBCASE("a truncated archive") {
    auto [pickle, storages] = strided_fixture();
    const fs::path good = tmp / "good.model";
    write_checkpoint(good, pickle, storages);
    const std::string bytes = read_file(good);
    const fs::path cut = tmp / "cut.model";
    write_file(cut, std::string_view(bytes).substr(0, bytes.size() / 2));
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(cut), Contains(cut.string().c_str()), Error);
    CHECK_FALSE(io::is_torch_zip_checkpoint(cut));
  }
  SUBCASE("a damaged storage fails its CRC") {
    const fs::path path = one_tensor(tmp, "crc.model", "FloatStorage", 4, 0, {4}, {1}, four_floats);
    std::string bytes = read_file(path);
    const std::size_t at = bytes.find(four_floats);
    REQUIRE(at != std::string::npos);
    bytes[at + 5] ^= 0x10;
    write_file(path, bytes);
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(path), Contains("CRC"), Error);
  }
  SUBCASE("no data.pkl, or two") {
    const fs::path none = tmp / "none.model";
    write_zip(none, {{"archive/version", "3\n"}, {"archive/data/0", four_floats}});
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(none), Contains("no '<archive>/data.pkl'"), Error);
    CHECK_FALSE(io::is_torch_zip_checkpoint(none));
    const std::string pickle = PickleWriter().op('}').finish();
    const fs::path two = tmp / "two.model";
    write_zip(two, {{"a/data.pkl", pickle}, {"b/data.pkl", pickle}});
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(two), Contains("2 data.pkl entries"), Error);
  }
  SUBCASE("a storage entry is missing") {
    const fs::path path = one_tensor(tmp, "missing.model", "FloatStorage", 4, 0, {4}, {1}, four_floats, "7");
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(path), Contains("has no entry 'archive/data/0'"), Error);
  }
  SUBCASE("a tensor reaches beyond its storage") {
    const fs::path big = one_tensor(tmp, "extent.model", "FloatStorage", 4, 0, {5}, {1}, four_floats);
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(big), Contains("reaches element 4 of a storage of 4 elements"),
                         Error);
    // Offset and strides count: 2 + (2-1)*1 + (2-1)*1 = 4 is one past the end...
    const fs::path off = one_tensor(tmp, "offset.model", "FloatStorage", 4, 2, {2, 2}, {1, 1}, four_floats);
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(off), Contains("(offset 2, sizes [2, 2], strides [1, 1]) reaches "
                                                                  "element 4"), Error);
    // ...while 1 + 1 + 1 = 3 is the last element: an overlapping view, read as such.
    const fs::path fits = one_tensor(tmp, "fits.model", "FloatStorage", 4, 1, {2, 2}, {1, 1}, four_floats);
    CHECK(io::load_torch_state_dict(fits).at(0).second.to_vector<float>() == std::vector<float>{2, 3, 3, 4});
  }
  SUBCASE("storage sizes, types and ranks that do not fit") {
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(one_tensor(tmp, "size.model", "FloatStorage", 6, 0, {4}, {1},
                                                              four_floats)),
                         Contains("declares 6 elements of FloatStorage (24 bytes) but entry 'archive/data/0' holds 16"),
                         Error);
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(one_tensor(tmp, "short.model", "ShortStorage", 8, 0, {8}, {1},
                                                              four_floats)),
                         Contains("torch.ShortStorage"), Error);
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(one_tensor(tmp, "rank.model", "FloatStorage", 4, 0,
                                                              {1, 1, 1, 1, 1, 4}, {4, 4, 4, 4, 4, 1}, four_floats)),
                         Contains("rank 6"), Error);
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(one_tensor(tmp, "expand.model", "FloatStorage", 4, 0, {3, 4},
                                                              {0, 1}, four_floats)),
                         Contains("expanded view"), Error);
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(one_tensor(tmp, "overflow.model", "FloatStorage", 4, 0,
                                                              {std::int64_t{1} << 40, std::int64_t{1} << 40}, {1, 1},
                                                              four_floats)),
                         Contains("overflows"), Error);
  }
  SUBCASE("the pickle is not a state dict") {
    PickleWriter p;
    p.op('}').mark().str("epoch").integer(3).str("state_dict").op('}').str("w").integer(5).op('s').op('u');
    const fs::path notensor = tmp / "notensor.model";
    write_checkpoint(notensor, p.finish(), {});
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(notensor), Contains("entry 'w' is a int, not a tensor"), Error);
    PickleWriter q;
    q.op('}').mark().str("epoch").integer(3).str("model").op('}').op('u');
    const fs::path noweights = tmp / "noweights.model";
    write_checkpoint(noweights, q.finish(), {});
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(noweights), Contains("keys ['epoch', 'model']"), Error);
    const fs::path list = tmp / "list.model";
    write_checkpoint(list, PickleWriter().op(']').finish(), {});
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(list), Contains("holds a list, expected a dict"), Error);
  }
  SUBCASE("a big-endian archive") {
    PickleWriter p;
    p.op('}');
    const fs::path path = tmp / "big_endian.model";
    write_zip(path, {{"archive/data.pkl", p.finish()}, {"archive/byteorder", "big"}});
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(path), Contains("byte order 'big'"), Error);
  }
  SUBCASE("a pickle that would run code, inside a checkpoint") {
    PickleWriter p;
    p.global("os", "system").str("echo pwned > /tmp/stunet_pwned").op('\x85').op('R');
    const fs::path path = tmp / "evil.model";
    write_checkpoint(path, p.finish(), {});
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(path), Contains("refusing pickle global 'os system'"), Error);
    CHECK_THROWS_WITH_AS(io::load_torch_state_dict(path), Contains(path.string().c_str()), Error);
    CHECK_FALSE(fs::exists("/tmp/stunet_pwned"));
  }
}

TEST_CASE("pickle: globals outside the allowlist and unknown opcodes are refused before anything runs") {
  const std::vector<std::pair<std::string, std::string>> forbidden = {
      {"os", "system"},      {"posix", "system"},       {"builtins", "eval"},
      {"builtins", "getattr"}, {"subprocess", "Popen"}, {"torch", "load"},
      {"torch._utils", "_rebuild_tensor"}, {"numpy.core.multiarray", "_reconstruct"},
      {"collections", "defaultdict"}};
  for (const auto& [module, name] : forbidden) {
    CAPTURE(module);
    CAPTURE(name);
    const std::string expected = "refusing pickle global '" + module + " " + name + "'";
    CHECK_THROWS_WITH_AS(unpickle(PickleWriter().global(module, name).str("x").op('\x85').op('R').finish()),
                         Contains(expected.c_str()), Error);
    // STACK_GLOBAL (protocol 4) names the same thing from two strings.
    CHECK_THROWS_WITH_AS(unpickle(PickleWriter().str(module).str(name).op('\x93').finish()),
                         Contains(expected.c_str()), Error);
  }
  // Control bytes in a global name are escaped, not printed raw.
  CHECK_THROWS_WITH_AS(unpickle(PickleWriter().global("os\x1b[2J", "system").finish()),
                       Contains("'os\\x1b[2J system'"), Error);
  // Opcodes outside torch.save's vocabulary, refused by name.
  for (auto [bytes, opname] : std::vector<std::pair<std::string, std::string>>{
           {"(cos\nsystem\nS'ls'\no.", "GLOBAL"},  // protocol 0 text forms: refused at the first of them
           {"\x80\x02(i__builtin__\nobject\n.", "INST"},
           {"\x80\x02I42\n.", "INT"},
           {"\x80\x02S'x'\n.", "STRING"},
           {"\x80\x02\x82\x01.", "EXT1"},
           {"\x80\x02\x8f.", "EMPTY_SET"},
           {"\x80\x02N2.", "DUP"},
           {"\x80\x02P0\n.", "PERSID"},
           {std::string("\x80\x02\xff.", 4), "unknown"}}) {
    CAPTURE(opname);
    if (opname == "GLOBAL") {
      CHECK_THROWS_WITH_AS(unpickle(bytes), Contains("refusing pickle global 'os system'"), Error);
      continue;
    }
    CHECK_THROWS_WITH_AS(unpickle(bytes), Contains("unsupported pickle opcode"), Error);
    CHECK_THROWS_WITH_AS(unpickle(bytes), Contains(("opcode " + opname).c_str()), Error);
  }
  // Allowed globals are only called in the way torch uses them.
  CHECK_THROWS_WITH_AS(unpickle(PickleWriter().str("os").op(')').op('R').finish()), Contains("REDUCE on a str"), Error);
  CHECK_THROWS_WITH_AS(unpickle(PickleWriter().global("torch", "FloatStorage").op(')').op('R').finish()),
                       Contains("cannot be called"), Error);
  CHECK_THROWS_WITH_AS(unpickle(PickleWriter().global("torch", "FloatStorage").op(')').op('\x81').finish()),
                       Contains("NEWOBJ of a global 'torch FloatStorage'"), Error);
  CHECK_THROWS_WITH_AS(unpickle(PickleWriter().global("collections", "OrderedDict").str("x").op('\x85').op('R')
                                    .finish()),
                       Contains("called with 1 arguments"), Error);
  CHECK_THROWS_WITH_AS(unpickle(PickleWriter().op(']').op('}').op('b').finish()), Contains("BUILD on a list"), Error);
  CHECK_THROWS_WITH_AS(unpickle(PickleWriter().str("file").op('\x85').op('Q').finish()),
                       Contains("persistent id"), Error);
  CHECK_THROWS_WITH_AS(unpickle(PickleWriter()
                                    .global("_codecs", "encode").str("x").str("rot13").op('\x86').op('R').finish()),
                       Contains("encoding 'rot13'"), Error);
  CHECK_THROWS_WITH_AS(unpickle(PickleWriter().global("numpy", "dtype").str("O8").op('\x85').op('R').finish()),
                       Contains("numpy dtype 'O8'"), Error);
  // A tensor needs a storage, non-negative sizes and as many strides as sizes.
  CHECK_THROWS_WITH_AS(unpickle(PickleWriter()
                                    .global("torch._utils", "_rebuild_tensor_v2")
                                    .mark().str("s").integer(0).int_tuple({1}).int_tuple({1}).boolean(false)
                                    .ordered_dict().op('t').op('R').finish()),
                       Contains("argument 0"), Error);
}

TEST_CASE("pickle: malformed streams raise stunet::Error, well-formed ones give Python's values") {
  auto bad = [](const std::string& bytes, const std::string& message) {
    CAPTURE(message);
    CHECK_THROWS_WITH_AS(unpickle(bytes), Contains(message.c_str()), Error);
  };
  bad(std::string(), "no STOP");
  bad("\x80\x02}", "no STOP");
  bad(std::string("\x80\x02X\x10\x00\x00\x00" "ab.", 10), "needs 16 more bytes");
  bad(std::string("\x80\x02X\xff\xff\xff\xff.", 8), "needs 4294967295 more bytes");
  bad("\x80\x02K", "needs 1 more bytes");
  bad("\x80\x02G\x01\x02.", "needs 8 more bytes");
  bad("\x80\x02" "cos", "unterminated GLOBAL");
  bad("\x80\x02" "a.", "stack underflow");
  bad("\x80\x02.", "stack underflow");
  bad("\x80\x02(.", "stack underflow");  // STOP cannot take what lies below a mark
  bad("\x80\x02h\x05.", "memo entry 5 is not defined");
  bad("\x80\x02q\x00."s, "stack underflow");
  bad("\x80\x02Nt.", "no MARK");
  bad("\x80\x02}(Nu.", "odd number of items");
  bad("\x80\x02}]Ns.", "dict key of type list");
  bad("\x80\x02N.N", "trailing data");
  bad("\x80\x09N.", "protocol 9");
  bad("\x80\x02\x8a\x09" "123456789.", "does not fit in 64 bits");
  bad("\x80\x02)Na.", "APPEND target is a tuple");
  bad("\x80\x02]q\x00h\x00" "a."s, "contains itself");
  bad("\x80\x02" "]q\x00\x85q\x01h\x00h\x01" "a0h\x01."s, "contains itself");  // through a tuple

  // Python ignores what is left below the result; so do we.
  CHECK(unpickle("\x80\x02NK\x07.")->as_int() == 7);
  // A cycle that is not part of the result is simply dropped (and freed).
  CHECK(unpickle("\x80\x02]q\x00h\x00" "a0N."s)->is_none());

  // Values as Python reads them.
  PickleWriter w;
  w.op('}').mark();
  w.str("neg").integer(-2);
  w.str("big").integer(std::int64_t{1} << 40);
  w.str("min").raw(std::string("\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80", 10));
  w.str("long1").raw(std::string("\x8a\x02\xff\x7f", 4));  // 32767
  w.str("longneg").raw(std::string("\x8a\x01\xff", 3));    // -1
  w.str("float").floating(-0.1);
  w.str("short").raw(std::string("\x8c\x02hi", 4));
  w.str("bytes").raw(std::string("C\x03\x00\x01\x02", 5));
  w.str("py2str").raw(std::string("U\x02ok", 4));
  w.str("ints").op('}').integer(7).str("seven").op('s').raw("\x88").str("true-as-1").op('s');
  w.str("replaced").integer(1).str("replaced").integer(2);
  w.str("memo").op(']').raw("\x94").op('0').raw(std::string("j\x00\x00\x00\x00", 5));
  w.str("popmark").mark().integer(1).integer(2).op('1').none();
  w.op('u');
  auto v = unpickle(w.finish());
  const pk::Dict& d = v->as_dict();
  CHECK_FALSE(d.ordered);
  CHECK(d.get("neg")->as_int() == -2);
  CHECK(d.get("big")->as_int() == std::int64_t{1} << 40);
  CHECK(d.get("min")->as_int() == INT64_MIN);
  CHECK(d.get("long1")->as_int() == 32767);
  CHECK(d.get("longneg")->as_int() == -1);
  CHECK(d.get("float")->as_float() == -0.1);
  CHECK(d.get("short")->as_string() == "hi");
  CHECK(d.get("bytes")->as_bytes() == std::string("\x00\x01\x02", 3));
  CHECK(d.get("py2str")->as_string() == "ok");
  CHECK(d.get("ints")->as_dict().get(std::int64_t{7})->as_string() == "seven");
  CHECK(d.get("ints")->as_dict().get(std::int64_t{1})->as_string() == "true-as-1");
  CHECK(d.get("replaced")->as_int() == 2);
  CHECK(d.items()[10].first == pk::DictKey(std::string("replaced")));  // keeps its first position
  CHECK(d.get("memo")->as_list().empty());
  CHECK(d.get("popmark")->is_none());
  CHECK(d.size() == 13);
  CHECK_THROWS_WITH_AS(d.get("neg")->as_string(), Contains("expected a str value, found a int"), Error);

  // Nesting a million deep neither recurses in the reader nor in the
  // destructor.
  std::string deep = "\x80\x02N";
  deep.append(1'000'000, '\x85');
  deep += '.';
  auto nested = unpickle(deep);
  CHECK(nested->as_tuple().size() == 1);
}

// ---------------------------------------------------------------------------
// Robustness sweep
// ---------------------------------------------------------------------------

namespace {

/// Runs f; returns 0 on success, 1 on stunet::Error, and records any other
/// exception as a failure.
template <class F> int outcome(F&& f, const std::string& label) {
  try {
    f();
    return 0;
  } catch (const Error&) {
    return 1;
  } catch (const std::exception& e) {
    FAIL_CHECK(label << ": threw a non-stunet exception: " << e.what());
    return 2;
  }
}

}  // namespace

TEST_CASE("pickle and checkpoint: truncated and bit-flipped inputs only ever raise stunet::Error") {
  TempDir tmp("fuzz");
  std::string pickle;
  Entries storages;
  std::string source;
  const fs::path shared = testing::shared_dir();
  fs::path golden;
  if (!shared.empty()) {
    golden = shared / "golden" / "stunet_tiny_nnunet_v1.model";
    io::ZipReader z(golden);
    pickle = z.read("stunet_tiny_nnunet_v1/data.pkl", 1 << 20);
    source = "golden data.pkl";
  } else {
    MESSAGE("../shared is absent: sweeping the hand-built fixture only");
    std::tie(pickle, storages) = strided_fixture();
    source = "fixture data.pkl";
  }
  REQUIRE_NOTHROW(unpickle(pickle));

  // Every strict prefix lacks the final STOP: each must be refused.
  int refused = 0, tried = 0;
  for (std::size_t len = 0; len < pickle.size(); len += (len < 256 || len + 32 > pickle.size()) ? 1 : 127) {
    ++tried;
    refused += outcome([&] { unpickle(pickle.substr(0, len)); }, fmt::format("{} cut at {}", source, len)) == 1;
  }
  CHECK(refused == tried);

  // Random byte changes: success or stunet::Error, never anything else.
  std::mt19937_64 rng(20240607);
  for (int i = 0; i < 1000; ++i) {
    std::string m = pickle;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) m[rng() % m.size()] = static_cast<char>(rng() & 0xff);
    outcome([&] { unpickle(m); }, fmt::format("{} mutation {}", source, i));
  }

  // The whole pipeline on a small checkpoint: mutated pickles reach the
  // storage bounds checks with odd offsets, sizes and strides.
  auto [small_pickle, small_storages] = strided_fixture();
  const fs::path path = tmp / "mutant.model";
  int loaded = 0;
  for (int i = 0; i < 300; ++i) {
    std::string m = small_pickle;
    m[rng() % m.size()] = static_cast<char>(rng() & 0xff);
    write_checkpoint(path, m, small_storages);
    loaded += outcome([&] { io::load_torch_state_dict(path); }, fmt::format("checkpoint mutation {}", i)) == 0;
  }
  CHECK(loaded > 0);  // some mutations are harmless (a key's letter), so the loop did reach success

  // And the zip container itself: flipped bytes in headers, directory and data.
  write_checkpoint(path, small_pickle, small_storages);
  const std::string zip_bytes = read_file(path);
  for (int i = 0; i < 300; ++i) {
    std::string m = zip_bytes;
    m[rng() % m.size()] = static_cast<char>(rng() & 0xff);
    write_file(path, m);
    outcome([&] { io::load_torch_state_dict(path); }, fmt::format("zip mutation {}", i));
  }
  for (std::size_t len = 0; len < zip_bytes.size(); len += 7) {
    write_file(path, std::string_view(zip_bytes).substr(0, len));
    CHECK(outcome([&] { io::load_torch_state_dict(path); }, fmt::format("zip cut at {}", len)) == 1);
  }
}

TEST_CASE("convert: the golden .model round-trips to safetensors equal to the reference weights") {
  const fs::path shared = testing::shared_dir();
  if (shared.empty()) {
    MESSAGE("skipping: ../shared is absent");
    return;
  }
  const fs::path out = fs::temp_directory_path() / "stunet_convert_roundtrip.safetensors";
  const std::size_t n = io::convert_to_safetensors(shared / "golden" / "stunet_tiny_nnunet_v1.model", out);
  auto converted = io::read_safetensors(out);
  auto ref = io::read_safetensors(shared / "golden" / "stunet_tiny.safetensors");
  CHECK(converted.tensors.size() == n);
  CHECK(converted.metadata.at("source") == "stunet_tiny_nnunet_v1.model");
  for (const auto& [key, t] : converted.tensors) {
    CAPTURE(key);
    const Tensor& r = ref.at(key);
    REQUIRE(t.shape() == r.shape());
    CHECK(std::memcmp(t.raw_data(), r.raw_data(), r.nbytes()) == 0);
  }
  // A second conversion of the converted file is the identity.
  const fs::path again = fs::temp_directory_path() / "stunet_convert_roundtrip2.safetensors";
  io::convert_to_safetensors(out, again);
  CHECK(io::read_safetensors(again).tensors.size() == n);
  fs::remove(out);
  fs::remove(again);
  CHECK_THROWS_WITH_AS(io::load_state_dict_file(shared / "golden" / "missing.pth"), doctest::Contains("does not exist"),
                       Error);
}
