// Proxy Norm statistics (Labatie et al. 2021), header-only reference kernel.
//
// Single source of the math on the C++/IPU side; mirrors ipu_norm/ops/proxy_stats.py and is tested
// against it (tests/test_custom_op_cpp.py, float64, 1e-10) through the C ABI shim proxy_stats_capi.cpp.
// The PopART op (proxy_stats_popart.cpp) takes its quantiles and activation codes from here.
//
// Per channel c, with the n fixed quantiles q_i = sqrt(2) erfinv(2 (i + 0.5) / n - 1) of N(0, 1):
//   u_i = g ((1 + pg) q_i + pb) + b,  z_i = phi(u_i)
//   mean = (1/n) sum_i z_i,  var = (1/n) sum_i (z_i - mean)^2
// Backward, for upstream gradients (gm, gv) of (mean, var):
//   w_i = (gm + 2 gv (z_i - mean)) phi'(u_i) / n,  S0 = sum_i w_i,  Sq = sum_i w_i q_i
//   dg = (1 + pg) Sq + pb S0,  db = S0,  dpg = g Sq,  dpb = g S0
//
// Plain C++11 (no allocation, no exceptions, raw pointers, <cmath> only) and templated on the scalar
// type (float / double), so that the per-channel functions could also run inside a Poplar vertex.
#ifndef IPU_NORM_PROXY_STATS_KERNEL_HPP
#define IPU_NORM_PROXY_STATS_KERNEL_HPP

#include <cmath>
#include <cstddef>
#include <cstring>

namespace ipu_norm {

// Activation codes; the same order as ipu_norm.ops.proxy_stats.PROXY_ACTS.
enum class ProxyAct : int { Relu = 0, Silu = 1, Gelu = 2, Identity = 3 };

// Parse a canonical activation name ("relu", "silu", "gelu", "identity"); false if unknown.
inline bool parseProxyAct(const char *name, ProxyAct *out) {
  static const char *const names[] = {"relu", "silu", "gelu", "identity"};
  for (int k = 0; k < 4; ++k) {
    if (std::strcmp(name, names[k]) == 0) {
      *out = static_cast<ProxyAct>(k);
      return true;
    }
  }
  return false;
}

// phi(u) and phi'(u). GELU is the exact erf form; relu'(0) = 0 (as torch.relu's backward).
template <typename T> inline T proxyActValue(ProxyAct act, T u) {
  switch (act) {
  case ProxyAct::Relu:
    return u > T(0) ? u : T(0);
  case ProxyAct::Silu:
    return u / (T(1) + std::exp(-u));
  case ProxyAct::Gelu:
    return u * T(0.5) * (T(1) + std::erf(u * T(0.70710678118654752440)));
  case ProxyAct::Identity:
  default:
    return u;
  }
}

template <typename T> inline T proxyActDeriv(ProxyAct act, T u) {
  switch (act) {
  case ProxyAct::Relu:
    return u > T(0) ? T(1) : T(0);
  case ProxyAct::Silu: {
    const T s = T(1) / (T(1) + std::exp(-u));
    return s * (T(1) + u * (T(1) - s));
  }
  case ProxyAct::Gelu: {
    const T cdf = T(0.5) * (T(1) + std::erf(u * T(0.70710678118654752440)));
    const T pdf = std::exp(T(-0.5) * u * u) * T(0.39894228040143267794);
    return cdf + u * pdf;
  }
  case ProxyAct::Identity:
  default:
    return T(1);
  }
}

// Standard normal quantile Phi^-1(p) for 0 < p < 1, in double precision: Abramowitz & Stegun 26.2.23
// as the starting point (|error| < 4.5e-4), then Halley steps on Phi(x) - p (cubic convergence; the
// residual uses erfc, so the lower tail keeps full relative precision). Symmetric: the upper half is
// -Phi^-1(1 - p), with 1 - p passed exactly by the caller.
inline double normalQuantileLower(double p) {
  // p in (0, 0.5]
  const double t = std::sqrt(-2.0 * std::log(p));
  double x = -(t - (2.515517 + 0.802853 * t + 0.010328 * t * t) /
                       (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t));
  for (int it = 0; it < 4; ++it) {
    const double cdf = 0.5 * std::erfc(-x * 0.70710678118654752440);
    const double pdf = std::exp(-0.5 * x * x) * 0.39894228040143267794;
    const double r = (cdf - p) / pdf;
    x -= r / (1.0 + 0.5 * x * r);
  }
  return x;
}

// The n fixed quantiles q_i = Phi^-1((i + 0.5) / n) = sqrt(2) erfinv(2 (i + 0.5) / n - 1), i = 0..n-1.
// Computed in double, stored as T. Returns false if n < 2.
template <typename T> inline bool gaussianQuantiles(std::size_t n, T *q) {
  if (n < 2) {
    return false;
  }
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t j = n - 1 - i; // mirror index: p_j = 1 - p_i exactly
    double x;
    if (2 * i + 1 < n) {
      x = normalQuantileLower((static_cast<double>(i) + 0.5) / static_cast<double>(n));
    } else if (2 * i + 1 == n) {
      x = 0.0; // the median of an odd n
    } else {
      x = -normalQuantileLower((static_cast<double>(j) + 0.5) / static_cast<double>(n));
    }
    q[i] = static_cast<T>(x);
  }
  return true;
}

// u_i = a q_i + c with a = g (1 + pg), c = g pb + b (the same association as the PyTorch op).
template <typename T> struct ProxyAffine {
  T a, c;
  ProxyAffine(T g, T b, T pg, T pb) : a(g * (T(1) + pg)), c(g * pb + b) {}
  T operator()(T q) const { return a * q + c; }
};

// Forward for one channel: (mean, var) of phi(u_i) over the n quantiles. Two passes (stable variance).
template <typename T>
inline void proxyStatsForwardChannel(ProxyAct act, const T *q, std::size_t n, T g, T b, T pg, T pb,
                                     T *mean, T *var) {
  const ProxyAffine<T> u(g, b, pg, pb);
  const T invN = T(1) / static_cast<T>(n);
  T sum = T(0);
  for (std::size_t i = 0; i < n; ++i) {
    sum += proxyActValue(act, u(q[i]));
  }
  const T m = sum * invN;
  T ss = T(0);
  for (std::size_t i = 0; i < n; ++i) {
    const T d = proxyActValue(act, u(q[i])) - m;
    ss += d * d;
  }
  *mean = m;
  *var = ss * invN;
}

// Backward for one channel: gradients of gm * mean + gv * var w.r.t. (g, b, pg, pb).
template <typename T>
inline void proxyStatsBackwardChannel(ProxyAct act, const T *q, std::size_t n, T g, T b, T pg, T pb,
                                      T gm, T gv, T *dg, T *db, T *dpg, T *dpb) {
  const ProxyAffine<T> u(g, b, pg, pb);
  const T invN = T(1) / static_cast<T>(n);
  T sum = T(0);
  for (std::size_t i = 0; i < n; ++i) {
    sum += proxyActValue(act, u(q[i]));
  }
  const T m = sum * invN;
  T s0 = T(0), sq = T(0);
  for (std::size_t i = 0; i < n; ++i) {
    const T ui = u(q[i]);
    // d var / d u_i has no d mean / d u_i term: sum_i (z_i - mean) = 0.
    const T w = (gm + T(2) * gv * (proxyActValue(act, ui) - m)) * proxyActDeriv(act, ui) * invN;
    s0 += w;
    sq += w * q[i];
  }
  *dg = (T(1) + pg) * sq + pb * s0;
  *db = s0;
  *dpg = g * sq;
  *dpb = g * s0;
}

// All C channels; inputs and outputs are contiguous (C,) arrays, q is (n,).
template <typename T>
inline void proxyStatsForward(ProxyAct act, const T *q, std::size_t n, std::size_t C, const T *g, const T *b,
                              const T *pg, const T *pb, T *mean, T *var) {
  for (std::size_t c = 0; c < C; ++c) {
    proxyStatsForwardChannel(act, q, n, g[c], b[c], pg[c], pb[c], mean + c, var + c);
  }
}

template <typename T>
inline void proxyStatsBackward(ProxyAct act, const T *q, std::size_t n, std::size_t C, const T *g, const T *b,
                               const T *pg, const T *pb, const T *gm, const T *gv, T *dg, T *db, T *dpg,
                               T *dpb) {
  for (std::size_t c = 0; c < C; ++c) {
    proxyStatsBackwardChannel(act, q, n, g[c], b[c], pg[c], pb[c], gm[c], gv[c], dg + c, db + c, dpg + c,
                              dpb + c);
  }
}

} // namespace ipu_norm

#endif // IPU_NORM_PROXY_STATS_KERNEL_HPP
