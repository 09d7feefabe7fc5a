// Stand-in declarations, not Graphcore code: written for ipu_norm, declaring only what
// custom_ops/proxy_stats_popart.cpp uses, with the signatures of the SDK 3.4.0 release, so that the op
// compiles structurally (g++ -fsyntax-only) where no SDK or popart source exists. Never linked. The
// check against the real public headers is tests/test_custom_op_cpp.py (see custom_ops/sdk_decls/README.md).
#ifndef IPU_NORM_STANDIN_POPOPS_EXPR_HPP
#define IPU_NORM_STANDIN_POPOPS_EXPR_HPP

#include <memory>
#include <type_traits>

#include <poplar/Type.hpp>

namespace popops {
namespace expr {

// An element-wise expression (a tree of the classes below) for popops::map.
class Expr {
public:
  virtual ~Expr();
  virtual std::unique_ptr<Expr> clone() const = 0;
};

// Holds a copy of any expression.
class Any {
public:
  Any(const Expr &expr);
  Any(const Any &other);
  Any(Any &&other);
  Any &operator=(const Any &other);
  Any &operator=(Any &&other);
  operator Expr &();
  operator const Expr &() const;
};

class Const : public Expr {
public:
  template <typename T, typename = typename std::enable_if<std::is_arithmetic<T>::value, T>::type> Const(T x);
  std::unique_ptr<Expr> clone() const override;
};

// The i-th tensor argument of popops::map (1-based).
class PlaceHolder : public Expr {
public:
  PlaceHolder(unsigned index);
  std::unique_ptr<Expr> clone() const override;
};

extern const PlaceHolder _1, _2, _3, _4, _5, _6, _7, _8, _9;

class UnaryOp : public Expr {
public:
  std::unique_ptr<Expr> clone() const override;

protected:
  explicit UnaryOp(const Expr &a);
};

class BinaryOp : public Expr {
public:
  std::unique_ptr<Expr> clone() const override;

protected:
  BinaryOp(const Expr &a, const Expr &b);
};

class TernaryOp : public Expr {
public:
  std::unique_ptr<Expr> clone() const override;

protected:
  TernaryOp(const Expr &a, const Expr &b, const Expr &c);
};

// The operators the op uses.
class Exp : public UnaryOp {
public:
  explicit Exp(const Expr &a);
};
class Erf : public UnaryOp {
public:
  explicit Erf(const Expr &a);
};
class Sigmoid : public UnaryOp {
public:
  explicit Sigmoid(const Expr &a);
};
class Square : public UnaryOp {
public:
  explicit Square(const Expr &a);
};
class Sqrt : public UnaryOp {
public:
  explicit Sqrt(const Expr &a);
};
class Cast : public Expr {
public:
  Cast(const Expr &a, const poplar::Type bType);
  std::unique_ptr<Expr> clone() const override;
};
class Add : public BinaryOp {
public:
  Add(const Expr &a, const Expr &b);
};
class Sub : public BinaryOp {
public:
  Sub(const Expr &a, const Expr &b);
};
class Mul : public BinaryOp {
public:
  Mul(const Expr &a, const Expr &b);
};
class Divide : public BinaryOp {
public:
  Divide(const Expr &a, const Expr &b);
};
class Max : public BinaryOp {
public:
  Max(const Expr &a, const Expr &b);
};
class Gt : public BinaryOp {
public:
  Gt(const Expr &a, const Expr &b);
};
// Select(a, b, c): a where c is true, else b.
class Select : public TernaryOp {
public:
  Select(const Expr &a, const Expr &b, const Expr &c);
};

} // namespace expr
} // namespace popops

#endif
