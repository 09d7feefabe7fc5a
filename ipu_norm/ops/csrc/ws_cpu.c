/* Scaled Weight Standardization on CPU, one weight row (output channel, N = fan-in values) at a time.
 *
 * Forward, per row w (N values; at NFNet sizes <= 55 KB, so the passes after the first read from cache):
 *   mean = sum(w) / N, sq = sum((w - mean)^2) (two-pass: exact for small-variance rows), wsq = sum(w^2),
 *   r = 1 / sqrt(max(sq, eps))                    form 0, DeepMind (sq = N var; clamped = sq < eps)
 *   r = 1 / sqrt(sq / N + eps) / sqrt(N)          form 1, timm
 *   y = (w - mean) * r * gamma * gain
 *   saved per row: mean, invstd = r sqrt(N), c = gamma gain / sqrt(N) (the batch-norm view of the product,
 *   invstd * c = r gamma gain), clamped; and wsq, whose square root is AGC's unit-wise weight norm.
 * Backward (d = grad of y, xhat = (w - mean) invstd), as ATen's batch-norm backward on that view:
 *   grad_c = sum(d xhat), grad_w = c invstd (d - sum(d) / N - xhat k2), k2 = grad_c / N (0 where DeepMind's
 *   clamp is active: the denominator is a constant there), and gsq = sum(grad_w^2) (AGC's gradient norm) while
 *   the row is in cache.
 * Sums are taken in T over blocks of BLOCK values and accumulated in double. Single-threaded; built with the other
 * csrc files by ipu_norm/ops/cpu_kernels.py.
 */
#include <math.h>
#include <stdint.h>

#define BLOCK 512

#define DEFINE_WS(T, SUFFIX)                                                                                     \
void ws_forward_##SUFFIX(const T *w, T *y, const T *gain, T *mean_out, T *invstd_out, T *c_out,                \
                         uint8_t *clamped_out, double *wsq_out, int64_t rows, int64_t n, int form, double eps,   \
                         double gamma) {                                                                         \
    const double root_n = sqrt((double)n);                                                                       \
    for (int64_t r = 0; r < rows; ++r) {                                                                         \
        const T *wr = w + r * n;                                                                                 \
        double sum = 0.0, wsq = 0.0;                                                                             \
        for (int64_t b = 0; b < n; b += BLOCK) {                                                                 \
            const int64_t e = b + BLOCK < n ? b + BLOCK : n;                                                     \
            T ps = 0, pq = 0;                                                                                    \
            for (int64_t i = b; i < e; ++i) { ps += wr[i]; pq += wr[i] * wr[i]; }                                \
            sum += (double)ps; wsq += (double)pq;                                                                \
        }                                                                                                        \
        const T mu = (T)(sum / (double)n);                                                                       \
        double sq = 0.0;                                                                                         \
        for (int64_t b = 0; b < n; b += BLOCK) {                                                                 \
            const int64_t e = b + BLOCK < n ? b + BLOCK : n;                                                     \
            T pq = 0;                                                                                            \
            for (int64_t i = b; i < e; ++i) { T d = wr[i] - mu; pq += d * d; }                                   \
            sq += (double)pq;                                                                                    \
        }                                                                                                        \
        double rr;                                                                                               \
        if (form == 0) {                                                                                         \
            clamped_out[r] = sq < eps;                                                                           \
            rr = 1.0 / sqrt(sq < eps ? eps : sq);                                                                \
        } else {                                                                                                 \
            clamped_out[r] = 0;                                                                                  \
            rr = 1.0 / sqrt(sq / (double)n + eps) / root_n;                                                      \
        }                                                                                                        \
        const double cc = gamma * (gain ? (double)gain[r] : 1.0) / root_n;                                       \
        const T invstd = (T)(rr * root_n), c = (T)cc, scale = invstd * c;                                        \
        mean_out[r] = mu; invstd_out[r] = invstd; c_out[r] = c; wsq_out[r] = wsq;                                \
        T *yr = y + r * n;                                                                                       \
        for (int64_t i = 0; i < n; ++i) yr[i] = (wr[i] - mu) * scale;                                            \
    }                                                                                                            \
}                                                                                                                \
void ws_backward_##SUFFIX(const T *g, const T *w, T *grad_w, const T *mean, const T *invstd, const T *c,        \
                          const uint8_t *clamped, T *grad_c, double *gsq_out, int64_t rows, int64_t n) {        \
    for (int64_t r = 0; r < rows; ++r) {                                                                         \
        const T *gr = g + r * n, *wr = w + r * n;                                                                \
        const T mu = mean[r], rs = invstd[r];                                                                    \
        double sdy = 0.0, sdyx = 0.0;                                                                            \
        for (int64_t b = 0; b < n; b += BLOCK) {                                                                 \
            const int64_t e = b + BLOCK < n ? b + BLOCK : n;                                                     \
            T pd = 0, pdx = 0;                                                                                   \
            for (int64_t i = b; i < e; ++i) { pd += gr[i]; pdx += gr[i] * ((wr[i] - mu) * rs); }                 \
            sdy += (double)pd; sdyx += (double)pdx;                                                              \
        }                                                                                                        \
        grad_c[r] = (T)sdyx;                                                                                     \
        const T k1 = (T)(sdy / (double)n), k2 = clamped[r] ? (T)0 : (T)(sdyx / (double)n), ga = c[r] * rs;       \
        T *dr = grad_w + r * n;                                                                                  \
        double gsq = 0.0;                                                                                        \
        for (int64_t b = 0; b < n; b += BLOCK) {                                                                 \
            const int64_t e = b + BLOCK < n ? b + BLOCK : n;                                                     \
            T pq = 0;                                                                                            \
            for (int64_t i = b; i < e; ++i) {                                                                    \
                const T v = ga * (gr[i] - k1 - ((wr[i] - mu) * rs) * k2);                                        \
                dr[i] = v; pq += v * v;                                                                          \
            }                                                                                                    \
            gsq += (double)pq;                                                                                   \
        }                                                                                                        \
        gsq_out[r] = gsq;                                                                                        \
    }                                                                                                            \
}

DEFINE_WS(float, f32)
DEFINE_WS(double, f64)
