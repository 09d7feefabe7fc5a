// Stand-in declarations, not Graphcore code: Poplar is not public. Written for ipu_norm from the API
// usage in the public popart/poplibs headers, only for g++ -fsyntax-only of custom_ops/*.cpp
// (see custom_ops/sdk_decls/README.md). Never linked; the real SDK header replaces this one.
#ifndef IPU_NORM_SDK_DECLS_POPLAR_OPTIONFLAGS_HPP
#define IPU_NORM_SDK_DECLS_POPLAR_OPTIONFLAGS_HPP

#include <initializer_list>
#include <string>
#include <utility>

namespace poplar {

// String key/value options passed to Poplar and poplibs calls.
class OptionFlags {
public:
  OptionFlags();
  OptionFlags(std::initializer_list<std::pair<const std::string, std::string>> init);
  OptionFlags(const OptionFlags &other);
  OptionFlags &operator=(const OptionFlags &other);
  ~OptionFlags();
  void set(const std::string &option, const std::string &value);
  const std::string &at(const std::string &option) const;
  void clear();
};

} // namespace poplar

#endif
