// Stand-in declarations, not Graphcore code: Poplar is not public. Written for ipu_norm from the API
// usage in the public popart/poplibs headers, only for g++ -fsyntax-only of custom_ops/*.cpp
// (see custom_ops/sdk_decls/README.md). Never linked; the real SDK header replaces this one.
#ifndef IPU_NORM_SDK_DECLS_POPLAR_TYPE_HPP
#define IPU_NORM_SDK_DECLS_POPLAR_TYPE_HPP

#include <iosfwd>
#include <string>

namespace poplar {

// An element type of a device tensor (opaque here).
class Type {
public:
  Type();
  const std::string &toString() const;
  bool operator==(const Type &other) const;
  bool operator!=(const Type &other) const;
  bool operator<(const Type &other) const;

private:
  const void *impl_;
};

std::ostream &operator<<(std::ostream &os, const Type &t);

extern Type BOOL;
extern Type CHAR;
extern Type UNSIGNED_CHAR;
extern Type SIGNED_CHAR;
extern Type SHORT;
extern Type UNSIGNED_SHORT;
extern Type INT;
extern Type UNSIGNED_INT;
extern Type LONGLONG;
extern Type UNSIGNED_LONGLONG;
extern Type HALF;
extern Type FLOAT;

// The device type of a host type: equivalent_device_type<T>().value.
template <class T> struct equivalent_device_type {};
template <> struct equivalent_device_type<bool> { const Type &value = BOOL; };
template <> struct equivalent_device_type<int> { const Type &value = INT; };
template <> struct equivalent_device_type<unsigned> { const Type &value = UNSIGNED_INT; };
template <> struct equivalent_device_type<float> { const Type &value = FLOAT; };

} // namespace poplar

#endif
