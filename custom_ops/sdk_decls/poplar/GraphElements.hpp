// Stand-in declarations, not Graphcore code: Poplar is not public. Written for ipu_norm from the API
// usage in the public popart/poplibs headers, only for g++ -fsyntax-only of custom_ops/*.cpp
// (see custom_ops/sdk_decls/README.md). Never linked; the real SDK header replaces this one.
#ifndef IPU_NORM_SDK_DECLS_POPLAR_GRAPHELEMENTS_HPP
#define IPU_NORM_SDK_DECLS_POPLAR_GRAPHELEMENTS_HPP

namespace poplar {

// A set of vertices executed in parallel (one BSP compute phase).
class ComputeSet {
public:
  ComputeSet();
  unsigned getId() const;
};

} // namespace poplar

#endif
