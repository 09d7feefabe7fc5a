// Stand-in declarations, not Graphcore code: written for ipu_norm, declaring only what
// custom_ops/proxy_stats_popart.cpp uses, with the signatures of the SDK 3.4.0 release, so that the op
// compiles structurally (g++ -fsyntax-only) where no SDK or popart source exists. Never linked. The
// check against the real public headers is tests/test_custom_op_cpp.py (see custom_ops/sdk_decls/README.md).
#ifndef IPU_NORM_STANDIN_POPART_POPX_OPXMANAGER_HPP
#define IPU_NORM_STANDIN_POPART_POPX_OPXMANAGER_HPP

#include <vector>

#include <popart/names.hpp>

namespace popart {
namespace popx {

// A static instance registers OPX as the lowering of opid when the library is loaded.
template <class OPX> class OpxCreator {
public:
  OpxCreator(const OperatorIdentifier &opid);
  OpxCreator(const std::vector<OperatorIdentifier> &opids);
};

} // namespace popx
} // namespace popart

#endif
