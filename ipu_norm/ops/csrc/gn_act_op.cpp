// GroupNormAct's fused CPU kernels (gn_act_cpu.c) as one C++ autograd op, `ipu_norm_cpp::gn_act`.
//
// The kernels themselves are those of ipu_norm/ops/cpu_kernels.py's C library; this file only adds the autograd
// glue in C++: the Python autograd.Function around the ctypes calls cost ~0.2-0.3 ms per layer and step in an
// EfficientNet-B0 training step (interpreter work between heavy kernels runs with cold caches), about as much
// as the kernels themselves on the small late-stage planes. The C library is built by cpu_kernels.py and its
// function pointers are handed over once through `set_kernels`, so the two can never disagree.
//
// gn_act(x, weight, bias, scale?, shift?, groups, eps, act) -> out: phi(group_norm(x) * weight + bias)
// [* scale + shift], x contiguous (N, C, *) float32/float64, the (C,) vectors contiguous in x's dtype (the
// Python caller checks this). First-order only, like the Python path (`once_differentiable`): a backward that
// records a graph (create_graph=True) raises.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

using Fwd = void (*)(const void*, void*, const void*, const void*, const void*, const void*, void*, void*, int64_t,
                     int64_t, int64_t, int64_t, double, int);
using Bwd = void (*)(const void*, const void*, void*, const void*, const void*, const void*, const void*, const void*,
                     void*, void*, void*, void*, double*, void*, int64_t, int64_t, int64_t, int64_t, int);
using ScratchBytes = int64_t (*)(int64_t, int64_t, int64_t, int64_t, int64_t*);

struct Kernels {
  Fwd fwd[2] = {nullptr, nullptr};  // [0] float32, [1] float64
  Bwd bwd[2] = {nullptr, nullptr};
  ScratchBytes scratch_bytes = nullptr;
};
Kernels kernels;

void set_kernels(int64_t fwd32, int64_t fwd64, int64_t bwd32, int64_t bwd64, int64_t scratch_bytes) {
  kernels.fwd[0] = reinterpret_cast<Fwd>(fwd32);
  kernels.fwd[1] = reinterpret_cast<Fwd>(fwd64);
  kernels.bwd[0] = reinterpret_cast<Bwd>(bwd32);
  kernels.bwd[1] = reinterpret_cast<Bwd>(bwd64);
  kernels.scratch_bytes = reinterpret_cast<ScratchBytes>(scratch_bytes);
}

int which(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? 0 : 1; }

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

class GnActFn : public torch::autograd::Function<GnActFn> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift, int64_t groups, double eps, int64_t act) {
    TORCH_CHECK(kernels.fwd[0] != nullptr, "ipu_norm_cpp::gn_act: set_kernels was not called");
    const int64_t n = x.size(0), c = x.size(1), s = x.numel() / std::max<int64_t>(n * c, 1);
    at::Tensor sc = scale.has_value() ? *scale : at::Tensor(), sh = shift.has_value() ? *shift : at::Tensor();
    at::Tensor out = at::empty_like(x);
    at::Tensor stats = at::empty({2, n, groups}, x.options());
    char* sp = static_cast<char*>(stats.data_ptr());
    kernels.fwd[which(x)](x.data_ptr(), out.data_ptr(), weight.data_ptr(), bias.data_ptr(), ptr_or_null(sc),
                          ptr_or_null(sh), sp, sp + n * groups * x.element_size(), n, c, s, groups, eps,
                          static_cast<int>(act));
    ctx->save_for_backward({x, weight, bias, sc, stats});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["act"] = act;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "ipu_norm_cpp::gn_act is first-order only (no create_graph); use the ATen path "
                "(IPU_NORM_CPU_KERNELS=0 or more than one torch thread) for higher-order gradients");
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &sc = saved[3], &stats = saved[4];
    const int64_t groups = ctx->saved_data["groups"].toInt(), act = ctx->saved_data["act"].toInt();
    const int64_t n = x.size(0), c = x.size(1), s = x.numel() / std::max<int64_t>(n * c, 1);
    const int64_t isz = x.element_size();
    at::Tensor g = grad_outputs[0].to(x.scalar_type()).contiguous();
    at::Tensor grad_x = at::empty_like(x);
    const bool pn = sc.defined();
    at::Tensor grads = at::empty({pn ? 4 : 2, c}, x.options());
    int64_t work_offset = 0;
    const int64_t scratch_bytes = kernels.scratch_bytes(c, c / groups, s, isz, &work_offset);
    at::Tensor scratch = at::empty({scratch_bytes}, x.options().dtype(at::kByte));
    char *sp = static_cast<char*>(stats.data_ptr()), *gp = static_cast<char*>(grads.data_ptr()),
         *wp = static_cast<char*>(scratch.data_ptr());
    const int64_t row = c * isz;
    kernels.bwd[which(x)](g.data_ptr(), x.data_ptr(), grad_x.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                          ptr_or_null(sc), sp, sp + n * groups * isz, gp, gp + row, pn ? gp + 2 * row : nullptr,
                          pn ? gp + 3 * row : nullptr, reinterpret_cast<double*>(wp), wp + work_offset, n, c, s, groups,
                          static_cast<int>(act));
    auto parts = grads.unbind(0);
    return {grad_x, parts[0], parts[1], pn ? parts[2] : at::Tensor(), pn ? parts[3] : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor gn_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t groups,
                  double eps, int64_t act) {
  return GnActFn::apply(x, weight, bias, scale, shift, groups, eps, act);
}

}  // namespace

TORCH_LIBRARY(ipu_norm_cpp, m) {
  m.def("set_kernels(int fwd32, int fwd64, int bwd32, int bwd64, int scratch_bytes) -> ()", &set_kernels);
  m.def("gn_act(Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, int groups, float eps, int act)"
        " -> Tensor",
        &gn_act);
}
