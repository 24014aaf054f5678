#pragma once
/// \file
/// One entry point for every weight file a user may hold: safetensors,
/// nnU-Net v1 `.model` and v2 `.pth` (torch.save zip archives, read without
/// Python when built with libzip: target stunet::checkpoint).

#include <filesystem>

#include "stunet/io/safetensors.hpp"
#include "stunet/nn/module.hpp"
#if defined(STUNET_WITH_LIBZIP)
#include "stunet/io/torch_checkpoint.hpp"
#endif

namespace stunet::io {

/// The state_dict stored in `path`, whatever its format (official keys,
/// 'module.' prefixes stripped, saved dtypes kept).
inline nn::StateDict load_state_dict_file(const std::filesystem::path& path) {
  STUNET_CHECK(std::filesystem::exists(path), "weights file '{}' does not exist", path.string());
  if (path.extension() == ".safetensors") return read_safetensors(path).tensors;
#if defined(STUNET_WITH_LIBZIP)
  return load_torch_state_dict(path);
#else
  STUNET_FAIL("'{}': reading PyTorch checkpoints needs libzip (link stunet::checkpoint); convert it with "
              "stunet-convert or use a .safetensors file",
              path.string());
#endif
}

}  // namespace stunet::io

namespace stunet::io {

/// Writes the state_dict of `in` (any format load_state_dict_file reads) to
/// `out` as safetensors: floating tensors as float32, integer tensors as they
/// are, official keys. Returns the number of tensors written.
inline std::size_t convert_to_safetensors(const std::filesystem::path& in, const std::filesystem::path& out) {
  nn::StateDict tensors = load_state_dict_file(in);
  for (auto& [key, t] : tensors)
    if (is_floating(t.dtype()) && t.dtype() != DType::f32) t = t.to(DType::f32);
  write_safetensors(out, tensors, {{"format", "pt"}, {"source", in.filename().string()}});
  return tensors.size();
}

}  // namespace stunet::io
