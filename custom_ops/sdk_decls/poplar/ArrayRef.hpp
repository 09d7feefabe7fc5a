// Stand-in declarations, not Graphcore code: Poplar is not public. Written for ipu_norm from the API
// usage in the public popart/poplibs headers, only for g++ -fsyntax-only of custom_ops/*.cpp
// (see custom_ops/sdk_decls/README.md). Never linked; the real SDK header replaces this one.
#ifndef IPU_NORM_SDK_DECLS_POPLAR_ARRAYREF_HPP
#define IPU_NORM_SDK_DECLS_POPLAR_ARRAYREF_HPP

#include <array>
#include <cstddef>
#include <initializer_list>
#include <vector>

namespace poplar {

// A non-owning view of contiguous elements (shapes, constant values).
template <class T> class ArrayRef {
public:
  ArrayRef() = default;
  ArrayRef(const T *p, std::size_t size) : data_(p), size_(size) {}
  ArrayRef(const T &one) : data_(&one), size_(1) {}
  ArrayRef(const std::vector<T> &v) : data_(v.data()), size_(v.size()) {}
  template <std::size_t N> ArrayRef(const std::array<T, N> &a) : data_(a.data()), size_(N) {}
  // A braced list argument outlives the call that takes the ArrayRef, which is the only use.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winit-list-lifetime"
#endif
  ArrayRef(std::initializer_list<T> l) : data_(l.begin()), size_(l.size()) {}
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9
#pragma GCC diagnostic pop
#endif

  const T *data() const { return data_; }
  const T *begin() const { return data_; }
  const T *end() const { return data_ + size_; }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const T &operator[](std::size_t i) const { return data_[i]; }
  const T &front() const { return data_[0]; }
  const T &back() const { return data_[size_ - 1]; }

private:
  const T *data_ = nullptr;
  std::size_t size_ = 0;
};

} // namespace poplar

#endif
