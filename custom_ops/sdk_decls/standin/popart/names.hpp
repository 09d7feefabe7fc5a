// Stand-in declarations, not Graphcore code: written for ipu_norm, declaring only what
// custom_ops/proxy_stats_popart.cpp uses, with the signatures of the SDK 3.4.0 release, so that the op
// compiles structurally (g++ -fsyntax-only) where no SDK or popart source exists. Never linked. The
// check against the real public headers is tests/test_custom_op_cpp.py (see custom_ops/sdk_decls/README.md).
#ifndef IPU_NORM_STANDIN_POPART_NAMES_HPP
#define IPU_NORM_STANDIN_POPART_NAMES_HPP

#include <cstdint>
#include <string>
#include <vector>

namespace popart {

using Shape = std::vector<int64_t>;
using Rank = int;
using TensorId = std::string;
using OpDomain = std::string;
using OpType = std::string;
using OpVersion = unsigned;
using InIndex = int;
using OutIndex = int;

// Accepted input counts of an operator (min, max).
struct NumInputs {
  int min;
  int max;
  NumInputs();
  NumInputs(int n);
  NumInputs(int minInputs, int maxInputs);
};

// domain.type:version (as ONNX), with the operator's input and output counts.
struct OperatorIdentifier {
  OperatorIdentifier(const OpDomain &domain, const OpType &type, OpVersion version, NumInputs inputs = {},
                     int outputs = 0);
  OpDomain domain;
  OpType type;
  OpVersion version;
  NumInputs numInputs;
  int numOutputs;
  bool operator==(const OperatorIdentifier &rhs) const;
  bool operator!=(const OperatorIdentifier &rhs) const;
  bool operator<(const OperatorIdentifier &rhs) const;
};

struct OperatorIdentifierLess {
  bool operator()(const OperatorIdentifier &lhs, const OperatorIdentifier &rhs) const;
};

} // namespace popart

#endif
