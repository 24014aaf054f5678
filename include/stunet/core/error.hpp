#pragma once
/// \file
/// stunet::Error and STUNET_CHECK: the one way library code reports a problem.
///
/// Library code never exits or aborts: a researcher embedding the headers must
/// be able to catch a bad file or a shape mismatch and carry on.

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace stunet {

/// Thrown for every user-visible failure: bad arguments, shape or dtype
/// mismatches, malformed files, device errors. what() names the failed
/// condition, the source location and the offending values.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
[[noreturn]] inline void throw_error(const char* expr, const char* file, int line,
                                     const std::string& message) {
  throw Error(fmt::format("{} ({}:{}, check `{}` failed)", message, file, line, expr));
}
}  // namespace detail

}  // namespace stunet

/// STUNET_CHECK(cond, "format {}", args...): throws stunet::Error with the
/// formatted message, the failed expression and file:line when cond is false.
#define STUNET_CHECK(cond, ...)                                                      \
  do {                                                                               \
    if (!(cond)) [[unlikely]]                                                        \
      ::stunet::detail::throw_error(#cond, __FILE__, __LINE__, ::fmt::format(__VA_ARGS__)); \
  } while (0)

/// STUNET_FAIL("format {}", args...): unconditional throw (unreachable branches,
/// unsupported dtypes in a dispatch).
#define STUNET_FAIL(...) \
  ::stunet::detail::throw_error("unreachable", __FILE__, __LINE__, ::fmt::format(__VA_ARGS__))
