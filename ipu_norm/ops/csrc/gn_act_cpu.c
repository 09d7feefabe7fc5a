/* Fused GroupNorm + activation (+ Proxy Norm's per-channel scale/shift) on CPU, for ReLU, SiLU and GELU.
 *
 * Layout: x, out, grad_out, grad_x contiguous (N, C, S), S = prod(spatial); groups of cg = C / G consecutive
 * channels, so one (sample, group) block of m = cg * S values is contiguous and (at CNN sizes) fits in L2:
 *   forward:  mean, rstd per block (two-pass), y = x * (rstd gamma[c]) + (beta[c] - mean rstd gamma[c])
 *             (ATen's CPU GroupNorm form), out = phi(y) * scale[c] + shift[c] (scale/shift null: 1 and 0).
 *   backward: dy = grad_out * scale[c] * phi'(y);  d scale[c] = sum grad_out phi(y), d shift[c] = sum grad_out,
 *             d gamma[c] = sum dy xhat, d beta[c] = sum dy, xhat = (x - mean) rstd, and GroupNorm's input
 *             gradient grad_x = rstd (dy gamma - mean_block(dy gamma) - xhat mean_block(dy gamma xhat)).
 * The activation and its derivative run in one loop over the whole block (vectorised expf/erff even where a
 * channel's plane is shorter than a vector: late CNN stages have 3x3 or 6x6 planes); the per-channel work
 * (affine, scale/shift, sums) is multiply-adds. Each block is read from memory once per pass that needs it and
 * then from cache, where ATen's GroupNorm, activation and Proxy Norm kernels each make their own pass over
 * full-size tensors (and the activation saves its input for backward; here only x and the per-block mean/rstd
 * are kept). phi: act 0 = ReLU (phi'(0) = 0, as torch.relu's backward), act 1 = SiLU, act 2 = GELU (exact erf
 * form). Single-threaded; built with the other csrc files by ipu_norm/ops/cpu_kernels.py. Per-plane partial sums
 * are vectorised in T and folded into double accumulators.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define GN_SQRT1_2 0.70710678118654752440
#define GN_INV_SQRT_2PI 0.39894228040143267794

/* Channels per chunk of the activation loop: enough for ~2048 values (long vector loops on small planes), one
 * channel on planes that are long already (the chunk then stays in L1/L2 between its loops). */
#define GN_CHUNK 2048
static inline int64_t gn_chunk_channels(int64_t cg, int64_t s) {
    const int64_t cpc = s >= GN_CHUNK ? 1 : GN_CHUNK / (s > 0 ? s : 1);
    return cpc < cg ? cpc : cg;
}
/* Workspace values of T that gn_act_backward_* needs for planes of s values in groups of cg channels. */
int64_t gn_act_work_size(int64_t cg, int64_t s) { return 2 * gn_chunk_channels(cg, s) * s; }
/* Bytes of the backward's one scratch buffer (both callers, cpu_kernels.py and gn_act_op.cpp, allocate it this way):
 * the 4 c double accumulators, then gn_act_work_size(cg, s) values of itemsize bytes at *work_offset (64-byte
 * aligned). */
int64_t gn_act_scratch_bytes(int64_t c, int64_t cg, int64_t s, int64_t itemsize, int64_t *work_offset) {
    const int64_t acc = (4 * c * (int64_t)sizeof(double) + 63) / 64 * 64;
    *work_offset = acc;
    return acc + gn_act_work_size(cg, s) * itemsize;
}

#define DEFINE_GN_ACT(T, SUFFIX, EXP, ERF)                                                                       \
static inline T gn_sig_##SUFFIX(T v) {                                                                           \
    T a = -v;                                                                                                    \
    a = a > (T)80 ? (T)80 : a; /* exp stays finite (fast-math assumes no inf) */                                 \
    return (T)1 / ((T)1 + EXP(a));                                                                               \
}                                                                                                                \
/* z[k] = phi(y[k]) in place, and d[k] = phi'(y[k]) when d is not null, over one contiguous block (separate      \
 * loops per case: a branch inside would stop GCC from vectorising them). */                                     \
static void gn_phi_##SUFFIX(int act, T *restrict y, T *restrict d, int64_t m) {                                  \
    if (act == 0 && d) {                                                                                         \
        for (int64_t k = 0; k < m; ++k) { T v = y[k]; d[k] = v > 0 ? (T)1 : (T)0; y[k] = v > 0 ? v : (T)0; }   \
    } else if (act == 0) {                                                                                       \
        for (int64_t k = 0; k < m; ++k) { T v = y[k]; y[k] = v > 0 ? v : (T)0; }                                \
    } else if (act == 1 && d) {                                                                                  \
        for (int64_t k = 0; k < m; ++k) {                                                                        \
            T v = y[k], sg = gn_sig_##SUFFIX(v);                                                                 \
            d[k] = sg * ((T)1 + v * ((T)1 - sg));                                                                \
            y[k] = v * sg;                                                                                       \
        }                                                                                                        \
    } else if (act == 1) {                                                                                       \
        for (int64_t k = 0; k < m; ++k) { T v = y[k]; y[k] = v * gn_sig_##SUFFIX(v); }                           \
    } else if (d) {                                                                                              \
        for (int64_t k = 0; k < m; ++k) {                                                                        \
            T v = y[k], cdf = (T)0.5 * ((T)1 + ERF(v * (T)GN_SQRT1_2));                                          \
            d[k] = cdf + v * EXP((T)-0.5 * v * v) * (T)GN_INV_SQRT_2PI;                                          \
            y[k] = v * cdf;                                                                                      \
        }                                                                                                        \
    } else {                                                                                                     \
        for (int64_t k = 0; k < m; ++k) { T v = y[k]; y[k] = v * (T)0.5 * ((T)1 + ERF(v * (T)GN_SQRT1_2)); }    \
    }                                                                                                            \
}                                                                                                                \
/* mean and rstd of one contiguous block of m values (two-pass; the second pass reads it from cache). Partial   \
 * sums are vectorised in T over chunks of 4096 values and folded into double. */                               \
static void gn_moments_##SUFFIX(const T *xb, int64_t m, double eps, T *mu_out, T *rs_out) {                      \
    double sum = 0.0, ss = 0.0;                                                                                  \
    for (int64_t k0 = 0; k0 < m; k0 += 4096) {                                                                   \
        const int64_t k1 = k0 + 4096 < m ? k0 + 4096 : m;                                                        \
        T ps = 0;                                                                                                \
        for (int64_t k = k0; k < k1; ++k) ps += xb[k];                                                           \
        sum += (double)ps;                                                                                       \
    }                                                                                                            \
    const T mu = (T)(sum / (double)m);                                                                           \
    for (int64_t k0 = 0; k0 < m; k0 += 4096) {                                                                   \
        const int64_t k1 = k0 + 4096 < m ? k0 + 4096 : m;                                                        \
        T pss = 0;                                                                                               \
        for (int64_t k = k0; k < k1; ++k) { T e = xb[k] - mu; pss += e * e; }                                    \
        ss += (double)pss;                                                                                       \
    }                                                                                                            \
    *mu_out = mu;                                                                                                \
    *rs_out = (T)(1.0 / sqrt(ss / (double)m + eps));                                                             \
}                                                                                                                \
void gn_act_forward_##SUFFIX(const T *x, T *out, const T *gamma, const T *beta, const T *scale, const T *shift, \
                             T *mean_out, T *rstd_out, int64_t n, int64_t c, int64_t s, int64_t groups,         \
                             double eps, int act) {                                                              \
    const int64_t cg = c / groups, m = cg * s, cpc = gn_chunk_channels(cg, s);                                       \
    for (int64_t b = 0; b < n; ++b) {                                                                            \
        for (int64_t gi = 0; gi < groups; ++gi) {                                                                \
            const int64_t base = (b * c + gi * cg) * s;                                                          \
            T mu, rs;                                                                                            \
            gn_moments_##SUFFIX(x + base, m, eps, &mu, &rs);                                                     \
            mean_out[b * groups + gi] = mu;                                                                      \
            rstd_out[b * groups + gi] = rs;                                                                      \
            for (int64_t j0 = 0; j0 < cg; j0 += cpc) {                                                           \
                const int64_t j1 = j0 + cpc < cg ? j0 + cpc : cg;                                                \
                for (int64_t j = j0; j < j1; ++j) { /* y = x (rstd gamma) + (beta - mean rstd gamma), ATen's form */ \
                    const int64_t ch = gi * cg + j;                                                              \
                    const T a = rs * gamma[ch], bb = beta[ch] - mu * a;                                          \
                    const T *xr = x + base + j * s;                                                              \
                    T *op = out + base + j * s;                                                                  \
                    for (int64_t i = 0; i < s; ++i) op[i] = xr[i] * a + bb;                                      \
                }                                                                                                \
                gn_phi_##SUFFIX(act, out + base + j0 * s, 0, (j1 - j0) * s);                                     \
                if (scale) {                                                                                     \
                    for (int64_t j = j0; j < j1; ++j) {                                                          \
                        const int64_t ch = gi * cg + j;                                                          \
                        const T sc = scale[ch], sh = shift[ch];                                                  \
                        T *op = out + base + j * s;                                                              \
                        for (int64_t i = 0; i < s; ++i) op[i] = op[i] * sc + sh;                                 \
                    }                                                                                            \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
}                                                                                                                \
/* acc: workspace of 4 c doubles; work: workspace of gn_act_work_size(c / groups, s) values of T. d_scale and   \
 * d_shift null: no Proxy Norm. */                                                                               \
void gn_act_backward_##SUFFIX(const T *g, const T *x, T *grad_x, const T *gamma, const T *beta, const T *scale,  \
                              const T *mean, const T *rstd, T *d_gamma, T *d_beta, T *d_scale, T *d_shift,      \
                              double *acc, T *work, int64_t n, int64_t c, int64_t s, int64_t groups, int act) { \
    const int64_t cg = c / groups, m = cg * s, cpc = gn_chunk_channels(cg, s);                                       \
    memset(acc, 0, sizeof(double) * 4 * c);                                                                      \
    double *a_gz = acc, *a_g = acc + c, *a_dyx = acc + 2 * c, *a_dy = acc + 3 * c;                               \
    T *zb = work, *db = work + cpc * s; /* phi(y) and phi'(y) of the current chunk of channels */                \
    for (int64_t b = 0; b < n; ++b) {                                                                            \
        for (int64_t gi = 0; gi < groups; ++gi) {                                                                \
            const int64_t base = (b * c + gi * cg) * s;                                                          \
            const T mu = mean[b * groups + gi], rs = rstd[b * groups + gi];                                      \
            double s1 = 0.0, s2 = 0.0; /* block sums of dy gamma and dy gamma xhat */                           \
            for (int64_t j0 = 0; j0 < cg; j0 += cpc) {                                                           \
                const int64_t j1 = j0 + cpc < cg ? j0 + cpc : cg;                                                \
                for (int64_t j = j0; j < j1; ++j) { /* recompute y exactly as the forward did */                 \
                    const int64_t ch = gi * cg + j;                                                              \
                    const T a = rs * gamma[ch], bb = beta[ch] - mu * a;                                          \
                    const T *xr = x + base + j * s;                                                              \
                    T *yr = zb + (j - j0) * s;                                                                   \
                    for (int64_t i = 0; i < s; ++i) yr[i] = xr[i] * a + bb;                                      \
                }                                                                                                \
                gn_phi_##SUFFIX(act, zb, db, (j1 - j0) * s);                                                     \
                for (int64_t j = j0; j < j1; ++j) {                                                              \
                    const int64_t ch = gi * cg + j, off = base + j * s;                                          \
                    const T sc = scale ? scale[ch] : (T)1;                                                       \
                    const T *xr = x + off, *gr = g + off, *zr = zb + (j - j0) * s, *dpr = db + (j - j0) * s;     \
                    T *dr = grad_x + off;                                                                        \
                    T pgz = 0, pg = 0, pdyx = 0, pdy = 0;                                                        \
                    for (int64_t i = 0; i < s; ++i) {                                                            \
                        T gv = gr[i], dy = gv * sc * dpr[i];                                                     \
                        pgz += gv * zr[i]; pg += gv;                                                             \
                        dr[i] = dy; /* grad_x holds dy until the second pass */                                  \
                        pdyx += dy * ((xr[i] - mu) * rs); pdy += dy;                                             \
                    }                                                                                            \
                    a_gz[ch] += (double)pgz; a_g[ch] += (double)pg;                                              \
                    a_dyx[ch] += (double)pdyx; a_dy[ch] += (double)pdy;                                          \
                    s1 += (double)gamma[ch] * (double)pdy;                                                       \
                    s2 += (double)gamma[ch] * (double)pdyx;                                                      \
                }                                                                                                \
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
