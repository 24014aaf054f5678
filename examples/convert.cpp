// stunet-convert: turns an official STU-Net checkpoint (an nnU-Net v1
// .model, an nnU-Net v2 .pth, or any torch.save'd state dict) into a
// float32 safetensors file with the same keys, without Python or PyTorch.
//
//   stunet-convert base_ep8k.model stunet_base.safetensors
//   stunet-convert --list checkpoint_final.pth
//
// Floating-point weights (float16/bfloat16/float64 included) are written as
// float32, the compute type of the CPU ops; integer tensors (counters such
// as num_batches_tracked) keep their type, since a float counter would be
// wrong rather than converted. A .safetensors input is accepted too, which
// normalises its floats to float32 the same way.
//
// Any failure prints one line, "stunet-convert: <message>", to stderr and
// exits 1: the message names the file, the tensor and the numbers.

// This program links libzip by construction (CMake builds it only where
// libzip is found): opt in to the checkpoint reader.
#ifndef STUNET_WITH_LIBZIP
#define STUNET_WITH_LIBZIP 1
#endif

#include <algorithm>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include <stunet/io/weights.hpp>

namespace {

/// The tensors of `in`: a torch.save archive, else a safetensors file by
/// its extension, else the torch reader again, whose errors say what the
/// file is not (legacy format, not a zip, ...).
void report(const char* message) {
  std::string line = message;
  std::replace(line.begin(), line.end(), '\n', ' ');
  std::fprintf(stderr, "stunet-convert: %s\n", line.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Converts an STU-Net / nnU-Net PyTorch checkpoint (.model, .pth) or a .safetensors file to float32 "
               "safetensors with the same keys. No Python needed: the pickle is read by a restricted reader that "
               "never runs code.",
               "stunet-convert"};
  std::string in, out;
  bool list = false, quiet = false;
  app.add_option("IN", in, "input checkpoint: nnU-Net v1 .model, v2 .pth, a torch.save'd state dict, or .safetensors")
      ->required();
  app.add_option("OUT", out, "output .safetensors file (written to OUT.tmp, then renamed)");
  app.add_flag("-l,--list", list, "print key, dtype and shape of every tensor instead of converting");
  app.add_flag("-q,--quiet", quiet, "print nothing on success");
  CLI11_PARSE(app, argc, argv);
  if (!list && out.empty()) return app.exit(CLI::RequiredError("OUT (or --list)"));

  try {
    if (list) {
      for (const auto& [key, t] : stunet::io::load_state_dict_file(in))
        std::printf("%s\t%s\t%s\n", key.c_str(), std::string(stunet::dtype_name(t.dtype())).c_str(),
                    fmt::format("{}", t.shape()).c_str());
      return 0;
    }
    const std::size_t n = stunet::io::convert_to_safetensors(in, out);
    if (!quiet) std::printf("stunet-convert: wrote %zu tensors to %s\n", n, out.c_str());
    return 0;
  } catch (const stunet::Error& e) {
    report(e.what());
  } catch (const std::exception& e) {  // out of memory, filesystem errors
    report(e.what());
  }
  return 1;
}
