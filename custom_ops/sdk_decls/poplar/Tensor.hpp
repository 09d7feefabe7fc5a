// Stand-in declarations, not Graphcore code: Poplar is not public. Written for ipu_norm from the API
// usage in the public popart/poplibs headers, only for g++ -fsyntax-only of custom_ops/*.cpp
// (see custom_ops/sdk_decls/README.md). Never linked; the real SDK header replaces this one.
#ifndef IPU_NORM_SDK_DECLS_POPLAR_TENSOR_HPP
#define IPU_NORM_SDK_DECLS_POPLAR_TENSOR_HPP

#include <cstddef>
#include <iosfwd>
#include <string>
#include <vector>

#include <poplar/ArrayRef.hpp>
#include <poplar/Interval.hpp>
#include <poplar/Type.hpp>

namespace poplar {

// A handle to (a view of) device memory laid out over tiles.
class Tensor {
public:
  Tensor();
  Tensor(const Tensor &other);
  Tensor(Tensor &&other) noexcept;
  Tensor &operator=(const Tensor &other) &;
  Tensor &operator=(Tensor &&other) & noexcept;
  ~Tensor();

  Type elementType() const;
  std::size_t numElements() const;
  std::size_t rank() const;
  std::size_t dim(unsigned i) const;
  std::vector<std::size_t> shape() const;
  bool valid() const;

  Tensor operator[](std::size_t i) const &;
  Tensor slice(std::size_t begin, std::size_t end, unsigned dimension = 0) const &;
  Tensor reshape(ArrayRef<std::size_t> shape) const;
  Tensor flatten() const;
  Tensor expand(ArrayRef<std::size_t> indices) const;
  Tensor squeeze(ArrayRef<std::size_t> indices) const;
  Tensor dimShuffle(ArrayRef<unsigned> permutation) const;
  Tensor broadcast(unsigned n, unsigned dim) const;
  std::string shapeToString() const;
};

std::ostream &operator<<(std::ostream &os, const Tensor &t);

} // namespace poplar

#endif
