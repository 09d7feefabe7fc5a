// Stand-in declarations, not Graphcore code: written for ipu_norm, declaring only what
// custom_ops/proxy_stats_popart.cpp uses, with the signatures of the SDK 3.4.0 release, so that the op
// compiles structurally (g++ -fsyntax-only) where no SDK or popart source exists. Never linked. The
// check against the real public headers is tests/test_custom_op_cpp.py (see custom_ops/sdk_decls/README.md).
#ifndef IPU_NORM_STANDIN_POPART_POPX_OPX_HPP
#define IPU_NORM_STANDIN_POPART_POPX_OPX_HPP

#include <string>
#include <vector>

#include <poplar/DebugContext.hpp>
#include <poplar/Tensor.hpp>
#include <poplar/Type.hpp>
#include <popart/names.hpp>
#include <popart/op.hpp>

namespace poplar {
class Graph;
namespace program {
class Sequence;
} // namespace program
} // namespace poplar

namespace popart {
namespace popx {

class Devicex;

// Lowers one IR op to Poplar.
class Opx {
public:
  Opx(Op *op, Devicex *devicex);
  virtual ~Opx();

  virtual void grow(poplar::program::Sequence &prog) const;

  poplar::Graph &graph() const;
  const poplar::Tensor &getInTensor(InIndex index) const;
  void setOutTensor(OutIndex index, const poplar::Tensor &tensor) const;
  poplar::Tensor getConst(const poplar::Type &type, const std::vector<size_t> &shape, double val,
                          const std::string &name) const;
  // Clone the tensor and copy its contents (popart/popx/opx.hpp:104 at sdk/poplar/3.4.0).
  poplar::Tensor cloneNcopy(poplar::program::Sequence &, const poplar::Tensor &, const std::string name = "") const;
  poplar::DebugContext debugContext(const std::string name = "",
                                    poplar::SourceLocation loc = poplar::SourceLocation::Current()) const;

  // The op this Opx lowers, as its derived type (throws on a mismatch).
  template <class OP> OP &getOp() const;
  // Throws unless op is an OP with identifier opid.
  template <class OP> void verifyOp(Op *op, const OperatorIdentifier &opid);
};

} // namespace popx
} // namespace popart

#endif
