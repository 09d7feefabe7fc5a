// Stand-in declarations, not Graphcore code: written for ipu_norm, declaring only what
// custom_ops/proxy_stats_popart.cpp uses, with the signatures of the SDK 3.4.0 release, so that the op
// compiles structurally (g++ -fsyntax-only) where no SDK or popart source exists. Never linked. The
// check against the real public headers is tests/test_custom_op_cpp.py (see custom_ops/sdk_decls/README.md).
#ifndef IPU_NORM_STANDIN_POPART_OPMANAGER_HPP
#define IPU_NORM_STANDIN_POPART_OPMANAGER_HPP

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <popart/attributes.hpp>
#include <popart/names.hpp>
#include <popart/op.hpp>
#include <popart/tensorinfo.hpp>

namespace popart {

// The declared inputs, outputs and attributes of an operator (what the op manager validates).
class OpDefinition {
public:
  struct Input {
    Input(std::string name, std::vector<DataType> supportedTensors, bool constant = false);
  };
  struct Output {
    Output(std::string name, std::vector<DataType> supportedTensors);
  };
  struct Attribute {
    Attribute(std::string supportedValuesRegex);
  };
  using DataTypes = std::vector<DataType>;
  using Inputs = std::vector<Input>;
  using Outputs = std::vector<Output>;
  using Attributes = std::map<std::string, Attribute>;

  OpDefinition();
  OpDefinition(Inputs inputs, Outputs outputs, Attributes attributes);
};

using OpDefinitions = std::map<OperatorIdentifier, OpDefinition, OperatorIdentifierLess>;

// What a creator function gets: the identifier, settings and ONNX attributes of the node.
class OpCreatorInfo {
public:
  const OperatorIdentifier &opid;
  const Op::Settings &settings;
  const Attributes &attributes;
};

class OpManager {
public:
  using OpFactoryFunc = std::function<std::unique_ptr<Op>(const OpCreatorInfo &info)>;
  using ComplexOpFactoryFunc = std::function<Op *(const OpCreatorInfo &info, Graph &graph)>;
};

// A static instance registers the op type(s) with the op manager when the library is loaded.
template <class OP> class OpCreator {
public:
  OpCreator(const OpDefinitions &opDefinitions, bool isPublic = true);
  OpCreator(const OpDefinitions &opDefinitions, OpManager::OpFactoryFunc func, bool isPublic = true);
  OpCreator(const OpDefinitions &opDefinitions, OpManager::ComplexOpFactoryFunc func, bool isPublic = true);
};

} // namespace popart

#endif
