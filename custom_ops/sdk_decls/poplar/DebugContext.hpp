// Stand-in declarations, not Graphcore code: Poplar is not public. Written for ipu_norm from the API
// usage in the public popart/poplibs headers, only for g++ -fsyntax-only of custom_ops/*.cpp
// (see custom_ops/sdk_decls/README.md). Never linked; the real SDK header replaces this one.
#ifndef IPU_NORM_SDK_DECLS_POPLAR_DEBUGCONTEXT_HPP
#define IPU_NORM_SDK_DECLS_POPLAR_DEBUGCONTEXT_HPP

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace poplar {

// Where a debug context was made (defaults to the caller).
class SourceLocation {
public:
  SourceLocation();
  SourceLocation(const char *functionName, const char *fileName, unsigned lineNumber);
  static SourceLocation Current(const char *functionName = __builtin_FUNCTION(),
                                const char *fileName = __builtin_FILE(), unsigned lineNumber = __builtin_LINE());
};

// A value in the debug/profile information tree.
class ProfileValue {
public:
  using Map = std::map<std::string, ProfileValue>;
  using Vector = std::vector<ProfileValue>;

  ProfileValue();
  ProfileValue(const char *s);
  ProfileValue(std::string s);
  ProfileValue(Map m);
  ProfileValue(Vector v);
  ProfileValue(double d);
  ProfileValue(bool b);
  ProfileValue(const ProfileValue &other);
  ProfileValue &operator=(const ProfileValue &other);
  ~ProfileValue();
};

using DebugId = std::uint64_t;

class DebugInfo;

// A name and debug id that the debug information of an operation hangs from.
class DebugNameAndId {
public:
  DebugNameAndId(std::string name = "", DebugId debugId = {}, std::string parentPath = "");
  DebugNameAndId(const char *name);
  DebugNameAndId(DebugId debugId);
  DebugNameAndId(const DebugNameAndId &other, std::string name = "");
  DebugNameAndId &operator=(const DebugNameAndId &other);
  std::string getPathName() const;
};

// What every Poplar/poplibs call takes last: a name (and the caller) for its debug information.
class DebugContext {
public:
  DebugContext(SourceLocation loc = SourceLocation::Current());
  DebugContext(const char *name, SourceLocation loc = SourceLocation::Current());
  DebugContext(std::string name, SourceLocation loc = SourceLocation::Current());
  DebugContext(const DebugInfo &debugInfo, std::string name = "", SourceLocation loc = SourceLocation::Current());
  DebugContext(const DebugNameAndId &debugNameAndId, std::string name = "",
               SourceLocation loc = SourceLocation::Current());
  DebugContext(const DebugContext &other);
  DebugContext(DebugContext &&other);
  DebugContext &operator=(const DebugContext &other) = delete;
  ~DebugContext();
  std::string getPathName() const;
};

// The debug information record of one operation.
class DebugInfo {
public:
  DebugInfo(const DebugContext &debugContext, std::string layer);
  DebugInfo(const DebugInfo &) = delete;
  DebugInfo &operator=(const DebugInfo &) = delete;
  virtual ~DebugInfo();
  DebugId getId() const;
  std::string getPathName() const;
  bool setValue(std::string name, ProfileValue value);
};

} // namespace poplar

#endif
