/* Fused Proxy Norm activation (PN-Act) for SiLU and GELU on CPU: one pass forward, one pass backward.
 *
 * Layout: u, out, grad_out, grad_u are contiguous (N, C, S) with S = prod(spatial); scale/shift are (C,).
 *   forward:  out = phi(u) * scale[c] + shift[c]
 *   backward: grad_u = grad_out * scale[c] * phi'(u);  gsz[c] = sum grad_out * phi(u);  gs[c] = sum grad_out
 * phi: act 1 = SiLU, act 2 = GELU (exact erf form). The same math as ipu_norm.layers.proxy_norm._ProxyNormActFn
 * (ATen path); built at first use by ipu_norm/ops/cpu_kernels.py with -O3 -march=native -ffast-math so that GCC
 * vectorises expf/erff with glibc's libmvec. Single-threaded. Per-plane sums are folded into double accumulators.
 */
#include <math.h>
#include <stdint.h>

#define SQRT1_2 0.70710678118654752440
#define INV_SQRT_2PI 0.39894228040143267794

#define DEFINE_KERNELS(T, SUFFIX, EXP, ERF)                                                                      \
static inline T sig_##SUFFIX(T u) {                                                                              \
    T a = -u;                                                                                                    \
    a = a > (T)80 ? (T)80 : a; /* exp stays finite (fast-math assumes no inf); sigmoid(-80) is 0 in float */  \
    return (T)1 / ((T)1 + EXP(a));                                                                               \
}                                                                                                                \
void pn_act_forward_##SUFFIX(const T *u, T *out, const T *scale, const T *shift, int64_t n, int64_t c,           \
                             int64_t s, int act, int nthreads) {                                                 \
    (void)nthreads; /* single-threaded: the caller uses ATen's parallel path when torch has more threads */ \
    for (int64_t p = 0; p < n * c; ++p) {                                                                        \
        const T sc = scale[p % c], sh = shift[p % c];                                                            \
        const T *up = u + p * s;                                                                                 \
        T *op = out + p * s;                                                                                     \
        if (act == 1) {                                                                                          \
            for (int64_t i = 0; i < s; ++i) { T x = up[i]; op[i] = x * sig_##SUFFIX(x) * sc + sh; }              \
        } else {                                                                                                 \
            for (int64_t i = 0; i < s; ++i) {                                                                    \
                T x = up[i]; op[i] = x * (T)0.5 * ((T)1 + ERF(x * (T)SQRT1_2)) * sc + sh;                        \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
}                                                                                                                \
void pn_act_backward_##SUFFIX(const T *g, const T *u, T *grad_u, const T *scale, double *gsz, double *gs,       \
                              int64_t n, int64_t c, int64_t s, int act, int nthreads) {                          \
    (void)nthreads; /* single-threaded: the caller uses ATen's parallel path when torch has more threads */ \
    for (int64_t ch = 0; ch < c; ++ch) {                                                                         \
        const T sc = scale[ch];                                                                                  \
        double acc_gz = 0.0, acc_g = 0.0;                                                                        \
        for (int64_t b = 0; b < n; ++b) {                                                                        \
            const int64_t off = (b * c + ch) * s;                                                                \
            const T *gp = g + off, *up = u + off;                                                                \
            T *dp = grad_u + off;                                                                                \
            T pz = 0, pg = 0; /* per-plane partial sums in T (vectorised), folded into double per plane */      \
            if (act == 1) {                                                                                      \
                for (int64_t i = 0; i < s; ++i) {                                                                \
                    T x = up[i], gi = gp[i], sg = sig_##SUFFIX(x);                                               \
                    dp[i] = gi * sc * (sg * ((T)1 + x * ((T)1 - sg)));                                           \
                    pz += gi * x * sg;                                                                           \
                    pg += gi;                                                                                    \
                }                                                                                                \
            } else {                                                                                             \
                for (int64_t i = 0; i < s; ++i) {                                                                \
                    T x = up[i], gi = gp[i];                                                                     \
                    T cdf = (T)0.5 * ((T)1 + ERF(x * (T)SQRT1_2));                                               \
                    T pdf = EXP((T)-0.5 * x * x) * (T)INV_SQRT_2PI;                                              \
                    dp[i] = gi * sc * (cdf + x * pdf);                                                           \
                    pz += gi * x * cdf;                                                                          \
                    pg += gi;                                                                                    \
                }                                                                                                \
            }                                                                                                    \
            acc_gz += (double)pz;                                                                                \
            acc_g += (double)pg;                                                                                 \
        }                                                                                                        \
        gsz[ch] = acc_gz;                                                                                        \
        gs[ch] = acc_g;                                                                                          \
    }                                                                                                            \
}

DEFINE_KERNELS(float, f32, expf, erff)
DEFINE_KERNELS(double, f64, exp, erf)

/* ReLU PN-Act once the PN scale is folded into GroupNorm's affine (ipu_norm.layers.proxy_norm.relu_add_shift):
 *   forward:  out = max(u, 0) + shift[c]
 *   backward: grad_u = grad_out where out - shift[c] > 0 (else 0, as threshold_backward), gs[c] = sum grad_out
 * The backward reads the saved output only (the ReLU mask is out > shift). */
#define DEFINE_RELU_SHIFT(T, SUFFIX)                                                                             \
void relu_shift_forward_##SUFFIX(const T *u, T *out, const T *shift, int64_t n, int64_t c, int64_t s) {          \
    for (int64_t p = 0; p < n * c; ++p) {                                                                        \
        const T sh = shift[p % c];                                                                               \
        const T *up = u + p * s;                                                                                 \
        T *op = out + p * s;                                                                                     \
        for (int64_t i = 0; i < s; ++i) { T x = up[i]; op[i] = (x > 0 ? x : 0) + sh; }                           \
    }                                                                                                            \
}                                                                                                                \
void relu_shift_backward_##SUFFIX(const T *g, const T *out, T *grad_u, const T *shift, double *gs, int64_t n,    \
                                  int64_t c, int64_t s) {                                                        \
    for (int64_t ch = 0; ch < c; ++ch) {                                                                         \
        const T sh = shift[ch];                                                                                  \
        double acc = 0.0;                                                                                        \
        for (int64_t b = 0; b < n; ++b) {                                                                        \
            const int64_t off = (b * c + ch) * s;                                                                \
            const T *gp = g + off, *op = out + off;                                                              \
            T *dp = grad_u + off;                                                                                \
            T pg = 0;                                                                                            \
            for (int64_t i = 0; i < s; ++i) { T gi = gp[i]; dp[i] = (op[i] - sh > 0) ? gi : 0; pg += gi; }      \
            acc += (double)pg;                                                                                   \
        }                                                                                                        \
        gs[ch] = acc;                                                                                            \
    }                                                                                                            \
}

DEFINE_RELU_SHIFT(float, f32)
DEFINE_RELU_SHIFT(double, f64)
