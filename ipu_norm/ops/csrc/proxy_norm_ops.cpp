// Proxy Norm CPU operators (namespace ipu_norm), registered with TORCH_LIBRARY:
//
//   proxy_affine(gamma, beta, gamma~, beta~, n, act, eps) -> (scale, shift)
//                                                 the Proxy Norm affine from the statistics of phi over n quantiles
//   proxy_norm_act(u, gamma, beta, gamma~, beta~, n, act, eps) -> out
//                                                 pn_act(u, *proxy_affine(...)): the whole PN-Act, one autograd node
//   pn_act(u, scale, shift, act) -> out           out = phi(u) * scale + shift, per channel (dim 1)
//   relu_shift(u, shift) -> out                   out = relu(u) + shift, per channel (the ReLU PN-Act, scale folded)
//
// each with CPU, Meta (shapes only: torch.compile / fake tensors) and Autograd kernels; the backward ops
// (*_backward) have CPU and Meta kernels. Under create_graph (double backward) the Autograd kernels compute their
// gradients with differentiable ATen ops instead. The math is ipu_norm/ops/proxy_stats.py and
// ipu_norm/layers/proxy_norm.py; tests/test_native_ops.py checks these kernels against float64 references.
//
// Numerics: no -ffast-math. Every reduction is computed by one thread over one block of channels or one (n, c)
// plane, in vector lanes of the tensor's dtype over pieces of at most kChunk elements (the statistics: over the n
// quantiles of 16 channels at once), accumulated in float64 across pieces; every plane is cut into the same pieces
// whichever thread takes it, and per-plane partials are summed over the batch in index order, so the results do not
// depend on the thread count. float32 uses exp_f32 below (a branch-free Cody-Waite + polynomial exp, ~1 ulp, that
// GCC vectorises); float64 uses std::exp. GELU uses std::erf (not vectorised).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace ipu_norm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Act { Relu, Silu, Gelu, Identity };

Act parse_act(c10::string_view name) {
  if (name == "relu") return Act::Relu;
  if (name == "silu") return Act::Silu;
  if (name == "gelu") return Act::Gelu;
  if (name == "identity") return Act::Identity;
  TORCH_CHECK(false, "ipu_norm ops: unsupported activation '", std::string(name), "'");
}

// exp(x) for float32 without branches or library calls, so loops calling it vectorise. |x| is clamped to 87 (exp
// stays a normal float) with an integer min on the bit pattern: float compares + blends, the obvious clamp, were
// measured 15x slower on an AVX2 build. A NaN x is clamped too: callers keep NaN through their other operand.
inline float exp_f32(float x) {
  int32_t xb;
  std::memcpy(&xb, &x, sizeof(xb));
  int32_t mag = xb & 0x7fffffff;
  mag = mag < 0x42AE0000 ? mag : 0x42AE0000;  // bits of 87.0f
  xb = (xb & static_cast<int32_t>(0x80000000u)) | mag;
  std::memcpy(&x, &xb, sizeof(x));
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;  // Cody-Waite: ln 2 in two parts
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;  // Cephes expf minimax polynomial on [-ln2/2, ln2/2]
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float exp_of(float x) { return exp_f32(x); }
inline double exp_of(double x) { return std::exp(x); }

// phi(u) and phi'(u) for one element.
template <Act A, typename T>
inline void act_and_grad(T u, T& z, T& d) {
  if constexpr (A == Act::Relu) {
    z = u > T(0) ? u : T(0);
    d = u > T(0) ? T(1) : T(0);  // ATen's relu backward: 0 at the kink
  } else if constexpr (A == Act::Silu) {
    const T s = T(1) / (T(1) + exp_of(-u));
    z = u * s;
    d = s * (T(1) + u * (T(1) - s));
  } else if constexpr (A == Act::Gelu) {  // exact (erf) GELU, as F.gelu's default
    const T cdf = T(0.5) * (T(1) + std::erf(u * T(0.70710678118654752440)));
    z = u * cdf;
    d = cdf + u * exp_of(T(-0.5) * u * u) * T(0.39894228040143267794);
  } else {
    z = u;
    d = T(1);
  }
}

template <Act A, typename T>
inline T act_value(T u) {
  if constexpr (A == Act::Relu) {
    return u > T(0) ? u : T(0);
  } else if constexpr (A == Act::Silu) {
    return u / (T(1) + exp_of(-u));
  } else if constexpr (A == Act::Gelu) {
    return u * T(0.5) * (T(1) + std::erf(u * T(0.70710678118654752440)));
  } else {
    return u;
  }
}

// Sums in vector lanes of T over blocks of kBlock elements (an OpenMP simd reduction: a fixed order for a given
// build), accumulated across blocks in float64: the same result on every call and at every thread count.
constexpr int64_t kBlock = 1024;

template <typename T>
inline double sum_of(const T* __restrict x, int64_t n) {
  double s = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < m; ++i) acc += x[b + i];
    s += acc;
  }
  return s;
}

template <typename F>
void dispatch_act(Act act, const F& f) {
  switch (act) {
    case Act::Relu: f(std::integral_constant<Act, Act::Relu>{}); break;
    case Act::Silu: f(std::integral_constant<Act, Act::Silu>{}); break;
    case Act::Gelu: f(std::integral_constant<Act, Act::Gelu>{}); break;
    case Act::Identity: f(std::integral_constant<Act, Act::Identity>{}); break;
  }
}

// The inner loops, one plane or one channel each, as functions of restrict pointers so that GCC vectorises them
// (no aliasing between input and output, no control flow: -fno-trapping-math lets the selects become blends).
// Elementwise PN-Act work runs over flat chunks of up to kChunk elements (vectorised whatever the plane size: late
// EfficientNet stages have 3x3 planes), then per (n, c) plane segment for the per-channel affine and sums.
constexpr int64_t kChunk = 2048;

// Visits elements [plane_begin * S, plane_end * S): chunk(e0, len) for each flat chunk, then segment(plane, e, len)
// for each plane (or piece of a plane) inside it. Chunks hold whole planes, or split one plane at fixed offsets from
// its start, so every plane is reduced in the same pieces whichever thread gets it (thread-count independent sums).
template <typename Chunk, typename Segment>
void for_chunks(int64_t plane_begin, int64_t plane_end, int64_t S, const Chunk& chunk, const Segment& segment) {
  if (S >= kChunk) {
    for (int64_t plane = plane_begin; plane < plane_end; ++plane)
      for (int64_t off = 0; off < S; off += kChunk) {
        const int64_t e = plane * S + off, len = std::min(kChunk, S - off);
        chunk(e, len);
        segment(plane, e, len);
      }
    return;
  }
  const int64_t per_chunk = std::max<int64_t>(1, kChunk / std::max<int64_t>(S, 1));
  for (int64_t p0 = plane_begin; p0 < plane_end; p0 += per_chunk) {
    const int64_t p1 = std::min(plane_end, p0 + per_chunk);
    chunk(p0 * S, (p1 - p0) * S);
    for (int64_t plane = p0; plane < p1; ++plane) segment(plane, plane * S, S);
  }
}

template <Act A, typename T>
void act_row(const T* __restrict x, T* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = act_value<A>(x[j]);
}

template <Act A, typename T>
void act_grad_row(const T* __restrict x, T* __restrict z, T* __restrict d, int64_t n) {
  for (int64_t j = 0; j < n; ++j) act_and_grad<A>(x[j], z[j], d[j]);
}

template <typename T>
void affine_row(T* __restrict y, int64_t n, T s, T t) {
  for (int64_t j = 0; j < n; ++j) y[j] = y[j] * s + t;
}

// One pass for planes of at least kFusedPlane elements: gx = g s phi'(x), and the sums of g phi(x) and g (vector lanes
// of T per kChunk block, as scaled_grad_and_sums, then float64).
constexpr int64_t kFusedPlane = 512;

template <Act A, typename T>
void act_grad_and_sums(const T* __restrict g, const T* __restrict x, T* __restrict gx, int64_t n, T s, double& sgz,
                       double& sg) {
  for (int64_t b0 = 0; b0 < n; b0 += kChunk) {
    const int64_t m = std::min(kChunk, n - b0);
    T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t j = b0; j < b0 + m; ++j) {
      T z, d;
      act_and_grad<A>(x[j], z, d);
      gx[j] = g[j] * s * d;
      a += g[j] * z;
      b += g[j];
    }
    sgz += a;
    sg += b;
  }
}

// gx = g s d, and adds sum_j g_j z_j and sum_j g_j to sgz, sg. n <= kChunk: the sums run in vector lanes of T
// (an OpenMP simd reduction: a fixed order for a given build, the same on every thread), then go to float64.
template <typename T>
void scaled_grad_and_sums(const T* __restrict g, const T* __restrict z, const T* __restrict d, T* __restrict gx,
                          int64_t n, T s, double& sgz, double& sg) {
  T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < n; ++j) {
    gx[j] = g[j] * s * d[j];
    a += g[j] * z[j];
    b += g[j];
  }
  sgz += a;
  sg += b;
}

// The proxy statistics of kChannels channels at once: the loops run over the quantiles i and vectorise across the
// channels of the block (independent lanes: no reassociation), with float64 accumulators. One channel at a time
// (a 200-long row each) spent most of its time in loop prologues, tails and horizontal sums.
constexpr int64_t kChannels = 16;

// z[i][l] = phi(a_l q_i + c_l); mean_l and population variance var_l over i (two passes over z).
template <Act A, typename T>
void block_stats(const T* __restrict q, int64_t n, const T* __restrict a, const T* __restrict c, T* __restrict z,
                 double* __restrict mean, double* __restrict var) {
  T s1[kChannels] = {}, s2[kChannels] = {}, m[kChannels];
  for (int64_t i = 0; i < n; ++i) {
    const T qi = q[i];
    for (int64_t l = 0; l < kChannels; ++l) {
      const T v = act_value<A>(a[l] * qi + c[l]);
      z[i * kChannels + l] = v;
      s1[l] += v;
    }
  }
  for (int64_t l = 0; l < kChannels; ++l) {
    mean[l] = static_cast<double>(s1[l]) / n;
    m[l] = static_cast<T>(mean[l]);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t l = 0; l < kChannels; ++l) {
      const T d = z[i * kChannels + l] - m[l];
      s2[l] += d * d;
    }
  for (int64_t l = 0; l < kChannels; ++l) var[l] = static_cast<double>(s2[l]) / n;
}

// With dL/du_i = phi'(u_i) (wm + wv (z_i - mean)), u_i = a q_i + c: d_a = sum_i dL/du_i q_i, d_c = sum_i dL/du_i.
template <Act A, typename T>
void block_stats_grad(const T* __restrict q, int64_t n, const T* __restrict a, const T* __restrict c,
                      const T* __restrict mean, const T* __restrict wm, const T* __restrict wv, double* __restrict d_a,
                      double* __restrict d_c) {
  T sa[kChannels] = {}, sc[kChannels] = {};
  for (int64_t i = 0; i < n; ++i) {
    const T qi = q[i];
    for (int64_t l = 0; l < kChannels; ++l) {
      T z, d;
      act_and_grad<A>(a[l] * qi + c[l], z, d);
      const T gu = d * (wm[l] + wv[l] * (z - mean[l]));
      sa[l] += gu * qi;
      sc[l] += gu;
    }
  }
  for (int64_t l = 0; l < kChannels; ++l) {
    d_a[l] = sa[l];
    d_c[l] = sc[l];
  }
}

template <typename T>
void relu_shift_row(const T* __restrict x, T* __restrict y, int64_t n, T t) {
  for (int64_t j = 0; j < n; ++j) y[j] = (x[j] > T(0) ? x[j] : T(0)) + t;
}

template <typename T>
void relu_shift_grad_row(const T* __restrict g, const T* __restrict y, T* __restrict gx, int64_t n, T t) {
  for (int64_t j = 0; j < n; ++j) gx[j] = y[j] > t ? g[j] : T(0);
}

void check_float(const Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "ipu_norm ops: ", what,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_channel_vector(const Tensor& v, const Tensor& like, int64_t channels, const char* what) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == channels, "ipu_norm ops: ", what, " must have shape (", channels,
              ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == like.scalar_type(), "ipu_norm ops: ", what, " must have dtype ", like.scalar_type());
}

// Rows of (N, C, S) planes: the batch N, channels C, and S elements per plane.
struct Planes {
  int64_t n, c, s;
};

Planes planes_of(const Tensor& u) {
  TORCH_CHECK(u.dim() >= 2, "ipu_norm ops: expected an (N, C, ...) tensor, got ", u.sizes());
  const int64_t n = u.size(0), c = u.size(1);
  return {n, c, c == 0 || n == 0 ? 0 : u.numel() / (n * c)};
}

int64_t plane_grain(int64_t s) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(s, 1)); }

// ---------------------------------------------------------------- proxy affine (statistics -> scale, shift)
//
// Per channel: a = gamma (1 + gamma~), c = gamma beta~ + beta, z_i = phi(a q_i + c) over the n quantiles
// q_i = sqrt(2) erfinv((2 i + 1) / n - 1) of N(0, 1), mean and population variance of z,
// scale = 1 / sqrt(var + eps), shift = -mean * scale.

// erfinv in double: Giles' single-precision approximation, then two Newton steps on std::erf (to ~1 ulp).
double erfinv_f64(double p) {
  const double w0 = -std::log((1.0 - p) * (1.0 + p));
  double x;
  if (w0 < 5.0) {
    const double w = w0 - 2.5;
    x = 2.81022636e-08;
    for (double c : {3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087, -0.00125372503, -0.00417768164,
                     0.246640727, 1.50140941})
      x = c + x * w;
  } else {
    const double w = std::sqrt(w0) - 3.0;
    x = -0.000200214257;
    for (double c : {0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773, -0.0076224613, 0.00943887047,
                     1.00167406, 2.83297682})
      x = c + x * w;
  }
  x *= p;
  for (int k = 0; k < 2; ++k) x -= (std::erf(x) - p) / (M_2_SQRTPI * std::exp(-x * x));
  return x;
}

std::vector<double> compute_quantiles(int64_t n) {
  std::vector<double> q(n);
  for (int64_t i = 0; i < n; ++i) q[i] = M_SQRT2 * erfinv_f64((2.0 * i + 1.0) / n - 1.0);
  return q;
}

// PROXY_NUM_QUANTILES of ipu_norm/ops/proxy_stats.py, the count every layer uses unless told otherwise.
constexpr int64_t kDefaultQuantiles = 200;

// The quantiles as T. The default count's table is a constant computed once (a function-local static: the same
// values every call, nothing keyed by runtime state); other counts are computed per call.
template <typename T>
std::vector<T> quantiles(int64_t n) {
  TORCH_CHECK(n >= 2, "ipu_norm ops: need at least 2 proxy quantiles, got ", n);
  static const std::vector<double> default_table = compute_quantiles(kDefaultQuantiles);
  if (n == kDefaultQuantiles) return std::vector<T>(default_table.begin(), default_table.end());
  const std::vector<double> table = compute_quantiles(n);
  return std::vector<T>(table.begin(), table.end());
}

Tensor quantiles_tensor(int64_t n, const Tensor& like) {
  return at::tensor(quantiles<double>(n), like.options().dtype(at::kDouble)).to(like.scalar_type());
}

struct ProxyParams {
  const Tensor g, b, pg, pb;
};

ProxyParams checked_params(const Tensor& g, const Tensor& b, const Tensor& pg, const Tensor& pb, const char* op) {
  check_float(g, "gamma");
  TORCH_CHECK(g.dim() == 1, op, ": gamma must be a (C,) vector, got ", g.sizes());
  for (const Tensor* t : {&b, &pg, &pb}) check_channel_vector(*t, g, g.size(0), "beta / proxy_gamma / proxy_beta");
  return {g.contiguous(), b.contiguous(), pg.contiguous(), pb.contiguous()};
}

std::tuple<Tensor, Tensor> proxy_affine_cpu(const Tensor& gamma, const Tensor& beta, const Tensor& proxy_gamma,
                                            const Tensor& proxy_beta, int64_t num_quantiles,
                                            c10::string_view act_name, double eps) {
  const Act act = parse_act(act_name);
  const ProxyParams p = checked_params(gamma, beta, proxy_gamma, proxy_beta, "ipu_norm::proxy_affine");
  Tensor scale = at::empty_like(p.g), shift = at::empty_like(p.g);
  const int64_t channels = p.g.size(0), n = num_quantiles;
  AT_DISPATCH_FLOATING_TYPES(p.g.scalar_type(), "ipu_norm::proxy_affine", [&] {
    const std::vector<scalar_t> q = quantiles<scalar_t>(n);
    const scalar_t *pgm = p.g.data_ptr<scalar_t>(), *pbt = p.b.data_ptr<scalar_t>();
    const scalar_t *ppg = p.pg.data_ptr<scalar_t>(), *ppb = p.pb.data_ptr<scalar_t>(), *pq = q.data();
    scalar_t *ps = scale.data_ptr<scalar_t>(), *pt = shift.data_ptr<scalar_t>();
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      const int64_t blocks = (channels + kChannels - 1) / kChannels;
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> z(n * kChannels);
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t c0 = blk * kChannels, width = std::min(kChannels, channels - c0);
          scalar_t a[kChannels] = {}, c[kChannels] = {};  // lanes past the last channel stay 0 and are dropped
          for (int64_t l = 0; l < width; ++l) {
            const int64_t ch = c0 + l;
            a[l] = pgm[ch] * (1 + ppg[ch]);
            c[l] = pgm[ch] * ppb[ch] + pbt[ch];
          }
          double mean[kChannels], var[kChannels];
          block_stats<A>(pq, n, a, c, z.data(), mean, var);
          for (int64_t l = 0; l < width; ++l) {
            const double s = 1.0 / std::sqrt(var[l] + eps);
            ps[c0 + l] = static_cast<scalar_t>(s);
            pt[c0 + l] = static_cast<scalar_t>(-mean[l] * s);
          }
        }
      });
    });
  });
  return {scale, shift};
}

// From the outputs: mean = -shift / scale. With gs, gt the incoming gradients of scale and shift:
//   dL/dmean = -scale gt,   dL/dvar = -(gs - mean gt) scale^3 / 2,
//   dL/du_i = phi'(u_i) (dL/dmean + 2 dL/dvar (z_i - mean)) / n,   dL/da = sum_i dL/du_i q_i,  dL/dc = sum_i dL/du_i,
//   and the chain rule through a = gamma (1 + gamma~), c = gamma beta~ + beta.
std::tuple<Tensor, Tensor, Tensor, Tensor> proxy_affine_backward_cpu(
    const Tensor& grad_scale_, const Tensor& grad_shift_, const Tensor& gamma, const Tensor& beta,
    const Tensor& proxy_gamma, const Tensor& proxy_beta, const Tensor& scale_, const Tensor& shift_,
    int64_t num_quantiles, c10::string_view act_name) {
  const Act act = parse_act(act_name);
  const ProxyParams p = checked_params(gamma, beta, proxy_gamma, proxy_beta, "ipu_norm::proxy_affine_backward");
  const int64_t channels = p.g.size(0), n = num_quantiles;
  for (const Tensor* t : {&grad_scale_, &grad_shift_, &scale_, &shift_})
    check_channel_vector(*t, p.g, channels, "grad_scale / grad_shift / scale / shift");
  const Tensor gs = grad_scale_.contiguous(), gt = grad_shift_.contiguous(), scale = scale_.contiguous(),
               shift = shift_.contiguous();
  Tensor d_g = at::empty_like(p.g), d_b = at::empty_like(p.g), d_pg = at::empty_like(p.g), d_pb = at::empty_like(p.g);
  AT_DISPATCH_FLOATING_TYPES(p.g.scalar_type(), "ipu_norm::proxy_affine_backward", [&] {
    const std::vector<scalar_t> q = quantiles<scalar_t>(n);
    const scalar_t *pgm = p.g.data_ptr<scalar_t>(), *pbt = p.b.data_ptr<scalar_t>();
    const scalar_t *ppg = p.pg.data_ptr<scalar_t>(), *ppb = p.pb.data_ptr<scalar_t>(), *pq = q.data();
    const scalar_t *pgs = gs.data_ptr<scalar_t>(), *pgt = gt.data_ptr<scalar_t>();
    const scalar_t *ps = scale.data_ptr<scalar_t>(), *pt = shift.data_ptr<scalar_t>();
    scalar_t *o_g = d_g.data_ptr<scalar_t>(), *o_b = d_b.data_ptr<scalar_t>(), *o_pg = d_pg.data_ptr<scalar_t>(),
             *o_pb = d_pb.data_ptr<scalar_t>();
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      const int64_t blocks = (channels + kChannels - 1) / kChannels;
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t c0 = blk * kChannels, width = std::min(kChannels, channels - c0);
          scalar_t a[kChannels] = {}, c[kChannels] = {}, m[kChannels] = {}, wm[kChannels] = {}, wv[kChannels] = {};
          for (int64_t l = 0; l < width; ++l) {
            const int64_t ch = c0 + l;
            a[l] = pgm[ch] * (1 + ppg[ch]);
            c[l] = pgm[ch] * ppb[ch] + pbt[ch];
            const double s = ps[ch], mean = -static_cast<double>(pt[ch]) / s;
            const double d_mean = -s * pgt[ch], d_var = -0.5 * (pgs[ch] - mean * pgt[ch]) * s * s * s;
            m[l] = static_cast<scalar_t>(mean);
            wm[l] = static_cast<scalar_t>(d_mean / n);
            wv[l] = static_cast<scalar_t>(2 * d_var / n);
          }
          double d_a[kChannels], d_c[kChannels];
          block_stats_grad<A>(pq, n, a, c, m, wm, wv, d_a, d_c);
          for (int64_t l = 0; l < width; ++l) {
            const int64_t ch = c0 + l;
            o_g[ch] = static_cast<scalar_t>(d_a[l] * (1 + ppg[ch]) + d_c[l] * ppb[ch]);
            o_pg[ch] = static_cast<scalar_t>(d_a[l] * pgm[ch]);
            o_pb[ch] = static_cast<scalar_t>(d_c[l] * pgm[ch]);
            o_b[ch] = static_cast<scalar_t>(d_c[l]);
          }
        }
      });
    });
  });
  return {d_g, d_b, d_pg, d_pb};
}

// ---------------------------------------------------------------- PN-Act: phi(u) * scale + shift

Tensor pn_act_cpu(const Tensor& u_, const Tensor& scale_, const Tensor& shift_, c10::string_view act_name) {
  const Act act = parse_act(act_name);
  check_float(u_, "u");
  const Planes p = planes_of(u_);
  check_channel_vector(scale_, u_, p.c, "scale");
  check_channel_vector(shift_, u_, p.c, "shift");
  const Tensor u = u_.contiguous(), scale = scale_.contiguous(), shift = shift_.contiguous();
  Tensor out = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "ipu_norm::pn_act", [&] {
    const scalar_t *pu = u.data_ptr<scalar_t>(), *ps = scale.data_ptr<scalar_t>(), *pt = shift.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      at::parallel_for(0, p.n * p.c, plane_grain(p.s), [&](int64_t begin, int64_t end) {
        for_chunks(
            begin, end, p.s, [&](int64_t e0, int64_t len) { act_row<A>(pu + e0, po + e0, len); },
            [&](int64_t plane, int64_t e, int64_t len) { affine_row(po + e, len, ps[plane % p.c], pt[plane % p.c]); });
      });
    });
  });
  return out;
}

// Per-(n, c) partial sums in float64, then summed over n in index order (thread-count independent).
Tensor sum_over_batch(const Tensor& partial, const Tensor& like) {
  const int64_t n = partial.size(0), c = partial.size(1);
  Tensor out = at::empty({c}, like.options());
  const double* pp = partial.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "ipu_norm::sum_over_batch", [&] {
    scalar_t* po = out.data_ptr<scalar_t>();
    for (int64_t ch = 0; ch < c; ++ch) {
      double acc = 0;
      for (int64_t i = 0; i < n; ++i) acc += pp[i * c + ch];
      po[ch] = static_cast<scalar_t>(acc);
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> pn_act_backward_cpu(const Tensor& grad_out_, const Tensor& u_,
                                                       const Tensor& scale_, c10::string_view act_name) {
  const Act act = parse_act(act_name);
  check_float(u_, "u");
  TORCH_CHECK(grad_out_.sizes() == u_.sizes() && grad_out_.scalar_type() == u_.scalar_type(),
              "ipu_norm::pn_act_backward: grad_out must match u");
  const Planes p = planes_of(u_);
  check_channel_vector(scale_, u_, p.c, "scale");
  const Tensor g = grad_out_.contiguous(), u = u_.contiguous(), scale = scale_.contiguous();
  Tensor grad_u = at::empty_like(u);
  Tensor part_scale = at::empty({p.n, p.c}, u.options().dtype(at::kDouble));
  Tensor part_shift = at::empty({p.n, p.c}, u.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "ipu_norm::pn_act_backward", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>(), *ps = scale.data_ptr<scalar_t>();
    scalar_t* pgu = grad_u.data_ptr<scalar_t>();
    double *pps = part_scale.data_ptr<double>(), *ppt = part_shift.data_ptr<double>();
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      at::parallel_for(0, p.n * p.c, plane_grain(p.s), [&](int64_t begin, int64_t end) {
        std::fill(pps + begin, pps + end, 0.0);  // d out / d scale = phi(u), d out / d shift = 1
        std::fill(ppt + begin, ppt + end, 0.0);
        if (p.s >= kFusedPlane) {
          for (int64_t plane = begin; plane < end; ++plane) {
            const int64_t e = plane * p.s;
            act_grad_and_sums<A>(pg + e, pu + e, pgu + e, p.s, ps[plane % p.c], pps[plane], ppt[plane]);
          }
          return;
        }
        std::vector<scalar_t> z(kChunk), d(kChunk);
        int64_t chunk_start = 0;
        for_chunks(
            begin, end, p.s,
            [&](int64_t e0, int64_t len) {
              chunk_start = e0;
              act_grad_row<A>(pu + e0, z.data(), d.data(), len);
            },
            [&](int64_t plane, int64_t e, int64_t len) {
              const int64_t o = e - chunk_start;
              scaled_grad_and_sums(pg + e, z.data() + o, d.data() + o, pgu + e, len, ps[plane % p.c], pps[plane],
                                   ppt[plane]);
            });
      });
    });
  });
  return {grad_u, sum_over_batch(part_scale, u), sum_over_batch(part_shift, u)};
}

// ---------------------------------------------------------------- ReLU PN-Act with the scale folded: relu(u) + shift

Tensor relu_shift_cpu(const Tensor& u_, const Tensor& shift_) {
  check_float(u_, "u");
  const Planes p = planes_of(u_);
  check_channel_vector(shift_, u_, p.c, "shift");
  const Tensor u = u_.contiguous(), shift = shift_.contiguous();
  Tensor out = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "ipu_norm::relu_shift", [&] {
    const scalar_t *pu = u.data_ptr<scalar_t>(), *pt = shift.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, p.n * p.c, plane_grain(p.s), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t t = pt[plane % p.c];
        relu_shift_row(pu + plane * p.s, po + plane * p.s, p.s, t);
      }
    });
  });
  return out;
}

// From the output alone (what the next layer keeps anyway): relu'(u) = [out > shift], exact up to rounding at the
// kink, where ReLU's derivative is 0 by convention.
std::tuple<Tensor, Tensor> relu_shift_backward_cpu(const Tensor& grad_out_, const Tensor& out_, const Tensor& shift_) {
  check_float(out_, "out");
  TORCH_CHECK(grad_out_.sizes() == out_.sizes() && grad_out_.scalar_type() == out_.scalar_type(),
              "ipu_norm::relu_shift_backward: grad_out must match out");
  const Planes p = planes_of(out_);
  check_channel_vector(shift_, out_, p.c, "shift");
  const Tensor g = grad_out_.contiguous(), out = out_.contiguous(), shift = shift_.contiguous();
  Tensor grad_u = at::empty_like(out);
  Tensor part_shift = at::empty({p.n, p.c}, out.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ipu_norm::relu_shift_backward", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *po = out.data_ptr<scalar_t>(), *pt = shift.data_ptr<scalar_t>();
    scalar_t* pgu = grad_u.data_ptr<scalar_t>();
    double* ppt = part_shift.data_ptr<double>();
    at::parallel_for(0, p.n * p.c, plane_grain(p.s), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t t = pt[plane % p.c];
        const scalar_t* gp = pg + plane * p.s;
        relu_shift_grad_row(gp, po + plane * p.s, pgu + plane * p.s, p.s, t);
        ppt[plane] = sum_of(gp, p.s);
      }
    });
  });
  return {grad_u, sum_over_batch(part_shift, out)};
}

// ---------------------------------------------------------------- Meta kernels (shapes and dtypes only)

std::tuple<Tensor, Tensor> proxy_affine_meta(const Tensor& g, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                             c10::string_view act, double) {
  parse_act(act);
  return {at::empty_like(g), at::empty_like(g)};
}
std::tuple<Tensor, Tensor, Tensor, Tensor> proxy_affine_backward_meta(const Tensor&, const Tensor&, const Tensor& g,
                                                                      const Tensor&, const Tensor&, const Tensor&,
                                                                      const Tensor&, const Tensor&, int64_t,
                                                                      c10::string_view) {
  return {at::empty_like(g), at::empty_like(g), at::empty_like(g), at::empty_like(g)};
}
Tensor proxy_norm_act_meta(const Tensor& u, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                           c10::string_view act, double) {
  parse_act(act);
  return at::empty_like(u, at::MemoryFormat::Contiguous);
}
Tensor pn_act_meta(const Tensor& u, const Tensor&, const Tensor&, c10::string_view act) {
  parse_act(act);
  return at::empty_like(u, at::MemoryFormat::Contiguous);
}
std::tuple<Tensor, Tensor, Tensor> pn_act_backward_meta(const Tensor&, const Tensor& u, const Tensor& scale,
                                                        c10::string_view) {
  return {at::empty_like(u, at::MemoryFormat::Contiguous), at::empty_like(scale), at::empty_like(scale)};
}
Tensor relu_shift_meta(const Tensor& u, const Tensor&) { return at::empty_like(u, at::MemoryFormat::Contiguous); }
std::tuple<Tensor, Tensor> relu_shift_backward_meta(const Tensor&, const Tensor& out, const Tensor& shift) {
  return {at::empty_like(out, at::MemoryFormat::Contiguous), at::empty_like(shift)};
}

// ---------------------------------------------------------------- differentiable ATen forms (create_graph only)

Tensor channel_view(const Tensor& v, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = -1;
  return v.view(shape);
}

std::vector<int64_t> non_channel_dims(int64_t dim) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < dim; ++d) dims.push_back(d);
  return dims;
}

// (phi(u), phi'(u)) with differentiable ATen ops.
std::pair<Tensor, Tensor> act_and_grad_aten(const Tensor& u, Act act) {
  switch (act) {
    case Act::Relu: {
      const Tensor mask = (u > 0).to(u.scalar_type());
      return {u * mask, mask};
    }
    case Act::Silu: {
      const Tensor s = at::sigmoid(u);
      return {u * s, s * (1 + u * (1 - s))};
    }
    case Act::Gelu: {
      const Tensor cdf = 0.5 * (1 + at::erf(u * M_SQRT1_2));
      return {u * cdf, cdf + u * at::exp(-0.5 * u * u) * (0.5 * M_2_SQRTPI * M_SQRT1_2)};
    }
    case Act::Identity:
      return {u, at::ones_like(u)};
  }
  TORCH_CHECK(false, "unreachable");
}

// (scale, shift) of the proxy affine with differentiable ATen ops.
std::pair<Tensor, Tensor> proxy_affine_aten(const Tensor& g, const Tensor& b, const Tensor& pg, const Tensor& pb,
                                            int64_t n, Act act, double eps) {
  const Tensor q = quantiles_tensor(n, g);
  auto [z, d] = act_and_grad_aten(at::addmm((g * pb + b).unsqueeze(1), (g * (1 + pg)).unsqueeze(1), q.unsqueeze(0)), act);
  const Tensor mean = z.mean(1), scale = at::rsqrt((z - mean.unsqueeze(1)).square().mean(1) + eps);
  return {scale, -mean * scale};
}

// The four parameter gradients of the proxy affine given those of (scale, shift), differentiable (create_graph).
variable_list proxy_affine_grad_aten(const Tensor& gs, const Tensor& gt, const Tensor& g, const Tensor& b,
                                     const Tensor& pg, const Tensor& pb, int64_t n, Act act, double eps) {
  const Tensor q = quantiles_tensor(n, g);
  const Tensor a = g * (1 + pg), c = g * pb + b;
  auto [z, d] = act_and_grad_aten(at::addmm(c.unsqueeze(1), a.unsqueeze(1), q.unsqueeze(0)), act);
  const Tensor mean = z.mean(1, /*keepdim=*/true), zc = z - mean;
  const Tensor s = at::rsqrt(zc.square().mean(1) + eps), m = mean.squeeze(1);
  const Tensor d_mean = -s * gt, d_var = -0.5 * (gs - m * gt) * s.pow(3);
  const double nn = static_cast<double>(n);
  const Tensor gu = d * (d_mean.unsqueeze(1) / nn + (2.0 / nn) * d_var.unsqueeze(1) * zc);
  const Tensor d_a = at::mv(gu, q), d_c = gu.sum(1);
  return {d_a * (1 + pg) + d_c * pb, d_c, d_a * g, d_c * g};
}

// ---------------------------------------------------------------- Autograd kernels


template <typename Ret, typename... Args>
auto op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Ret(Args...)>();
}

using CT = const Tensor&;
using SV = c10::string_view;

auto& proxy_affine_op() {
  static auto op = op_handle<std::tuple<Tensor, Tensor>, CT, CT, CT, CT, int64_t, SV, double>("ipu_norm::proxy_affine");
  return op;
}
auto& proxy_affine_backward_op() {
  static auto op = op_handle<std::tuple<Tensor, Tensor, Tensor, Tensor>, CT, CT, CT, CT, CT, CT, CT, CT, int64_t, SV>(
      "ipu_norm::proxy_affine_backward");
  return op;
}
auto& pn_act_op() {
  static auto op = op_handle<Tensor, CT, CT, CT, SV>("ipu_norm::pn_act");
  return op;
}
auto& pn_act_backward_op() {
  static auto op = op_handle<std::tuple<Tensor, Tensor, Tensor>, CT, CT, CT, SV>("ipu_norm::pn_act_backward");
  return op;
}
auto& relu_shift_op() {
  static auto op = op_handle<Tensor, CT, CT>("ipu_norm::relu_shift");
  return op;
}
auto& relu_shift_backward_op() {
  static auto op = op_handle<std::tuple<Tensor, Tensor>, CT, CT, CT>("ipu_norm::relu_shift_backward");
  return op;
}

Tensor defined_or_zeros(const Tensor& g, const Tensor& like) { return g.defined() ? g : at::zeros_like(like); }

class ProxyAffineFunction : public torch::autograd::Function<ProxyAffineFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& g, const Tensor& b, const Tensor& pg,
                               const Tensor& pb, int64_t n, const std::string& act, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [scale, shift] = proxy_affine_op().call(g, b, pg, pb, n, act, eps);
    ctx->save_for_backward({g, b, pg, pb, scale, shift});
    ctx->saved_data["n"] = n;
    ctx->saved_data["act"] = act;
    ctx->saved_data["eps"] = eps;
    return {scale, shift};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const Tensor &g = v[0], &b = v[1], &pg = v[2], &pb = v[3], &scale = v[4], &shift = v[5];
    const int64_t n = ctx->saved_data["n"].toInt();
    const std::string act = ctx->saved_data["act"].toStringRef();
    const Tensor gs = defined_or_zeros(grads[0], scale), gt = defined_or_zeros(grads[1], scale);
    variable_list out;
    if (at::GradMode::is_enabled()) {  // create_graph: the same gradient with differentiable ATen ops
      out = proxy_affine_grad_aten(gs, gt, g, b, pg, pb, n, parse_act(act), ctx->saved_data["eps"].toDouble());
    } else {
      auto [d_g, d_b, d_pg, d_pb] = proxy_affine_backward_op().call(gs, gt, g, b, pg, pb, scale, shift, n, act);
      out = {d_g, d_b, d_pg, d_pb};
    }
    out.resize(7);  // no gradient for n, act, eps
    return out;
  }
};

// phi(u) * scale + shift with (scale, shift) the proxy affine of (gamma, beta, gamma~, beta~): one autograd node for
// the whole PN-Act, saving u and the four (C,) parameters (and the two (C,) results).
class ProxyNormActFunction : public torch::autograd::Function<ProxyNormActFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& u, const Tensor& g, const Tensor& b, const Tensor& pg,
                        const Tensor& pb, int64_t n, const std::string& act, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [scale, shift] = proxy_affine_op().call(g, b, pg, pb, n, act, eps);
    Tensor out = pn_act_op().call(u, scale, shift, act);
    ctx->save_for_backward({u, g, b, pg, pb, scale, shift});
    ctx->saved_data["n"] = n;
    ctx->saved_data["act"] = act;
    ctx->saved_data["eps"] = eps;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const Tensor &u = v[0], &g = v[1], &b = v[2], &pg = v[3], &pb = v[4], &scale = v[5], &shift = v[6];
    const int64_t n = ctx->saved_data["n"].toInt();
    const std::string act = ctx->saved_data["act"].toStringRef();
    const double eps = ctx->saved_data["eps"].toDouble();
    if (!grads[0].defined()) return variable_list(8);
    const Tensor& grad = grads[0];
    variable_list out;
    if (at::GradMode::is_enabled()) {
      const Act a = parse_act(act);
      auto [s, t] = proxy_affine_aten(g, b, pg, pb, n, a, eps);
      auto [z, d] = act_and_grad_aten(u, a);
      const auto dims = non_channel_dims(u.dim());
      out = {grad * channel_view(s, u.dim()) * d};
      for (const Tensor& p : proxy_affine_grad_aten((grad * z).sum(dims), grad.sum(dims), g, b, pg, pb, n, a, eps))
        out.push_back(p);
    } else {
      auto [gu, gs, gt] = pn_act_backward_op().call(grad, u, scale, act);
      auto [d_g, d_b, d_pg, d_pb] = proxy_affine_backward_op().call(gs, gt, g, b, pg, pb, scale, shift, n, act);
      out = {gu, d_g, d_b, d_pg, d_pb};
    }
    out.resize(8);
    return out;
  }
};

class PnActFunction : public torch::autograd::Function<PnActFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& u, const Tensor& scale, const Tensor& shift,
                        const std::string& act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({u, scale});  // u only: phi(u) and phi'(u) are recomputed in backward
    ctx->saved_data["act"] = act;
    return pn_act_op().call(u, scale, shift, act);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &u = saved[0], &scale = saved[1];
    const std::string act = ctx->saved_data["act"].toStringRef();
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    if (at::GradMode::is_enabled()) {
      auto [z, d] = act_and_grad_aten(u, parse_act(act));
      const Tensor& g = grads[0];
      const auto dims = non_channel_dims(u.dim());
      return {g * channel_view(scale, u.dim()) * d, (g * z).sum(dims), g.sum(dims), Tensor()};
    }
    auto [gu, gs, gt] = pn_act_backward_op().call(grads[0], u, scale, act);
    return {gu, gs, gt, Tensor()};
  }
};

class ReluShiftFunction : public torch::autograd::Function<ReluShiftFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& u, const Tensor& shift) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = relu_shift_op().call(u, shift);
    ctx->save_for_backward({out, shift});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &out = saved[0], &shift = saved[1];
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    if (at::GradMode::is_enabled()) {
      const Tensor& g = grads[0];
      const Tensor mask = (out > channel_view(shift, out.dim())).to(g.scalar_type());
      return {g * mask, g.sum(non_channel_dims(out.dim()))};
    }
    auto [gu, gt] = relu_shift_backward_op().call(grads[0], out, shift);
    return {gu, gt};
  }
};

std::tuple<Tensor, Tensor> proxy_affine_autograd(const Tensor& g, const Tensor& b, const Tensor& pg, const Tensor& pb,
                                                 int64_t n, c10::string_view act, double eps) {
  auto r = ProxyAffineFunction::apply(g, b, pg, pb, n, std::string(act), eps);
  return {r[0], r[1]};
}
Tensor proxy_norm_act_autograd(const Tensor& u, const Tensor& g, const Tensor& b, const Tensor& pg, const Tensor& pb,
                               int64_t n, c10::string_view act, double eps) {
  return ProxyNormActFunction::apply(u, g, b, pg, pb, n, std::string(act), eps);
}
// Without autograd (inference, no_grad): the two kernels.
Tensor proxy_norm_act_cpu(const Tensor& u, const Tensor& g, const Tensor& b, const Tensor& pg, const Tensor& pb,
                          int64_t n, c10::string_view act, double eps) {
  auto [scale, shift] = proxy_affine_op().call(g, b, pg, pb, n, act, eps);
  return pn_act_op().call(u, scale, shift, act);
}
Tensor pn_act_autograd(const Tensor& u, const Tensor& scale, const Tensor& shift, c10::string_view act) {
  return PnActFunction::apply(u, scale, shift, std::string(act));
}
Tensor relu_shift_autograd(const Tensor& u, const Tensor& shift) { return ReluShiftFunction::apply(u, shift); }

}  // namespace

TORCH_LIBRARY(ipu_norm, m) {
  m.def("proxy_affine(Tensor gamma, Tensor beta, Tensor proxy_gamma, Tensor proxy_beta, int num_quantiles, str act, "
        "float eps) -> (Tensor, Tensor)");
  m.def("proxy_affine_backward(Tensor grad_scale, Tensor grad_shift, Tensor gamma, Tensor beta, Tensor proxy_gamma, "
        "Tensor proxy_beta, Tensor scale, Tensor shift, int num_quantiles, str act) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("proxy_norm_act(Tensor u, Tensor gamma, Tensor beta, Tensor proxy_gamma, Tensor proxy_beta, int num_quantiles, "
        "str act, float eps) -> Tensor");
  m.def("pn_act(Tensor u, Tensor scale, Tensor shift, str act) -> Tensor");
  m.def("pn_act_backward(Tensor grad_out, Tensor u, Tensor scale, str act) -> (Tensor, Tensor, Tensor)");
  m.def("relu_shift(Tensor u, Tensor shift) -> Tensor");
  m.def("relu_shift_backward(Tensor grad_out, Tensor out, Tensor shift) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ipu_norm, CPU, m) {
  m.impl("proxy_affine", proxy_affine_cpu);
  m.impl("proxy_norm_act", proxy_norm_act_cpu);
  m.impl("proxy_affine_backward", proxy_affine_backward_cpu);
  m.impl("pn_act", pn_act_cpu);
  m.impl("pn_act_backward", pn_act_backward_cpu);
  m.impl("relu_shift", relu_shift_cpu);
  m.impl("relu_shift_backward", relu_shift_backward_cpu);
}

TORCH_LIBRARY_IMPL(ipu_norm, Meta, m) {
  m.impl("proxy_affine", proxy_affine_meta);
  m.impl("proxy_norm_act", proxy_norm_act_meta);
  m.impl("proxy_affine_backward", proxy_affine_backward_meta);
  m.impl("pn_act", pn_act_meta);
  m.impl("pn_act_backward", pn_act_backward_meta);
  m.impl("relu_shift", relu_shift_meta);
  m.impl("relu_shift_backward", relu_shift_backward_meta);
}

TORCH_LIBRARY_IMPL(ipu_norm, Autograd, m) {
  m.impl("proxy_affine", proxy_affine_autograd);
  m.impl("proxy_norm_act", proxy_norm_act_autograd);
  m.impl("pn_act", pn_act_autograd);
  m.impl("relu_shift", relu_shift_autograd);
}

}  // namespace ipu_norm
