// PopART custom op "ipu_norm.MicroBatchAGC" (domain "ipu_norm", version 1): Adaptive Gradient Clipping of each
// micro-batch's gradient in the backward pass (optim.agc_scope: micro_batch; docs/agc_micro_batch.md).
//
// Forward: identity on one input W (a Scaled-WS conv's weight, gain or bias; float32 or float16).
// Gradient op (MicroBatchAGCGrad): inputs dL/dW_out and W; output dL/dW = the incoming gradient clipped unit-wise
// against W (rows of W viewed as (W.shape[0], -1); the whole tensor for rank <= 1):
//   maxNorm_i = clip * max(||W_i||, eps), n_i = ||G_i|| / loss_scale,
//   G_i <- G_i * maxNorm_i / max(n_i, 1e-6) if n_i > maxNorm_i.
// Attributes: clip (float, > 0), eps (float, default 1e-3), loss_scale (float, default 1: the static loss scale
// PopART's backward carries; PopART 3.4 divides by accumulation / replication only after accumulating).
//
// PopART accumulates the op's output over the micro-batches and all-reduces it over replicas afterwards, so this
// clips each replica's micro-batch gradient, not the step's (exact AGC is not expressible in PopTorch 3.4).
// Same math as agc_micro_kernel.hpp (the host reference, tested against ipu_norm/ops/agc_micro.py): the
// `factor` expression below is agcClipFactor term for term; sums of squares are reduced in float32.
//
// Built into custom_ops.so with the Proxy Norm op (make -C custom_ops); loaded by
// ipu_norm.ops.proxy_stats_ipu.load_custom_ops before tracing.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <popart/attributes.hpp>
#include <popart/error.hpp>
#include <popart/names.hpp>
#include <popart/op.hpp>
#include <popart/opmanager.hpp>
#include <popart/opserialiser.hpp>
#include <popart/popx/opx.hpp>
#include <popart/popx/opxmanager.hpp>
#include <popart/tensorinfo.hpp>

#include <poplar/Graph.hpp>
#include <poplar/Tensor.hpp>
#include <popops/ElementWise.hpp>
#include <popops/Expr.hpp>
#include <popops/Reduce.hpp>

#include "agc_micro_kernel.hpp"

namespace {

template <typename T, typename... Args> std::unique_ptr<T> makeUniqueAgc(Args &&...args) {
  return std::unique_ptr<T>(new T(std::forward<Args>(args)...));
}

const popart::OperatorIdentifier kMicroBatchAGC = {"ipu_norm", "MicroBatchAGC", 1, {1, 1}, 1};
const popart::OperatorIdentifier kMicroBatchAGCGrad = {"ipu_norm", "MicroBatchAGCGrad", 1, {2, 2}, 1};

struct AgcAttrs {
  float clip;
  float eps;
  float lossScale;
};

// Attributes, their validation, serialisation and outlining: shared by the forward and the grad op.
class MicroBatchAGCOpBase : public popart::Op {
public:
  const AgcAttrs &attrs() const { return attrs_; }

  void appendAttributes(popart::OpSerialiserBase &os) const final {
    popart::Op::appendAttributes(os);
    appendAgcAttributes(os);
  }

  void appendOutlineAttributes(popart::OpSerialiserBase &os) const final {
    popart::Op::appendOutlineAttributes(os);
    appendAgcAttributes(os);
  }

  float getSubgraphValue() const final { return getLowSubgraphValue(); }

protected:
  MicroBatchAGCOpBase(const popart::OperatorIdentifier &opId, const AgcAttrs &attrs,
                      const popart::Op::Settings &opSettings)
      : popart::Op(opId, opSettings), attrs_(attrs) {
    if (!(attrs_.clip > 0.0f) || !(attrs_.eps > 0.0f) || !(attrs_.lossScale > 0.0f)) {
      throw popart::error("ipu_norm.MicroBatchAGC: clip, eps and loss_scale must be > 0 (got {}, {}, {})",
                          attrs_.clip, attrs_.eps, attrs_.lossScale);
    }
  }

private:
  void appendAgcAttributes(popart::OpSerialiserBase &os) const {
    os.appendAttribute("clip", attrs_.clip);
    os.appendAttribute("eps", attrs_.eps);
    os.appendAttribute("loss_scale", attrs_.lossScale);
  }

  AgcAttrs attrs_;
};

class MicroBatchAGCOp final : public MicroBatchAGCOpBase {
public:
  MicroBatchAGCOp(const popart::OperatorIdentifier &opId, const AgcAttrs &attrs,
                  const popart::Op::Settings &opSettings)
      : MicroBatchAGCOpBase(opId, attrs, opSettings) {}

  std::unique_ptr<popart::Op> clone() const final { return makeUniqueAgc<MicroBatchAGCOp>(*this); }

  void setup() final {
    const popart::DataType t = inInfo(0).dataType();
    if (t != popart::DataType::FLOAT && t != popart::DataType::FLOAT16) {
      throw popart::error("ipu_norm.MicroBatchAGC: the weight must be float32 or float16");
    }
    outInfo(0) = inInfo(0);
  }

  std::vector<std::unique_ptr<popart::Op>> getGradOps() final;
};

// Inputs: 0 gradient of the forward output, 1 the forward input W. Output 0: gradient of W.
class MicroBatchAGCGradOp final : public MicroBatchAGCOpBase {
public:
  explicit MicroBatchAGCGradOp(const MicroBatchAGCOp &fwd)
      : MicroBatchAGCOpBase(kMicroBatchAGCGrad, fwd.attrs(), fwd.getSettings()), weightInfo_(fwd.inInfo(0)) {}

  std::unique_ptr<popart::Op> clone() const final { return makeUniqueAgc<MicroBatchAGCGradOp>(*this); }

  void setup() final { outInfo(0) = weightInfo_; }

  const std::vector<popart::GradInOutMapper> &gradInputInfo() const final {
    static const std::vector<popart::GradInOutMapper> info = {{0, 0, popart::GradOpInType::GradOut},
                                                              {1, 0, popart::GradOpInType::In}};
    return info;
  }

  const std::map<int, int> &gradOutToNonGradIn() const final {
    static const std::map<int, int> info = {{0, 0}};
    return info;
  }

private:
  popart::TensorInfo weightInfo_;
};

std::vector<std::unique_ptr<popart::Op>> MicroBatchAGCOp::getGradOps() {
  std::vector<std::unique_ptr<popart::Op>> ops;
  ops.emplace_back(makeUniqueAgc<MicroBatchAGCGradOp>(*this));
  return ops;
}

const popart::OpDefinition::DataTypes kFloatOrHalf = {popart::DataType::FLOAT, popart::DataType::FLOAT16};

const popart::OpDefinition kMicroBatchAGCDef(
    popart::OpDefinition::Inputs({{"weight", kFloatOrHalf}}),
    popart::OpDefinition::Outputs({{"weight_out", kFloatOrHalf}}),
    popart::OpDefinition::Attributes({{"clip", {"*"}}, {"eps", {"*"}}, {"loss_scale", {"*"}}}));

popart::OpCreator<MicroBatchAGCOp> microBatchAGCOpCreator(
    popart::OpDefinitions({{kMicroBatchAGC, kMicroBatchAGCDef}}),
    [](const popart::OpCreatorInfo &info) -> std::unique_ptr<popart::Op> {
      AgcAttrs attrs;
      attrs.clip = info.attributes.getAttribute<popart::Attributes::Float>("clip");
      attrs.eps = info.attributes.getAttribute<popart::Attributes::Float>("eps", 1e-3f);
      attrs.lossScale = info.attributes.getAttribute<popart::Attributes::Float>("loss_scale", 1.0f);
      return makeUniqueAgc<MicroBatchAGCOp>(info.opid, attrs, info.settings);
    },
    true);

// ---------------------------------------------------------------------------------------------------
// Poplar lowering.

namespace pe = popops::expr;

// The forward is an identity; a copy keeps PopART's one-tensor-per-output rule without declaring aliases.
class MicroBatchAGCOpx : public popart::popx::Opx {
public:
  MicroBatchAGCOpx(popart::Op *op, popart::popx::Devicex *devicex) : popart::popx::Opx(op, devicex) {
    verifyOp<MicroBatchAGCOp>(op, kMicroBatchAGC);
  }

  void grow(poplar::program::Sequence &prog) const final {
    setOutTensor(0, cloneNcopy(prog, getInTensor(0), "weight_out"));
  }
};

class MicroBatchAGCGradOpx : public popart::popx::Opx {
public:
  MicroBatchAGCGradOpx(popart::Op *op, popart::popx::Devicex *devicex) : popart::popx::Opx(op, devicex) {
    verifyOp<MicroBatchAGCGradOp>(op, kMicroBatchAGCGrad);
  }

  void grow(poplar::program::Sequence &prog) const final {
    const AgcAttrs &a = getOp<MicroBatchAGCGradOp>().attrs();
    const poplar::Tensor grad = getInTensor(0);
    const poplar::Tensor weight = getInTensor(1);
    const std::size_t rows = grad.rank() >= 2 ? grad.dim(0) : 1;
    const std::size_t rowLen = grad.numElements() / rows;
    const poplar::Tensor g2 = grad.reshape({rows, rowLen});
    // Per-unit sums of squares in float32 whatever the tensors' type.
    const poplar::Tensor gsq = popops::reduce(graph(), g2, poplar::FLOAT, {1}, {popops::Operation::SQUARE_ADD}, prog,
                                              debugContext("grad_sum_sq"));
    const poplar::Tensor wsq = popops::reduce(graph(), weight.reshape({rows, rowLen}), poplar::FLOAT, {1},
                                              {popops::Operation::SQUARE_ADD}, prog, debugContext("weight_sum_sq"));
    // agcClipFactor (agc_micro_kernel.hpp), with _1 = grad sum of squares, _2 = weight sum of squares.
    const pe::Any maxNorm = pe::Mul(pe::Const(a.clip), pe::Max(pe::Sqrt(pe::_2), pe::Const(a.eps)));
    const pe::Any gradNorm = pe::Mul(pe::Sqrt(pe::_1), pe::Const(1.0f / a.lossScale));
    const pe::Any factor =
        pe::Select(pe::Divide(maxNorm, pe::Max(gradNorm, pe::Const(static_cast<float>(ipu_norm::kAgcGradNormEps)))),
                   pe::Const(1.0f), pe::Gt(gradNorm, maxNorm));
    const poplar::Tensor f = popops::map(graph(), factor, {gsq, wsq}, prog, debugContext("factor"));
    const poplar::Tensor clipped = popops::map(graph(), pe::Mul(pe::_1, pe::Cast(pe::_2, grad.elementType())),
                                               {g2, f.reshape({rows, 1})}, prog, debugContext("clipped"));
    setOutTensor(0, clipped.reshape(grad.shape()));
  }
};

popart::popx::OpxCreator<MicroBatchAGCOpx> microBatchAGCOpxCreator(kMicroBatchAGC);
popart::popx::OpxCreator<MicroBatchAGCGradOpx> microBatchAGCGradOpxCreator(kMicroBatchAGCGrad);

} // namespace
