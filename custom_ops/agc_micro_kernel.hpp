// Host reference of the micro-batch AGC clip (ipu_norm.MicroBatchAGC's gradient), header-only, SDK-free.
//
// For every unit (row) i of a weight W viewed as (rows, rowLen) - rows = W.shape[0] for rank >= 2, 1 for
// vectors and scalars - and G the incoming (loss-scaled by s) gradient:
//   maxNorm_i = clip * max(||W_i||, eps),  n_i = ||G_i|| / s
//   G_i <- G_i * maxNorm_i / max(n_i, 1e-6)   if n_i > maxNorm_i,  else G_i
// The same formula as ipu_norm/ops/agc_micro.py (clip_unitwise), against which tests/test_custom_op_cpp.py checks
// this header through agc_micro_capi.cpp; agc_micro_popart.cpp lowers it to Poplar term for term
// (agcClipFactor below). Norms are accumulated in double.
#ifndef IPU_NORM_AGC_MICRO_KERNEL_HPP
#define IPU_NORM_AGC_MICRO_KERNEL_HPP

#include <cmath>
#include <cstdint>

namespace ipu_norm {

constexpr double kAgcGradNormEps = 1e-6;  // guard of ||G_i|| (REFERENCE.md)

// The factor of one unit from its sums of squares (the Poplar lowering's `factor` expression).
inline double agcClipFactor(double gradSumSq, double weightSumSq, double clip, double eps, double lossScale) {
  const double maxNorm = clip * std::fmax(std::sqrt(weightSumSq), eps);
  const double gradNorm = std::sqrt(gradSumSq) / lossScale;
  return gradNorm > maxNorm ? maxNorm / std::fmax(gradNorm, kAgcGradNormEps) : 1.0;
}

// out = clipped grad (out may alias grad). Returns 0, or -1 for invalid arguments.
template <typename T>
int agcClipRows(int64_t rows, int64_t rowLen, const T *grad, const T *weight, double clip, double eps,
                double lossScale, T *out) {
  if (rows < 1 || rowLen < 1 || grad == nullptr || weight == nullptr || out == nullptr || !(clip > 0.0) ||
      !(eps > 0.0) || !(lossScale > 0.0)) {
    return -1;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T *g = grad + r * rowLen;
    const T *w = weight + r * rowLen;
    double gsq = 0.0;
    double wsq = 0.0;
    for (int64_t k = 0; k < rowLen; ++k) {
      gsq += static_cast<double>(g[k]) * static_cast<double>(g[k]);
      wsq += static_cast<double>(w[k]) * static_cast<double>(w[k]);
    }
    const double f = agcClipFactor(gsq, wsq, clip, eps, lossScale);
    T *o = out + r * rowLen;
    for (int64_t k = 0; k < rowLen; ++k) {
      o[k] = static_cast<T>(static_cast<double>(g[k]) * f);
    }
  }
  return 0;
}

} // namespace ipu_norm

#endif
