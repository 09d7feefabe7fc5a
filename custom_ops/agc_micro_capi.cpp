// C ABI of agc_micro_kernel.hpp for tests (ctypes): no SDK needed. Built by tests/test_custom_op_cpp.py into a
// temporary directory, or by `make -C custom_ops test-kernel`.
#include <cstdint>

#include "agc_micro_kernel.hpp"

extern "C" {

int ipu_norm_agc_micro_clip_f64(int64_t rows, int64_t rowLen, const double *grad, const double *weight, double clip,
                                double eps, double lossScale, double *out) {
  return ipu_norm::agcClipRows<double>(rows, rowLen, grad, weight, clip, eps, lossScale, out);
}

int ipu_norm_agc_micro_clip_f32(int64_t rows, int64_t rowLen, const float *grad, const float *weight, double clip,
                                double eps, double lossScale, float *out) {
  return ipu_norm::agcClipRows<float>(rows, rowLen, grad, weight, clip, eps, lossScale, out);
}

} // extern "C"
