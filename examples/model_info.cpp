// stunet-model-info: parameter counts and forward MACs of STU-Net
// configurations at a patch size (the paper's Table 2 columns), for the
// presets or any custom depth/width.
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <stunet/nn/stunet.hpp>

using namespace stunet;

int main(int argc, char** argv) {
  CLI::App app{"Prints parameters and forward multiply-accumulates (the STU-Net paper's 'FLOPs') of STU-Net "
               "configurations. Counts are computed from the architecture, no weights are allocated.",
               "stunet-model-info"};
  std::vector<std::string> names{"small", "base", "large", "huge"};
  std::vector<int> patch{128, 128, 128}, depth, dims;
  int in_channels = 1, classes = 105;
  app.add_option("-p,--preset", names, "presets to list: small base large huge (or s b l h)");
  app.add_option("--patch", patch, "patch size D H W (one value for a cube)")->expected(1, 3);
  app.add_option("--in-channels", in_channels, "input channels")->check(CLI::PositiveNumber);
  app.add_option("--classes", classes, "output classes including background")->check(CLI::PositiveNumber);
  app.add_option("--depth", depth, "custom: six residual-block counts (replaces --preset)")->expected(6);
  app.add_option("--dims", dims, "custom: six stage widths (replaces --preset)")->expected(6);
  CLI11_PARSE(app, argc, argv);
  if (patch.size() == 1) patch = {patch[0], patch[0], patch[0]};

  try {
    std::vector<std::pair<std::string, nn::STUNetConfig>> configs;
    if (!depth.empty() || !dims.empty()) {
      STUNET_CHECK(depth.size() == 6 && dims.size() == 6, "--depth and --dims are given together, six values each");
      nn::STUNetConfig c;
      for (int i = 0; i < 6; ++i) {
        c.depth[static_cast<std::size_t>(i)] = depth[static_cast<std::size_t>(i)];
        c.dims[static_cast<std::size_t>(i)] = dims[static_cast<std::size_t>(i)];
      }
      configs.emplace_back("custom", c);
    } else {
      for (const auto& n : names) configs.emplace_back(n, nn::preset(n));
    }
    std::printf("%-8s %-26s %-30s %16s %12s\n", "model", "depth", "dims", "parameters",
                fmt::format("MACs@{}x{}x{}", patch[0], patch[1], patch[2]).c_str());
    for (auto& [name, c] : configs) {
      c.in_channels = in_channels;
      c.num_classes = classes;
      nn::validate(c);
      for (int a = 0; a < 3; ++a) {
        int f = 1;
        for (const auto& p : c.pool) f *= p[static_cast<std::size_t>(a)];
        STUNET_CHECK(patch[static_cast<std::size_t>(a)] % f == 0, "patch extent {} on axis {} is not divisible by {}",
                     patch[static_cast<std::size_t>(a)], a, f);
      }
      const auto macs = nn::forward_macs(c, {patch[0], patch[1], patch[2]});
      std::printf("%-8s %-26s %-30s %16s %10.3f T\n", name.c_str(), fmt::format("{}", fmt::join(c.depth, ",")).c_str(),
                  fmt::format("{}", fmt::join(c.dims, ",")).c_str(),
                  fmt::format("{:L}", nn::parameter_count(c)).c_str(), static_cast<double>(macs) / 1e12);
    }
  } catch (const Error& e) {
    std::string line = e.what();
    std::fprintf(stderr, "stunet-model-info: %s\n", line.substr(0, line.find(" (")).c_str());
    return 1;
  }
  return 0;
}
