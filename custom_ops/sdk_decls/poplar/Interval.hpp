// Stand-in declarations, not Graphcore code: Poplar is not public. Written for ipu_norm from the API
// usage in the public popart/poplibs headers, only for g++ -fsyntax-only of custom_ops/*.cpp
// (see custom_ops/sdk_decls/README.md). Never linked; the real SDK header replaces this one.
#ifndef IPU_NORM_SDK_DECLS_POPLAR_INTERVAL_HPP
#define IPU_NORM_SDK_DECLS_POPLAR_INTERVAL_HPP

#include <cstddef>

namespace poplar {

// A half-open range [begin, end) of element indices.
class Interval {
public:
  Interval();
  Interval(std::size_t begin, std::size_t end);
  std::size_t begin() const;
  std::size_t end() const;
  std::size_t size() const;
};

} // namespace poplar

#endif
