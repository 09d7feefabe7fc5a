/* CPU kernel of the ipu_norm::proxy_stats op and its backward op (ipu_norm/ops/proxy_stats.py), one channel (row
 * of n quantiles) at a time with the row kept in a small buffer: one transcendental per element forward and one
 * backward, where the ATen implementation makes about five (forward) and nine (backward) passes over (C, n)
 * tensors. The forward also writes the four per-channel moments from which the op's first-order backward is
 * O(C) (mom, may be null); the backward kernel recomputes everything and serves the backward op (double
 * backward). Same formulas as that module's docstring and custom_ops/proxy_stats_kernel.hpp (the PopART side,
 * whose per-element switch does not vectorise); tested against the ATen path. q is the op's own quantile
 * tensor; act: 0 relu, 1 silu, 2 gelu, 3 identity (PROXY_ACTS order). Built with the other csrc files by ipu_norm/ops/cpu_kernels.py.
 */
#include <math.h>
#include <stdint.h>

#define MAX_N 4096 /* quantiles per row handled here; the caller uses ATen beyond that */

#define DEFINE_STATS(T, SUFFIX, EXP, ERF)                                                                        \
/* z = phi(u) (and d = phi'(u) when d != 0) for u = a q + c over one row. */                                     \
static inline void row_act_##SUFFIX(int act, const T *q, int64_t n, T a, T c, T *z, T *d) {                      \
    if (act == 0) {                                                                                              \
        for (int64_t i = 0; i < n; ++i) { T u = a * q[i] + c; z[i] = u > 0 ? u : 0; if (d) d[i] = u > 0; }      \
    } else if (act == 1) {                                                                                       \
        for (int64_t i = 0; i < n; ++i) {                                                                        \
            T u = a * q[i] + c, m = -u;                                                                          \
            m = m > (T)80 ? (T)80 : m;                                                                           \
            T s = (T)1 / ((T)1 + EXP(m));                                                                        \
            z[i] = u * s;                                                                                        \
            if (d) d[i] = s * ((T)1 + u * ((T)1 - s));                                                           \
        }                                                                                                        \
    } else if (act == 2) {                                                                                       \
        for (int64_t i = 0; i < n; ++i) {                                                                        \
            T u = a * q[i] + c, cdf = (T)0.5 * ((T)1 + ERF(u * (T)0.70710678118654752440));                      \
            z[i] = u * cdf;                                                                                      \
            if (d) d[i] = cdf + u * EXP((T)-0.5 * u * u) * (T)0.39894228040143267794;                             \
        }                                                                                                        \
    } else {                                                                                                     \
        for (int64_t i = 0; i < n; ++i) { z[i] = a * q[i] + c; if (d) d[i] = 1; }                                \
    }                                                                                                            \
}                                                                                                                \
/* mom (may be 0): the four per-channel sums that make the first-order backward O(C), (4, C) row-major:      \
 * A = sum (z - mean) phi', B = sum phi', Cq = sum (z - mean) phi' q, D = sum phi' q (see proxy_stats.py). */   \
int proxy_stats_forward_##SUFFIX(int act, const T *q, int64_t n, int64_t c, const T *g, const T *b,             \
                                 const T *pg, const T *pb, T *mean, T *var, T *mom) {                            \
    if (n > MAX_N) return 1;                                                                                     \
    T z[MAX_N], d[MAX_N];                                                                                        \
    for (int64_t ch = 0; ch < c; ++ch) {                                                                         \
        row_act_##SUFFIX(act, q, n, g[ch] * ((T)1 + pg[ch]), b[ch] + g[ch] * pb[ch], z, mom ? d : 0);            \
        if (!mom) {                                                                                              \
            T s = 0;                                                                                             \
            for (int64_t i = 0; i < n; ++i) s += z[i];                                                           \
            const T m = s / (T)n;                                                                                \
            T ss = 0;                                                                                            \
            for (int64_t i = 0; i < n; ++i) { T e = z[i] - m; ss += e * e; } /* two-pass: stable */             \
            mean[ch] = m;                                                                                        \
            var[ch] = ss / (T)n;                                                                                 \
            continue;                                                                                            \
        }                                                                                                        \
        T s = 0, sb = 0, sd = 0;                                                                                 \
        for (int64_t i = 0; i < n; ++i) { s += z[i]; sb += d[i]; sd += d[i] * q[i]; }                            \
        const T m = s / (T)n;                                                                                    \
        T ss = 0, sa = 0, sc = 0;                                                                                \
        for (int64_t i = 0; i < n; ++i) { /* two-pass: the centred sums are stable */                            \
            T e = z[i] - m, ed = e * d[i];                                                                       \
            ss += e * e; sa += ed; sc += ed * q[i];                                                              \
        }                                                                                                        \
        mean[ch] = m;                                                                                            \
        var[ch] = ss / (T)n;                                                                                     \
        mom[ch] = sa; mom[c + ch] = sb; mom[2 * c + ch] = sc; mom[3 * c + ch] = sd;                              \
    }                                                                                                            \
    return 0;                                                                                                    \
}                                                                                                                \
int proxy_stats_backward_##SUFFIX(int act, const T *q, int64_t n, int64_t c, const T *g, const T *b,            \
                                  const T *pg, const T *pb, const T *gm, const T *gv, T *dg, T *db, T *dpg,      \
                                  T *dpb) {                                                                      \
    if (n > MAX_N) return 1;                                                                                     \
    T z[MAX_N], d[MAX_N];                                                                                        \
    for (int64_t ch = 0; ch < c; ++ch) {                                                                         \
        row_act_##SUFFIX(act, q, n, g[ch] * ((T)1 + pg[ch]), b[ch] + g[ch] * pb[ch], z, d);                      \
        T s = 0;                                                                                                 \
        for (int64_t i = 0; i < n; ++i) s += z[i];                                                               \
        const T m = s / (T)n, k1 = (T)2 * gv[ch] / (T)n, k0 = gm[ch] / (T)n;                                     \
        T s0 = 0, sq = 0;                                                                                        \
        for (int64_t i = 0; i < n; ++i) {                                                                        \
            /* w_i = (gm + 2 gv (z_i - mean)) phi'(u_i) / n; d var / d mean cancels (sum_i (z_i - mean) = 0) */  \
            T w = ((z[i] - m) * k1 + k0) * d[i];                                                                 \
            s0 += w;                                                                                             \
            sq += w * q[i];                                                                                      \
        }                                                                                                        \
        dg[ch] = pb[ch] * s0 + ((T)1 + pg[ch]) * sq;                                                             \
        db[ch] = s0;                                                                                             \
        dpg[ch] = g[ch] * sq;                                                                                    \
        dpb[ch] = g[ch] * s0;                                                                                    \
    }                                                                                                            \
    return 0;                                                                                                    \
}

DEFINE_STATS(float, f32, expf, erff)
DEFINE_STATS(double, f64, exp, erf)
