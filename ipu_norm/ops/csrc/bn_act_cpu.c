/* Fused training-mode BatchNorm + ReLU on CPU (BatchNormAct2d with batch statistics).
 *
 * Layout: x, out, grad_out, grad_x contiguous (N, C, S), S = prod(spatial). Per channel c over its N planes
 * (M = N S values, at CNN sizes a few hundred KB at most, so every pass after the first reads from cache):
 *   forward:  mean, biased var (two-pass), invstd = 1 / sqrt(var + eps),
 *             y = x (invstd gamma) + (beta - mean invstd gamma), out = max(y, 0)
 *   backward: dy = grad_out where y > 0 (else 0; ReLU's derivative at 0 is 0, as torch.relu's backward),
 *             d gamma = sum dy xhat, d beta = sum dy, grad_x = invstd gamma (dy - mean(dy) - xhat mean(dy xhat)),
 *             xhat = (x - mean) invstd, y recomputed from x exactly as in the forward.
 * ATen runs BatchNorm's statistics and normalisation, ReLU, and in backward threshold_backward and BatchNorm's
 * reduction and input-gradient passes as separate full-tensor passes. The running statistics are updated by the
 * caller (ipu_norm.layers.norm_act). Single-threaded; built with the other csrc files by ipu_norm/ops/cpu_kernels.py.
 */
#include <math.h>
#include <stdint.h>

#define DEFINE_BN_RELU(T, SUFFIX)                                                                                \
void bn_relu_forward_##SUFFIX(const T *x, T *out, const T *gamma, const T *beta, T *mean_out, T *invstd_out,    \
                              T *var_out, int64_t n, int64_t c, int64_t s, double eps) {                        \
    const double m = (double)(n * s);                                                                            \
    for (int64_t ch = 0; ch < c; ++ch) {                                                                         \
        double sum = 0.0;                                                                                        \
        for (int64_t b = 0; b < n; ++b) {                                                                        \
            const T *xr = x + (b * c + ch) * s;                                                                  \
            T ps = 0;                                                                                            \
            for (int64_t i = 0; i < s; ++i) ps += xr[i];                                                         \
            sum += (double)ps;                                                                                   \
        }                                                                                                        \
        const T mu = (T)(sum / m);                                                                               \
        double ss = 0.0;                                                                                         \
        for (int64_t b = 0; b < n; ++b) {                                                                        \
            const T *xr = x + (b * c + ch) * s;                                                                  \
            T pss = 0;                                                                                           \
            for (int64_t i = 0; i < s; ++i) { T e = xr[i] - mu; pss += e * e; }                                  \
            ss += (double)pss;                                                                                   \
        }                                                                                                        \
        const double var = ss / m;                                                                               \
        const T rs = (T)(1.0 / sqrt(var + eps));                                                                 \
        mean_out[ch] = mu;                                                                                       \
        invstd_out[ch] = rs;                                                                                     \
        var_out[ch] = (T)var;                                                                                    \
        const T a = rs * gamma[ch], bb = beta[ch] - mu * a;                                                      \
        for (int64_t b = 0; b < n; ++b) {                                                                        \
            const T *xr = x + (b * c + ch) * s;                                                                  \
            T *op = out + (b * c + ch) * s;                                                                      \
            for (int64_t i = 0; i < s; ++i) { T y = xr[i] * a + bb; op[i] = y > 0 ? y : (T)0; }                  \
        }                                                                                                        \
    }                                                                                                            \
}                                                                                                                \
void bn_relu_backward_##SUFFIX(const T *g, const T *x, T *grad_x, const T *gamma, const T *beta, const T *mean, \
                               const T *invstd, T *d_gamma, T *d_beta, int64_t n, int64_t c, int64_t s) {       \
    const double m = (double)(n * s);                                                                            \
    for (int64_t ch = 0; ch < c; ++ch) {                                                                         \
        const T mu = mean[ch], rs = invstd[ch], a = rs * gamma[ch], bb = beta[ch] - mu * a;                      \
        double sdy = 0.0, sdyx = 0.0;                                                                            \
        for (int64_t b = 0; b < n; ++b) {                                                                        \
            const int64_t off = (b * c + ch) * s;                                                                \
            const T *xr = x + off, *gr = g + off;                                                                \
            T *dr = grad_x + off;                                                                                \
            T pdy = 0, pdyx = 0;                                                                                 \
            for (int64_t i = 0; i < s; ++i) {                                                                    \
                T xv = xr[i], y = xv * a + bb, dy = y > 0 ? gr[i] : (T)0;                                        \
                dr[i] = dy; /* grad_x holds dy until the second pass */                                          \
                pdy += dy; pdyx += dy * ((xv - mu) * rs);                                                        \
            }                                                                                                    \
            sdy += (double)pdy;                                                                                  \
            sdyx += (double)pdyx;                                                                                \
        }                                                                                                        \
        d_gamma[ch] = (T)sdyx;                                                                                   \
        d_beta[ch] = (T)sdy;                                                                                     \
        const T k1 = (T)(sdy / m), k2 = (T)(sdyx / m), ga = rs * gamma[ch];                                      \
        for (int64_t b = 0; b < n; ++b) {                                                                        \
            const int64_t off = (b * c + ch) * s;                                                                \
            const T *xr = x + off;                                                                               \
            T *dr = grad_x + off;                                                                                \
            for (int64_t i = 0; i < s; ++i) dr[i] = ga * (dr[i] - k1 - ((xr[i] - mu) * rs) * k2);               \
        }                                                                                                        \
    }                                                                                                            \
}

DEFINE_BN_RELU(float, f32)
DEFINE_BN_RELU(double, f64)
