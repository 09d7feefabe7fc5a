// Stand-in declarations, not Graphcore code: Poplar is not public. Written for ipu_norm from the API
// usage in the public popart/poplibs headers, only for g++ -fsyntax-only of custom_ops/*.cpp
// (see custom_ops/sdk_decls/README.md). Never linked; the real SDK header replaces this one.
#ifndef IPU_NORM_SDK_DECLS_POPLAR_TYPETRAITS_HPP
#define IPU_NORM_SDK_DECLS_POPLAR_TYPETRAITS_HPP

#include <cstddef>
#include <limits> // popops/Expr.hpp uses std::numeric_limits without including it
#include <type_traits>

namespace poplar {

// Host-side size/alignment facts about a constant's type (popops::expr::Const stores one).
struct TypeTraits {
  std::size_t size = 0;
  std::size_t align = 0;
  bool isIntegral = false;
  bool isFloat = false;
  bool isSigned = false;

  template <typename T> static TypeTraits make();
  template <typename T> static constexpr bool isSimpleType() { return std::is_arithmetic<T>::value; }
};

} // namespace poplar

#endif
