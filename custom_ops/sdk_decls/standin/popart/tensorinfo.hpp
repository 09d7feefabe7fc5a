// Stand-in declarations, not Graphcore code: written for ipu_norm, declaring only what
// custom_ops/proxy_stats_popart.cpp uses, with the signatures of the SDK 3.4.0 release, so that the op
// compiles structurally (g++ -fsyntax-only) where no SDK or popart source exists. Never linked. The
// check against the real public headers is tests/test_custom_op_cpp.py (see custom_ops/sdk_decls/README.md).
#ifndef IPU_NORM_STANDIN_POPART_TENSORINFO_HPP
#define IPU_NORM_STANDIN_POPART_TENSORINFO_HPP

#include <popart/error.hpp>
#include <popart/names.hpp>

namespace popart {

// The data types an op declares (the subset of PopART's that matters here).
enum class DataType { UINT8 = 0, INT8, UINT16, INT16, INT32, INT64, UINT32, UINT64, BOOL, FLOAT, FLOAT16, UNDEFINED };

// Data type and shape of an IR tensor.
class TensorInfo {
public:
  TensorInfo() = default;
  TensorInfo(DataType dataType, const Shape &shape);
  const Shape &shape() const;
  Rank rank() const;
  DataType dataType() const;
  int64_t nelms() const;
};

} // namespace popart

#endif
