// PopART custom op "ipu_norm.ProxyStats" (domain "ipu_norm", version 1): Proxy Norm statistics on the IPU.
//
// Inputs  (all (C,) float32): gamma, beta, proxy_gamma, proxy_beta.
// Outputs (both (C,) float32): mean, var of phi(gamma ((1 + proxy_gamma) q + proxy_beta) + beta) over the
//         n fixed N(0, 1) quantiles q (population variance).
// Attributes: activation (string: relu | silu | gelu | identity), num_quantiles (int, default 200).
//
// Same math as ipu_norm/ops/proxy_stats.py (the PyTorch op) and proxy_stats_kernel.hpp (whose quantiles
// and activation codes this file uses). The Poplar side is built from popops element-wise expressions
// over the (C, n) tensor u = a q^T + c (numpy broadcasting of (C, 1) and (1, n)) and popops::reduce
// along the quantile axis, so Poplar spreads the C x n work over the tiles; each expression below is
// the term-for-term transcription of the kernel header's proxyActValue / proxyActDeriv.
//
// Build with the Poplar SDK enabled: make -C custom_ops  (-> custom_ops/build/custom_ops.so), then
// load it with ctypes.cdll.LoadLibrary before tracing (ipu_norm.ops.proxy_stats_ipu.load_custom_ops).
// Without the SDK, tests/test_custom_op_cpp.py checks this file with g++ -std=c++14 -fsyntax-only against
// the public SDK 3.4.0 popart/poplibs/poprithms headers (where clones of those repositories exist) and always
// against the stand-in declarations in custom_ops/sdk_decls (Poplar's headers are not public).
// Both outputs must reach the loss when training (PopART needs the gradient of every output of an op
// with a grad op); Proxy Norm always uses both.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
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
#include <poputil/TileMapping.hpp>

#include "proxy_stats_kernel.hpp"

namespace {

template <typename T, typename... Args> std::unique_ptr<T> makeUnique(Args &&...args) {
  // std::make_unique is C++14, but keep the SDK examples' C++11-compatible form.
  return std::unique_ptr<T>(new T(std::forward<Args>(args)...));
}

const popart::OperatorIdentifier kProxyStats = {"ipu_norm", "ProxyStats", 1, {4, 4}, 2};
const popart::OperatorIdentifier kProxyStatsGrad = {"ipu_norm", "ProxyStatsGrad", 1, {6, 6}, 4};

constexpr int64_t kDefaultNumQuantiles = 200;

ipu_norm::ProxyAct parseActivationOrThrow(const std::string &name) {
  ipu_norm::ProxyAct act;
  if (!ipu_norm::parseProxyAct(name.c_str(), &act)) {
    throw popart::error("ipu_norm.ProxyStats: unsupported activation '{}' (relu, silu, gelu, identity)", name);
  }
  return act;
}

// Attributes shared by the forward and the grad op.
struct ProxyStatsAttrs {
  std::string activation;
  int64_t numQuantiles;
};

// ---------------------------------------------------------------------------------------------------
// IR ops.

// What the forward and the grad op have in common: the attributes (validated in this one place), their
// serialisation, and the outlining and subgraph value that depend only on them.
class ProxyStatsOpBase : public popart::Op {
public:
  const ProxyStatsAttrs &attrs() const { return attrs_; }

  void appendAttributes(popart::OpSerialiserBase &os) const final {
    popart::Op::appendAttributes(os);
    appendProxyStatsAttributes(os);
  }

  // Ops with different attributes must not be outlined into one subgraph.
  void appendOutlineAttributes(popart::OpSerialiserBase &os) const final {
    popart::Op::appendOutlineAttributes(os);
    appendProxyStatsAttributes(os);
  }

  // The outliner's "inexpensive op" bound (as for element-wise ops): C x n element-wise work.
  float getSubgraphValue() const final { return getLowSubgraphValue(); }

protected:
  // (Parameter names differ from popart::Op's public members opid and settings.)
  ProxyStatsOpBase(const popart::OperatorIdentifier &opId, const ProxyStatsAttrs &attrs,
                   const popart::Op::Settings &opSettings)
      : popart::Op(opId, opSettings), attrs_(attrs) {
    parseActivationOrThrow(attrs_.activation);
    if (attrs_.numQuantiles < 2) {
      throw popart::error("ipu_norm.ProxyStats: num_quantiles must be >= 2, got {}", attrs_.numQuantiles);
    }
  }

private:
  void appendProxyStatsAttributes(popart::OpSerialiserBase &os) const {
    os.appendAttribute("activation", attrs_.activation);
    os.appendAttribute("num_quantiles", attrs_.numQuantiles);
  }

  ProxyStatsAttrs attrs_;
};

class ProxyStatsOp final : public ProxyStatsOpBase {
public:
  ProxyStatsOp(const popart::OperatorIdentifier &opId, const ProxyStatsAttrs &attrs,
               const popart::Op::Settings &opSettings)
      : ProxyStatsOpBase(opId, attrs, opSettings) {}

  std::unique_ptr<popart::Op> clone() const final { return makeUnique<ProxyStatsOp>(*this); }

  // Two (C,) float32 outputs; the four inputs must be (C,) float32 (the Python side casts to fp32: the
  // statistics are never computed in half precision).
  void setup() final {
    const popart::TensorInfo &ref = inInfo(0);
    if (ref.rank() != 1) {
      throw popart::error("ipu_norm.ProxyStats expects (C,) inputs, got rank {}", ref.rank());
    }
    for (popart::InIndex i = 0; i < 4; ++i) {
      if (inInfo(i).dataType() != popart::DataType::FLOAT || inInfo(i).shape() != ref.shape()) {
        throw popart::error("ipu_norm.ProxyStats: input {} must be float32 with the shape of input 0", i);
      }
    }
    outInfo(0) = popart::TensorInfo(popart::DataType::FLOAT, ref.shape());
    outInfo(1) = popart::TensorInfo(popart::DataType::FLOAT, ref.shape());
  }

  std::vector<std::unique_ptr<popart::Op>> getGradOps() final;
};

// Inputs: 0 d mean, 1 d var (gradients of the forward outputs), 2..5 gamma, beta, proxy_gamma,
// proxy_beta (forward inputs). Outputs 0..3: gradients of the forward inputs 0..3.
class ProxyStatsGradOp final : public ProxyStatsOpBase {
public:
  explicit ProxyStatsGradOp(const ProxyStatsOp &fwd)
      : ProxyStatsOpBase(kProxyStatsGrad, fwd.attrs(), fwd.getSettings()), paramInfo_(fwd.inInfo(0)) {}

  std::unique_ptr<popart::Op> clone() const final { return makeUnique<ProxyStatsGradOp>(*this); }

  void setup() final {
    for (popart::OutIndex i = 0; i < 4; ++i) {
      outInfo(i) = paramInfo_;
    }
  }

  const std::vector<popart::GradInOutMapper> &gradInputInfo() const final {
    static const std::vector<popart::GradInOutMapper> info = {
        {0, 0, popart::GradOpInType::GradOut}, {1, 1, popart::GradOpInType::GradOut},
        {2, 0, popart::GradOpInType::In},      {3, 1, popart::GradOpInType::In},
        {4, 2, popart::GradOpInType::In},      {5, 3, popart::GradOpInType::In}};
    return info;
  }

  const std::map<int, int> &gradOutToNonGradIn() const final {
    static const std::map<int, int> info = {{0, 0}, {1, 1}, {2, 2}, {3, 3}};
    return info;
  }

private:
  popart::TensorInfo paramInfo_;
};

std::vector<std::unique_ptr<popart::Op>> ProxyStatsOp::getGradOps() {
  std::vector<std::unique_ptr<popart::Op>> ops;
  ops.emplace_back(makeUnique<ProxyStatsGradOp>(*this));
  return ops;
}

const popart::OpDefinition::DataTypes kFloatOnly = {popart::DataType::FLOAT};

const popart::OpDefinition kProxyStatsDef(
    popart::OpDefinition::Inputs({{"gamma", kFloatOnly},
                                  {"beta", kFloatOnly},
                                  {"proxy_gamma", kFloatOnly},
                                  {"proxy_beta", kFloatOnly}}),
    popart::OpDefinition::Outputs({{"mean", kFloatOnly}, {"var", kFloatOnly}}),
    popart::OpDefinition::Attributes({{"activation", {"*"}}, {"num_quantiles", {"*"}}}));

// Static registration when the library is loaded (ctypes.cdll.LoadLibrary).
popart::OpCreator<ProxyStatsOp> proxyStatsOpCreator(
    popart::OpDefinitions({{kProxyStats, kProxyStatsDef}}),
    [](const popart::OpCreatorInfo &info) -> std::unique_ptr<popart::Op> {
      ProxyStatsAttrs attrs;
      attrs.activation = info.attributes.getAttribute<popart::Attributes::String>("activation", "relu");
      attrs.numQuantiles =
          info.attributes.getAttribute<popart::Attributes::Int>("num_quantiles", kDefaultNumQuantiles);
      return makeUnique<ProxyStatsOp>(info.opid, attrs, info.settings);
    },
    true);

// ---------------------------------------------------------------------------------------------------
// Poplar lowering.

namespace pe = popops::expr;

constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// u = a * q + c (a, c: (C, 1) per-channel placeholders, q: (1, n)); same association as the kernel header.
pe::Any proxyU(const pe::Expr &a, const pe::Expr &c, const pe::Expr &q) { return pe::Add(pe::Mul(a, q), c); }

// phi(u): proxyActValue in proxy_stats_kernel.hpp.
pe::Any actValue(ipu_norm::ProxyAct act, const pe::Expr &u) {
  switch (act) {
  case ipu_norm::ProxyAct::Relu:
    return pe::Max(u, pe::Const(0.0f));
  case ipu_norm::ProxyAct::Silu:
    return pe::Mul(u, pe::Sigmoid(u));
  case ipu_norm::ProxyAct::Gelu:
    return pe::Mul(pe::Mul(u, pe::Const(0.5f)), pe::Add(pe::Const(1.0f), pe::Erf(pe::Mul(u, pe::Const(kSqrt1_2)))));
  case ipu_norm::ProxyAct::Identity:
  default:
    return pe::Any(u);
  }
}

// phi'(u): proxyActDeriv in proxy_stats_kernel.hpp (relu'(0) = 0).
pe::Any actDeriv(ipu_norm::ProxyAct act, const pe::Expr &u) {
  switch (act) {
  case ipu_norm::ProxyAct::Relu:
    return pe::Select(pe::Const(1.0f), pe::Const(0.0f), pe::Gt(u, pe::Const(0.0f)));
  case ipu_norm::ProxyAct::Silu: {
    const pe::Sigmoid s(u);
    return pe::Mul(s, pe::Add(pe::Const(1.0f), pe::Mul(u, pe::Sub(pe::Const(1.0f), s))));
  }
  case ipu_norm::ProxyAct::Gelu: {
    const pe::Mul cdf(pe::Const(0.5f), pe::Add(pe::Const(1.0f), pe::Erf(pe::Mul(u, pe::Const(kSqrt1_2)))));
    const pe::Mul pdf(pe::Exp(pe::Mul(pe::Const(-0.5f), pe::Mul(u, u))), pe::Const(kInvSqrt2Pi));
    return pe::Add(cdf, pe::Mul(u, pdf));
  }
  case ipu_norm::ProxyAct::Identity:
  default:
    return pe::Const(1.0f);
  }
}

// The pieces both Opx share: the quantile constant and the per-channel affine (a, c) as (C, 1).
struct ProxyTerms {
  poplar::Tensor q;    // (1, n) constant
  poplar::Tensor a;    // (C, 1): gamma (1 + proxy_gamma)
  poplar::Tensor c;    // (C, 1): gamma proxy_beta + beta
  poplar::Tensor invN; // scalar 1/n, the reductions' scale
  std::size_t C;
  std::size_t n;
};

ProxyTerms growProxyTerms(const popart::popx::Opx &opx, poplar::Graph &graph, const poplar::Tensor &gamma,
                          const poplar::Tensor &beta, const poplar::Tensor &proxyGamma,
                          const poplar::Tensor &proxyBeta, int64_t numQuantiles, poplar::program::Sequence &prog) {
  ProxyTerms t;
  t.C = gamma.numElements();
  t.n = static_cast<std::size_t>(numQuantiles);
  std::vector<float> qHost(t.n);
  ipu_norm::gaussianQuantiles<float>(t.n, qHost.data());
  t.q = graph.addConstant<float>(poplar::FLOAT, {1, t.n}, qHost, opx.debugContext("quantiles"));
  poputil::mapTensorLinearly(graph, t.q);
  t.a = popops::map(graph, pe::Mul(pe::_1, pe::Add(pe::Const(1.0f), pe::_2)), {gamma, proxyGamma}, prog,
                    opx.debugContext("a"))
            .reshape({t.C, 1});
  t.c = popops::map(graph, pe::Add(pe::Mul(pe::_1, pe::_2), pe::_3), {gamma, proxyBeta, beta}, prog,
                    opx.debugContext("c"))
            .reshape({t.C, 1});
  t.invN = opx.getConst(poplar::FLOAT, {}, 1.0 / static_cast<double>(t.n), "inv_n");
  return t;
}

// z = phi(a q + c) as (C, n), and its per-channel mean as (C,).
std::pair<poplar::Tensor, poplar::Tensor> growZAndMean(const popart::popx::Opx &opx, poplar::Graph &graph,
                                                      ipu_norm::ProxyAct act, const ProxyTerms &t,
                                                      poplar::program::Sequence &prog) {
  poplar::Tensor z =
      popops::map(graph, actValue(act, proxyU(pe::_1, pe::_2, pe::_3)), {t.a, t.c, t.q}, prog, opx.debugContext("z"));
  poplar::Tensor mean = popops::reduce(graph, z, {1}, {popops::Operation::ADD, false, t.invN}, prog,
                                       opx.debugContext("mean"));
  return {z, mean};
}

class ProxyStatsOpx : public popart::popx::Opx {
public:
  ProxyStatsOpx(popart::Op *op, popart::popx::Devicex *devicex) : popart::popx::Opx(op, devicex) {
    verifyOp<ProxyStatsOp>(op, kProxyStats);
  }

  void grow(poplar::program::Sequence &prog) const final {
    const ProxyStatsAttrs &attrs = getOp<ProxyStatsOp>().attrs();
    const ipu_norm::ProxyAct act = parseActivationOrThrow(attrs.activation);
    const ProxyTerms t =
        growProxyTerms(*this, graph(), getInTensor(0), getInTensor(1), getInTensor(2), getInTensor(3),
                       attrs.numQuantiles, prog);
    poplar::Tensor z, mean;
    std::tie(z, mean) = growZAndMean(*this, graph(), act, t, prog);
    // Two-pass variance (as the kernel header): mean of (z - mean)^2.
    poplar::Tensor sq = popops::map(graph(), pe::Square(pe::Sub(pe::_1, pe::_2)), {z, mean.reshape({t.C, 1})},
                                    prog, debugContext("sq_dev"));
    poplar::Tensor var =
        popops::reduce(graph(), sq, {1}, {popops::Operation::ADD, false, t.invN}, prog, debugContext("var"));
    setOutTensor(0, mean);
    setOutTensor(1, var);
  }
};

class ProxyStatsGradOpx : public popart::popx::Opx {
public:
  ProxyStatsGradOpx(popart::Op *op, popart::popx::Devicex *devicex) : popart::popx::Opx(op, devicex) {
    verifyOp<ProxyStatsGradOp>(op, kProxyStatsGrad);
  }

  void grow(poplar::program::Sequence &prog) const final {
    const ProxyStatsAttrs &attrs = getOp<ProxyStatsGradOp>().attrs();
    const ipu_norm::ProxyAct act = parseActivationOrThrow(attrs.activation);
    const poplar::Tensor gradMean = getInTensor(0);
    const poplar::Tensor gradVar = getInTensor(1);
    const poplar::Tensor gamma = getInTensor(2);
    const poplar::Tensor proxyGamma = getInTensor(4);
    const poplar::Tensor proxyBeta = getInTensor(5);
    const ProxyTerms t =
        growProxyTerms(*this, graph(), gamma, getInTensor(3), proxyGamma, proxyBeta, attrs.numQuantiles, prog);
    poplar::Tensor z, mean;
    std::tie(z, mean) = growZAndMean(*this, graph(), act, t, prog);
    const float invN = 1.0f / static_cast<float>(t.n);
    // w = (gm + 2 gv (z - mean)) phi'(u) / n, with placeholders
    // _1 z, _2 mean, _3 gm, _4 gv (all but z (C, 1)), _5 a, _6 c, _7 q.
    const pe::Any w = pe::Mul(
        pe::Mul(pe::Add(pe::_3, pe::Mul(pe::Mul(pe::Const(2.0f), pe::_4), pe::Sub(pe::_1, pe::_2))), pe::Const(invN)),
        actDeriv(act, proxyU(pe::_5, pe::_6, pe::_7)));
    poplar::Tensor wT = popops::map(graph(), w,
                                    {z, mean.reshape({t.C, 1}), gradMean.reshape({t.C, 1}),
                                     gradVar.reshape({t.C, 1}), t.a, t.c, t.q},
                                    prog, debugContext("w"));
    poplar::Tensor s0 = popops::reduce(graph(), wT, {1}, {popops::Operation::ADD}, prog, debugContext("sum_w"));
    poplar::Tensor wq = popops::map(graph(), pe::Mul(pe::_1, pe::_2), {wT, t.q}, prog, debugContext("w_q"));
    poplar::Tensor sq = popops::reduce(graph(), wq, {1}, {popops::Operation::ADD}, prog, debugContext("sum_wq"));
    // d gamma = (1 + pg) Sq + pb S0, d beta = S0, d pg = gamma Sq, d pb = gamma S0.
    setOutTensor(0, popops::map(graph(), pe::Add(pe::Mul(pe::Add(pe::Const(1.0f), pe::_1), pe::_2), pe::Mul(pe::_3, pe::_4)),
                                {proxyGamma, sq, proxyBeta, s0}, prog, debugContext("d_gamma")));
    setOutTensor(1, s0);
    setOutTensor(2, popops::map(graph(), pe::Mul(pe::_1, pe::_2), {gamma, sq}, prog, debugContext("d_proxy_gamma")));
    setOutTensor(3, popops::map(graph(), pe::Mul(pe::_1, pe::_2), {gamma, s0}, prog, debugContext("d_proxy_beta")));
  }
};

popart::popx::OpxCreator<ProxyStatsOpx> proxyStatsOpxCreator(kProxyStats);
popart::popx::OpxCreator<ProxyStatsGradOpx> proxyStatsGradOpxCreator(kProxyStatsGrad);

} // namespace
