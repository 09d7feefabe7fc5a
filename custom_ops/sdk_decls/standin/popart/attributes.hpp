// Stand-in declarations, not Graphcore code: written for ipu_norm, declaring only what
// custom_ops/proxy_stats_popart.cpp uses, with the signatures of the SDK 3.4.0 release, so that the op
// compiles structurally (g++ -fsyntax-only) where no SDK or popart source exists. Never linked. The
// check against the real public headers is tests/test_custom_op_cpp.py (see custom_ops/sdk_decls/README.md).
#ifndef IPU_NORM_STANDIN_POPART_ATTRIBUTES_HPP
#define IPU_NORM_STANDIN_POPART_ATTRIBUTES_HPP

#include <cstdint>
#include <string>
#include <vector>

#include <popart/names.hpp>

namespace popart {

// The ONNX node attributes an op is created with.
class Attributes {
public:
  using Int = int64_t;
  using Ints = std::vector<int64_t>;
  using Float = float;
  using String = std::string;
  using Strings = std::vector<std::string>;

  bool hasAttribute(const std::string &key) const;
  template <typename T> T getAttribute(const std::string &key, const T &defaultValue) const;
  template <typename T> T getAttribute(const std::string &key) const;
};

} // namespace popart

#endif
