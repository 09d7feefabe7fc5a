// C ABI test shim over proxy_stats_kernel.hpp, for ctypes (tests/test_custom_op_cpp.py) and
// `make -C custom_ops test-kernel`. Not used by the PopART op. Build:
//   g++ -std=c++14 -O2 -shared -fPIC proxy_stats_capi.cpp -o libproxy_stats_capi.so
//
// All arrays are contiguous; activation is a canonical name ("relu", "silu", "gelu", "identity").
// Every function returns 0 on success, 1 for an unknown activation, 2 for num_quantiles < 2.
#include <cstdint>
#include <vector>

#include "proxy_stats_kernel.hpp"

namespace {

template <typename T>
int forwardImpl(const char *act_name, std::int64_t num_quantiles, std::int64_t C, const T *g, const T *b,
                const T *pg, const T *pb, T *mean, T *var) {
  ipu_norm::ProxyAct act;
  if (!ipu_norm::parseProxyAct(act_name, &act)) {
    return 1;
  }
  if (num_quantiles < 2) {
    return 2;
  }
  std::vector<T> q(static_cast<std::size_t>(num_quantiles));
  ipu_norm::gaussianQuantiles<T>(q.size(), q.data());
  ipu_norm::proxyStatsForward<T>(act, q.data(), q.size(), static_cast<std::size_t>(C), g, b, pg, pb, mean, var);
  return 0;
}

template <typename T>
int backwardImpl(const char *act_name, std::int64_t num_quantiles, std::int64_t C, const T *g, const T *b,
                 const T *pg, const T *pb, const T *gm, const T *gv, T *dg, T *db, T *dpg, T *dpb) {
  ipu_norm::ProxyAct act;
  if (!ipu_norm::parseProxyAct(act_name, &act)) {
    return 1;
  }
  if (num_quantiles < 2) {
    return 2;
  }
  std::vector<T> q(static_cast<std::size_t>(num_quantiles));
  ipu_norm::gaussianQuantiles<T>(q.size(), q.data());
  ipu_norm::proxyStatsBackward<T>(act, q.data(), q.size(), static_cast<std::size_t>(C), g, b, pg, pb, gm, gv,
                                  dg, db, dpg, dpb);
  return 0;
}

} // namespace

extern "C" {

int ipu_norm_gaussian_quantiles_f64(std::int64_t num_quantiles, double *q) {
  return ipu_norm::gaussianQuantiles<double>(static_cast<std::size_t>(num_quantiles < 0 ? 0 : num_quantiles), q)
             ? 0
             : 2;
}

int ipu_norm_proxy_stats_forward_f64(const char *act, std::int64_t num_quantiles, std::int64_t C, const double *g,
                                     const double *b, const double *pg, const double *pb, double *mean,
                                     double *var) {
  return forwardImpl<double>(act, num_quantiles, C, g, b, pg, pb, mean, var);
}

int ipu_norm_proxy_stats_backward_f64(const char *act, std::int64_t num_quantiles, std::int64_t C, const double *g,
                                      const double *b, const double *pg, const double *pb, const double *gm,
                                      const double *gv, double *dg, double *db, double *dpg, double *dpb) {
  return backwardImpl<double>(act, num_quantiles, C, g, b, pg, pb, gm, gv, dg, db, dpg, dpb);
}

int ipu_norm_proxy_stats_forward_f32(const char *act, std::int64_t num_quantiles, std::int64_t C, const float *g,
                                     const float *b, const float *pg, const float *pb, float *mean, float *var) {
  return forwardImpl<float>(act, num_quantiles, C, g, b, pg, pb, mean, var);
}

int ipu_norm_proxy_stats_backward_f32(const char *act, std::int64_t num_quantiles, std::int64_t C, const float *g,
                                      const float *b, const float *pg, const float *pb, const float *gm,
                                      const float *gv, float *dg, float *db, float *dpg, float *dpb) {
  return backwardImpl<float>(act, num_quantiles, C, g, b, pg, pb, gm, gv, dg, db, dpg, dpb);
}

} // extern "C"
