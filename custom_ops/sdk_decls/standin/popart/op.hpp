// Stand-in declarations, not Graphcore code: written for ipu_norm, declaring only what
// custom_ops/proxy_stats_popart.cpp uses, with the signatures of the SDK 3.4.0 release, so that the op
// compiles structurally (g++ -fsyntax-only) where no SDK or popart source exists. Never linked. The
// check against the real public headers is tests/test_custom_op_cpp.py (see custom_ops/sdk_decls/README.md).
#ifndef IPU_NORM_STANDIN_POPART_OP_HPP
#define IPU_NORM_STANDIN_POPART_OP_HPP

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <popart/attributes.hpp>
#include <popart/error.hpp>
#include <popart/names.hpp>
#include <popart/tensorinfo.hpp>

namespace popart {

class Graph;
class OpSerialiserBase;

// What a grad op input is, relative to the forward op.
enum class GradOpInType { In = 0, Out, GradOut };

// Grad op input iGrad is forward input/output/output-gradient iNonGrad.
class GradInOutMapper {
public:
  GradInOutMapper(InIndex iGrad, int iNonGrad, GradOpInType type);
  InIndex iGrad;
  int iNonGrad;
  GradOpInType type;
};

// An IR operation.
class Op {
public:
  // Graph, name and placement of an op (copied from the forward op into its grad op).
  struct Settings {
    Settings(Graph &graph, const std::string &name);
    Settings(const Settings &) = default;
    virtual ~Settings() = default;
    std::string name;
  };

  Op(const OperatorIdentifier &opid, const Op::Settings &settings);
  Op(const Op &other);
  virtual ~Op();

  const OperatorIdentifier opid;

  Settings &getSettings();
  const Settings &getSettings() const;
  std::string str() const;

  virtual std::unique_ptr<Op> clone() const = 0;
  virtual void setup();
  virtual std::vector<std::unique_ptr<Op>> getGradOps();
  virtual const std::vector<GradInOutMapper> &gradInputInfo() const;
  virtual const std::map<int, int> &gradOutToNonGradIn() const;
  virtual void appendAttributes(OpSerialiserBase &os) const;
  virtual void appendOutlineAttributes(OpSerialiserBase &os) const;
  virtual float getSubgraphValue() const = 0;
  float getHighSubgraphValue() const;
  float getLowSubgraphValue() const;

  TensorInfo &inInfo(InIndex index);
  const TensorInfo &inInfo(InIndex index) const;
  TensorInfo &outInfo(OutIndex index);
  const TensorInfo &outInfo(OutIndex index) const;
};

} // namespace popart

#endif
