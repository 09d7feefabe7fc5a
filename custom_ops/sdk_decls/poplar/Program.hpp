// Stand-in declarations, not Graphcore code: Poplar is not public. Written for ipu_norm from the API
// usage in the public popart/poplibs headers, only for g++ -fsyntax-only of custom_ops/*.cpp
// (see custom_ops/sdk_decls/README.md). Never linked; the real SDK header replaces this one.
#ifndef IPU_NORM_SDK_DECLS_POPLAR_PROGRAM_HPP
#define IPU_NORM_SDK_DECLS_POPLAR_PROGRAM_HPP

#include <initializer_list>

#include <poplar/DebugContext.hpp>
#include <poplar/GraphElements.hpp>
#include <poplar/Tensor.hpp>

namespace poplar {
namespace program {

// A control program (opaque here).
class Program {
public:
  Program();
  Program(const Program &other);
  Program &operator=(const Program &other);
  ~Program();
  bool isEmpty() const;
};

// Programs run one after another; what an Opx grows into.
class Sequence : public Program {
public:
  Sequence(const DebugContext &debugContext = {});
  Sequence(std::initializer_list<Program> programs, const DebugContext &debugContext = {});
  void add(const Program &p);
};

class Execute : public Program {
public:
  explicit Execute(ComputeSet cs, const DebugContext &debugContext = {});
};

class Copy : public Program {
public:
  Copy(const Tensor &src, const Tensor &dst, bool dontOutline = false, const DebugContext &debugContext = {});
};

} // namespace program
} // namespace poplar

#endif
