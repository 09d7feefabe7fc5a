/* Fused GroupNorm + activation (+ Proxy Norm's per-channel scale/shift) on CPU, for SiLU and GELU.
 *
 * Layout: x, out, grad_out, grad_x contiguous (N, C, S), S = prod(spatial); groups of cg = C / G consecutive
 * channels, so one (sample, group) block of m = cg * S values is contiguous and (at CNN sizes) fits in L2:
 *   forward:  mean, rstd per block (two-pass), y = x * (rstd gamma[c]) + (beta[c] - mean rstd gamma[c])
 *             (ATen's CPU GroupNorm form), out = phi(y) * scale[c] + shift[c] (scale/shift null: 1 and 0).
 *   backward: dy = grad_out * scale[c] * phi'(y);  d scale[c] = sum grad_out phi(y), d shift[c] = sum grad_out,
 *             d gamma[c] = sum dy xhat, d beta[c] = sum dy, xhat = (x - mean) rstd, and GroupNorm's input
 *             gradient grad_x = rstd (dy gamma - mean_block(dy gamma) - xhat mean_block(dy gamma xhat)).
 * Each block is read once from memory per pass that needs it and then from cache, where ATen's GroupNorm,
 * activation and Proxy Norm kernels each make their own pass over full-size tensors (and the activation saves
 * its input for backward; here only x and the per-block mean/rstd are kept). phi: act 1 = SiLU, act 2 = GELU
 * (exact erf form). Single-threaded; built with pn_act_cpu.c by ipu_norm/ops/pn_act_cpu.py. Per-plane partial
 * sums are vectorised in T and folded into double accumulators.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define GN_SQRT1_2 0.70710678118654752440
#define GN_INV_SQRT_2PI 0.39894228040143267794

#define DEFINE_GN_ACT(T, SUFFIX, EXP, ERF)                                                                       \
static inline T gn_sig_##SUFFIX(T y) {                                                                           \
    T a = -y;                                                                                                    \
    a = a > (T)80 ? (T)80 : a; /* exp stays finite (fast-math assumes no inf) */                                 \
    return (T)1 / ((T)1 + EXP(a));                                                                               \
}                                                                                                                \
void gn_act_forward_##SUFFIX(const T *x, T *out, const T *gamma, const T *beta, const T *scale, const T *shift, \
                             T *mean_out, T *rstd_out, int64_t n, int64_t c, int64_t s, int64_t groups,         \
                             double eps, int act) {                                                              \
    const int64_t cg = c / groups, m = cg * s;                                                                   \
    for (int64_t b = 0; b < n; ++b) {                                                                            \
        for (int64_t gi = 0; gi < groups; ++gi) {                                                                \
            const int64_t base = (b * c + gi * cg) * s;                                                          \
            const T *xb = x + base;                                                                              \
            double sum = 0.0;                                                                                    \
            for (int64_t j = 0; j < cg; ++j) {                                                                   \
                const T *xr = xb + j * s;                                                                        \
                T ps = 0;                                                                                        \
                for (int64_t i = 0; i < s; ++i) ps += xr[i];                                                     \
                sum += (double)ps;                                                                               \
            }                                                                                                    \
            const T mu = (T)(sum / (double)m);                                                                   \
            double ss = 0.0;                                                                                     \
            for (int64_t j = 0; j < cg; ++j) { /* two-pass variance: the block is in cache now */              \
                const T *xr = xb + j * s;                                                                        \
                T pss = 0;                                                                                       \
                for (int64_t i = 0; i < s; ++i) { T e = xr[i] - mu; pss += e * e; }                              \
                ss += (double)pss;                                                                               \
            }                                                                                                    \
            const T rs = (T)(1.0 / sqrt(ss / (double)m + eps));                                                  \
            mean_out[b * groups + gi] = mu;                                                                      \
            rstd_out[b * groups + gi] = rs;                                                                      \
            for (int64_t j = 0; j < cg; ++j) {                                                                   \
                const int64_t ch = gi * cg + j;                                                                  \
                const T a = rs * gamma[ch], bb = beta[ch] - mu * a;                                              \
                const T sc = scale ? scale[ch] : (T)1, sh = shift ? shift[ch] : (T)0;                            \
                const T *xr = xb + j * s;                                                                        \
                T *op = out + base + j * s;                                                                      \
                if (act == 1) {                                                                                  \
                    for (int64_t i = 0; i < s; ++i) { T y = xr[i] * a + bb; op[i] = y * gn_sig_##SUFFIX(y) * sc + sh; } \
                } else {                                                                                         \
                    for (int64_t i = 0; i < s; ++i) {                                                            \
                        T y = xr[i] * a + bb; op[i] = y * (T)0.5 * ((T)1 + ERF(y * (T)GN_SQRT1_2)) * sc + sh;    \
                    }                                                                                            \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
}                                                                                                                \
/* acc: caller-provided workspace of 4 * c doubles. d_scale/d_shift may be null (no Proxy Norm). */             \
void gn_act_backward_##SUFFIX(const T *g, const T *x, T *grad_x, const T *gamma, const T *beta, const T *scale,  \
                              const T *mean, const T *rstd, T *d_gamma, T *d_beta, T *d_scale, T *d_shift,      \
                              double *acc, int64_t n, int64_t c, int64_t s, int64_t groups, int act) {          \
    const int64_t cg = c / groups, m = cg * s;                                                                   \
    memset(acc, 0, sizeof(double) * 4 * c);                                                                      \
    double *a_gz = acc, *a_g = acc + c, *a_dyx = acc + 2 * c, *a_dy = acc + 3 * c;                               \
    for (int64_t b = 0; b < n; ++b) {                                                                            \
        for (int64_t gi = 0; gi < groups; ++gi) {                                                                \
            const int64_t base = (b * c + gi * cg) * s;                                                          \
            const T mu = mean[b * groups + gi], rs = rstd[b * groups + gi];                                      \
            double s1 = 0.0, s2 = 0.0; /* block sums of dy gamma and dy gamma xhat */                           \
            for (int64_t j = 0; j < cg; ++j) {                                                                   \
                const int64_t ch = gi * cg + j, off = base + j * s;                                              \
                const T gam = gamma[ch], a = rs * gam, bb = beta[ch] - mu * a;                                   \
                const T sc = scale ? scale[ch] : (T)1;                                                           \
                const T *xr = x + off, *gr = g + off;                                                            \
                T *dr = grad_x + off;                                                                            \
                T pgz = 0, pg = 0, pdyx = 0, pdy = 0;                                                            \
                if (act == 1) {                                                                                  \
                    for (int64_t i = 0; i < s; ++i) {                                                            \
                        T xv = xr[i], y = xv * a + bb, sg = gn_sig_##SUFFIX(y), gv = gr[i];                      \
                        T dy = gv * sc * (sg * ((T)1 + y * ((T)1 - sg)));                                        \
                        pgz += gv * y * sg; pg += gv;                                                            \
                        dr[i] = dy; /* grad_x holds dy until the second pass */                                  \
                        pdyx += dy * ((xv - mu) * rs); pdy += dy;                                                \
                    }                                                                                            \
                } else {                                                                                         \
                    for (int64_t i = 0; i < s; ++i) {                                                            \
                        T xv = xr[i], y = xv * a + bb, gv = gr[i];                                               \
                        T cdf = (T)0.5 * ((T)1 + ERF(y * (T)GN_SQRT1_2));                                        \
                        T pdf = EXP((T)-0.5 * y * y) * (T)GN_INV_SQRT_2PI;                                       \
                        T dy = gv * sc * (cdf + y * pdf);                                                        \
                        pgz += gv * y * cdf; pg += gv;                                                           \
                        dr[i] = dy;                                                                              \
                        pdyx += dy * ((xv - mu) * rs); pdy += dy;                                                \
                    }                                                                                            \
                }                                                                                                \
                a_gz[ch] += (double)pgz; a_g[ch] += (double)pg;                                                  \
                a_dyx[ch] += (double)pdyx; a_dy[ch] += (double)pdy;                                              \
                s1 += (double)gam * (double)pdy;                                                                 \
                s2 += (double)gam * (double)pdyx;                                                                \
            }                                                                                                    \
            const T k1 = (T)(s1 / (double)m), k2 = (T)(s2 / (double)m);                                          \
            for (int64_t j = 0; j < cg; ++j) {                                                                   \
                const int64_t ch = gi * cg + j, off = base + j * s;                                              \
                const T gam = gamma[ch];                                                                         \
                const T *xr = x + off;                                                                           \
                T *dr = grad_x + off;                                                                            \
                for (int64_t i = 0; i < s; ++i) dr[i] = rs * (dr[i] * gam - k1 - ((xr[i] - mu) * rs) * k2);      \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    for (int64_t ch = 0; ch < c; ++ch) {                                                                         \
        d_gamma[ch] = (T)a_dyx[ch];                                                                              \
        d_beta[ch] = (T)a_dy[ch];                                                                                \
        if (d_scale) d_scale[ch] = (T)a_gz[ch];                                                                  \
        if (d_shift) d_shift[ch] = (T)a_g[ch];                                                                   \
    }                                                                                                            \
}

DEFINE_GN_ACT(float, f32, expf, erff)
DEFINE_GN_ACT(double, f64, exp, erf)
