// Stand-in declarations, not Graphcore code: written for ipu_norm, declaring only what
// custom_ops/proxy_stats_popart.cpp uses, with the signatures of the SDK 3.4.0 release, so that the op
// compiles structurally (g++ -fsyntax-only) where no SDK or popart source exists. Never linked. The
// check against the real public headers is tests/test_custom_op_cpp.py (see custom_ops/sdk_decls/README.md).
#ifndef IPU_NORM_STANDIN_POPART_ERROR_HPP
#define IPU_NORM_STANDIN_POPART_ERROR_HPP

#include <stdexcept>
#include <string>

namespace popart {

// PopART's exception; the message is a "{}" format string and its arguments.
class error : public std::runtime_error {
public:
  template <typename... Args> explicit error(const char *format, const Args &...args);
  template <typename... Args> explicit error(const std::string &format, const Args &...args);
};

} // namespace popart

#endif
