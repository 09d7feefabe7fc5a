// Stand-in declarations, not Graphcore code: written for ipu_norm, declaring only what
// custom_ops/proxy_stats_popart.cpp uses, with the signatures of the SDK 3.4.0 release, so that the op
// compiles structurally (g++ -fsyntax-only) where no SDK or popart source exists. Never linked. The
// check against the real public headers is tests/test_custom_op_cpp.py (see custom_ops/sdk_decls/README.md).
#ifndef IPU_NORM_STANDIN_POPART_OPSERIALISER_HPP
#define IPU_NORM_STANDIN_POPART_OPSERIALISER_HPP

#include <cstdint>
#include <string>
#include <vector>

namespace popart {

// Where an op writes its attributes (for the IR dump and for outlining equality).
class OpSerialiserBase {
public:
  virtual ~OpSerialiserBase();
  void appendAttribute(const std::string &key, float value);
  void appendAttribute(const std::string &key, double value);
  void appendAttribute(const std::string &key, int value);
  void appendAttribute(const std::string &key, int64_t value);
  void appendAttribute(const std::string &key, uint32_t value);
  void appendAttribute(const std::string &key, uint64_t value);
  void appendAttribute(const std::string &key, const std::string &value);
  void appendAttribute(const std::string &key, const std::vector<int64_t> &value);
  void appendAttribute(const std::string &key, bool value);
};

} // namespace popart

#endif
