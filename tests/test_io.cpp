// safetensors: round trips of every dtype, the golden file, and every way a
// file can be malformed.
#include <cstring>
#include <fstream>

#include "testing.hpp"
#include "stunet/io/safetensors.hpp"

using namespace stunet;
using doctest::Contains;
namespace fs = std::filesystem;

namespace {

fs::path temp_path(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / "stunet_test_io";
  fs::create_directories(dir);
  return dir / name;
}

/// Writes an 8-byte length, the header text and `data_bytes` zero bytes.
fs::path write_raw(const std::string& name, const std::string& header, std::size_t data_bytes,
                   std::uint64_t declared_len = ~0ull) {
  fs::path p = temp_path(name);
  std::ofstream out(p, std::ios::binary);
  std::uint64_t len = declared_len == ~0ull ? header.size() : declared_len;
  out.write(reinterpret_cast<const char*>(&len), 8);
  out << header;
  std::string zeros(data_bytes, '\0');
  out << zeros;
  return p;
}

}  // namespace

TEST_CASE("safetensors: every dtype round-trips bit-exactly, with metadata") {
  std::vector<std::pair<std::string, Tensor>> ts;
  std::uint64_t seed = 1;
  for (DType d : {DType::f32, DType::f64, DType::f16, DType::bf16, DType::i64, DType::i32, DType::u8})
    ts.emplace_back(std::string("t.") + std::string(dtype_name(d)), testing::random_tensor({2, 3, 5}, d, seed++, 0, 100));
  ts.emplace_back("scalar", Tensor::full({}, 4.5));
  ts.emplace_back("empty", Tensor::zeros({0, 3}));
  // A non-contiguous view is written as its dense contents.
  Tensor big = testing::random_tensor({4, 6}, DType::f32, 9);
  ts.emplace_back("view", big.box({1, 2}, {2, 3}));
  fs::path p = temp_path("roundtrip.safetensors");
  io::write_safetensors(p, ts, {{"format", "pt"}, {"note", "x"}});
  auto f = io::read_safetensors(p);
  REQUIRE(f.tensors.size() == ts.size());
  CHECK(f.metadata.at("format") == "pt");
  for (const auto& [key, t] : ts) {
    CAPTURE(key);
    const Tensor& r = f.at(key);
    CHECK(r.dtype() == t.dtype());
    CHECK(r.shape() == t.shape());
    Tensor dense = t.contiguous();
    // memcmp needs non-null pointers even for 0 bytes; empty tensors have no storage.
    if (dense.nbytes() > 0) CHECK(std::memcmp(r.raw_data(), dense.raw_data(), dense.nbytes()) == 0);
  }
  CHECK_THROWS_WITH_AS(f.at("missing"), Contains("missing"), Error);
  CHECK_THROWS_WITH_AS(io::write_safetensors(p, {{"a", big}, {"a", big}}), Contains("'a'"), Error);
}

TEST_CASE("safetensors: the golden file reads with the shapes PyTorch wrote") {
  fs::path dir = testing::shared_dir();
  if (dir.empty()) {
    MESSAGE("skipping: ../shared is absent (it holds the golden files)");
    return;
  }
  auto f = io::read_safetensors(dir / "golden" / "stunet_tiny.safetensors");
  CHECK(f.tensors.size() == 273);
  CHECK(f.at("output.0").shape() == Shape{1, 3, 64, 64, 64});
  CHECK(f.at("target.4").dtype() == DType::i64);
  CHECK(f.at("conv_blocks_context.0.0.conv1.weight").shape() == Shape{4, 1, 3, 3, 3});
  CHECK(f.metadata.count("config") == 1);
}

TEST_CASE("safetensors: malformed files raise an Error naming the problem") {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  CHECK_NOTHROW(io::read_safetensors(write_raw("ok.st", ok, 8)));
  CHECK_THROWS_WITH_AS(io::read_safetensors(temp_path("does_not_exist.st")), Contains("cannot open"), Error);
  {
    fs::path p = temp_path("short.st");
    std::ofstream(p, std::ios::binary) << "abc";
    CHECK_THROWS_WITH_AS(io::read_safetensors(p), Contains("3 bytes"), Error);
  }
  CHECK_THROWS_WITH_AS(io::read_safetensors(write_raw("hugelen.st", ok, 8, 1ull << 60)), Contains("header of"), Error);
  CHECK_THROWS_WITH_AS(io::read_safetensors(write_raw("truncated.st", ok, 4)), Contains("truncated"), Error);
  CHECK_THROWS_WITH_AS(io::read_safetensors(write_raw("notjson.st", "{not json", 0)), Contains("JSON"), Error);
  CHECK_THROWS_WITH_AS(io::read_safetensors(write_raw("nobrace.st", "[1,2]", 0)), Contains("'{'"), Error);
  CHECK_THROWS_WITH_AS(
      io::read_safetensors(write_raw("dtype.st", R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", 8)),
      Contains("'a' has unsupported dtype"), Error);
  CHECK_THROWS_WITH_AS(
      io::read_safetensors(write_raw("size.st", R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)),
      Contains("needs 12 bytes"), Error);
  CHECK_THROWS_WITH_AS(io::read_safetensors(write_raw(
                           "overlap.st",
                           R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                           12)),
                       Contains("overlap"), Error);
  CHECK_THROWS_WITH_AS(io::read_safetensors(write_raw(
                           "hole.st",
                           R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                           12)),
                       Contains("hole"), Error);
  CHECK_THROWS_WITH_AS(
      io::read_safetensors(write_raw("tail.st", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 12)),
      Contains("cover 4 bytes"), Error);
  CHECK_THROWS_WITH_AS(
      io::read_safetensors(write_raw("absurd.st",
                                     R"({"a":{"dtype":"F32","shape":[100000,100000,100000],"data_offsets":[0,8]}})", 8)),
      Contains("larger than"), Error);
  CHECK_THROWS_WITH_AS(
      io::read_safetensors(write_raw("negative.st", R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8)),
      Contains("bad extent"), Error);
  CHECK_THROWS_WITH_AS(io::read_safetensors(write_raw("fields.st", R"({"a":{"dtype":"F32"}})", 0)),
                       Contains("needs dtype, shape and data_offsets"), Error);
  CHECK_THROWS_WITH_AS(io::read_safetensors(write_raw("meta.st", R"({"__metadata__":{"k":3}})", 0)),
                       Contains("metadata value 'k'"), Error);
}
