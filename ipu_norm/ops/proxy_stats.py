"""Proxy Norm statistics (Labatie et al. 2021): the per-channel mean and variance of
phi(gamma * Y~ + beta) over a proxy variable Y~ = (1 + gamma~) * q + beta~, where q are the fixed
quantiles of N(0, 1).

This module is the single definition of that math on CPU/GPU:

- ``torch.ops.ipu_norm.proxy_stats`` is a ``torch.library`` custom op (forward), with a fake impl for
  ``torch.compile`` and an analytic backward, itself the custom op ``torch.ops.ipu_norm.proxy_stats_backward``
  (so the backward is one opaque node under torch.compile too, and is the same math as the C++ kernel).
  The backward op has an analytic backward of its own (double backward, for gradgradcheck / higher order).
- On CPU (float32/float64) both ops run a C kernel, ``ipu_norm/ops/csrc/proxy_stats_cpu.c`` (one row of n
  quantiles at a time, 6-9x faster than the ATen code below), built at first use by ``ipu_norm.ops.cpu_kernels``;
  without a C compiler, and on other devices, the vectorised ATen implementation below.
- ``proxy_stats_reference`` is a plain-autograd implementation kept as the independent check.
- ``proxy_stats`` is what the Proxy Norm layers call: it casts to fp32 (fp64 kept for checks), disables
  autocast, and under PopTorch tracing dispatches to the PopART custom op (custom_ops/, see
  ``ipu_norm.ops.proxy_stats_ipu``).

Math, per channel c and quantile i (n quantiles):
    u_ci = gamma_c * ((1 + pg_c) q_i + pb_c) + beta_c = a_c q_i + c_c,  a = gamma (1 + pg), c = gamma pb + beta
    z_ci = phi(u_ci),  mean_c = (1/n) sum_i z_ci,  var_c = (1/n) sum_i (z_ci - mean_c)^2
Backward with w_ci = (gm_c + 2 gv_c (z_ci - mean_c)) phi'(u_ci) / n, S0 = sum_i w_ci, Sq = sum_i w_ci q_i:
    d gamma = (1 + pg) Sq + pb S0,  d beta = S0,  d pg = gamma Sq,  d pb = gamma S0.
S0 and Sq are linear in (gm, gv): with the four per-channel "moments" of the forward
    A = sum_i (z_ci - mean_c) phi'(u_ci),  B = sum_i phi'(u_ci),  Cq = sum_i (z_ci - mean_c) phi'(u_ci) q_i,
    D = sum_i phi'(u_ci) q_i,
S0 = (2 gv A + gm B) / n and Sq = (2 gv Cq + gm D) / n. The forward op returns them (a third, non-differentiable
output computed in the same pass), so the first-order backward is O(C) instead of a second pass over the
(C, n) proxy values; the backward op (which recomputes) serves double backward (create_graph) only.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import sys
from collections.abc import Iterator

import torch

from ipu_norm.compat import is_compiling
from ipu_norm.ops.cpu_kernels import cpu_proxy_stats_applies, cpu_proxy_stats_backward, cpu_proxy_stats_forward

# ipu_norm.layers imports this module (proxy_norm.py), so ipu_norm.layers.activations is imported lazily
# inside the functions below: importing ipu_norm.ops first must not hit a circular import.

PROXY_NUM_QUANTILES = 200
# Activations the proxy-statistics op supports (those the C++ kernel implements as well).
PROXY_ACTS = ("relu", "silu", "gelu", "identity")

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class _Torch20Op:
    """torch 2.0.x (PopTorch 3.4) has no ``torch.library.custom_op``: the same forward, backward and setup as one
    ``torch.autograd.Function`` (the fake impl only serves torch.compile). Minimal guard until this module is
    rewritten in plain ATen (issue 17)."""

    def __init__(self, fn):  # noqa: ANN001
        self.fn, self.backward, self.setup = fn, None, None

    def register_fake(self, fn):  # noqa: ANN001, ANN201
        return fn

    def register_autograd(self, backward, setup_context):  # noqa: ANN001, ANN201
        self.backward, self.setup = backward, setup_context

    def __call__(self, *args):  # noqa: ANN002, ANN204
        return _Torch20Function.apply(self, *args)


class _Torch20Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, *args):  # noqa: ANN001, ANN002, ANN205
        out = op.fn(*args)
        ctx.op = op
        if op.setup is not None:
            op.setup(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN002, ANN205
        return (None, *ctx.op.backward(ctx, *grads))


def _custom_op(name: str, mutates_args: tuple = ()):  # noqa: ANN202
    if hasattr(torch.library, "custom_op"):
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return _Torch20Op


@functools.lru_cache(maxsize=8)
def _quantiles_f64(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return math.sqrt(2.0) * torch.erfinv(2.0 * (i + 0.5) / n - 1.0)


def gaussian_quantiles(
    n: int = PROXY_NUM_QUANTILES, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The n fixed quantiles q_i = sqrt(2) erfinv(2 (i + 0.5) / n - 1) of N(0, 1), i = 0..n-1."""
    if n < 2:
        raise ValueError(f"need at least 2 proxy quantiles, got {n}")
    return _quantiles_f64(n).to(device=device, dtype=dtype, copy=True)  # never hand out the cached tensor


@functools.lru_cache(maxsize=32)
def _cached_quantiles(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # The op runs once per PN layer per step: keep the (n,) constant on the device instead of
    # re-computing/copying it every call. Callers must not modify it.
    return gaussian_quantiles(n, device=device, dtype=dtype)


def _stats_dtype(t: torch.Tensor) -> torch.dtype:
    # Statistics are always computed in fp32 (fp64 kept for gradient checks), never in half precision.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def proxy_stats_reference(
    gamma: torch.Tensor,
    beta: torch.Tensor,
    proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
    act: str = "relu",
    num_quantiles: int = PROXY_NUM_QUANTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, variance) of phi(gamma * ((1 + proxy_gamma) q + proxy_beta) + beta) over q.

    Straight autograd implementation; all inputs have shape (C,). The variance is the population
    variance over the quantiles. Computed in fp32 (fp64 if the inputs are fp64) with autocast off.
    """
    from ipu_norm.layers.activations import ACT_FNS, canonical_act_name

    act_name = canonical_act_name(act)
    dtype = _stats_dtype(gamma)
    with torch.autocast(device_type=gamma.device.type, enabled=False):
        g, b, pg, pb = (t.to(dtype) for t in (gamma, beta, proxy_gamma, proxy_beta))
        q = gaussian_quantiles(num_quantiles, device=g.device, dtype=dtype)
        y = (1.0 + pg)[:, None] * q[None, :] + pb[:, None]
        z = ACT_FNS[act_name](g[:, None] * y + b[:, None])
        mean = z.mean(dim=1)
        var = (z - mean[:, None]).square().mean(dim=1)
    return mean, var


# ----------------------------------------------------------------------------------------------------------
# Vectorised kernels shared by the op implementations (no loop over channels).


def _act(u: torch.Tensor, act: str) -> torch.Tensor:
    """phi(u) elementwise with the fused ATen kernels (gelu is the exact erf form)."""
    if act == "relu":
        return torch.relu(u)
    if act == "silu":
        return torch.nn.functional.silu(u)
    if act == "gelu":
        return torch.nn.functional.gelu(u)
    if act == "identity":
        return u
    raise ValueError(f"proxy_stats supports activations {PROXY_ACTS}, got {act!r}")


def _act_and_derivs(u: torch.Tensor, act: str, order: int) -> tuple[torch.Tensor, ...]:
    """(phi(u), phi'(u)[, phi''(u)]) elementwise; order is 1 or 2. Same formulas as proxy_stats_kernel.hpp.

    phi' of identity is returned as the Python float 1.0 (and phi'' of relu/identity as 0.0) so that the
    callers' products broadcast without materialising constant (C, n) tensors.
    """
    d2: torch.Tensor | float
    if act == "relu":
        z = torch.relu(u)
        # sign(relu(u)) is the step function 1[u > 0] (phi'(0) = 0 as in torch.relu's backward), and is
        # cheaper on CPU than a comparison + cast.
        d1: torch.Tensor | float = torch.sign(z)
        d2 = 0.0
    elif act == "silu":
        s = torch.sigmoid(u)
        z = u * s
        one_minus_s = 1.0 - s
        d1 = s * (1.0 + u * one_minus_s)
        d2 = s * one_minus_s * (2.0 + u * (one_minus_s - s))
    elif act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(u * _SQRT1_2))
        pdf = torch.exp(-0.5 * u * u) * _INV_SQRT_2PI
        z = u * cdf
        d1 = cdf + u * pdf
        d2 = pdf * (2.0 - u * u)
    elif act == "identity":
        z, d1, d2 = u, 1.0, 0.0
    else:
        raise ValueError(f"proxy_stats supports activations {PROXY_ACTS}, got {act!r}")
    return (z, d1, d2) if order == 2 else (z, d1)


def _mean_var_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and population variance of z, centring z IN PLACE (z must be a temporary).

    Two-pass (numerically stable), and on CPU several times faster than torch.var_mean's Welford
    reduction for (C, 200) rows; in place to avoid a (C, n) allocation per step.
    """
    mean = z.mean(dim=1)
    zc = z.sub_(mean[:, None])
    return mean, torch.linalg.vecdot(zc, zc) * (1.0 / z.shape[1])


def _proxy_u(
    g: torch.Tensor, b: torch.Tensor, pg: torch.Tensor, pb: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """u = gamma ((1 + pg) q + pb) + beta as a (C, n) tensor: u = a q^T + c, a = gamma (1 + pg), c = gamma pb + beta.

    One rank-1 addmm (about 3x faster on CPU than a doubly-broadcast addcmul); callers disable autocast.
    """
    a = g * (1.0 + pg)
    c = torch.addcmul(b, g, pb)
    return torch.addmm(c[:, None], a[:, None], q[None, :])


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for this device type (a no-op where the device has no autocast)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


_CPU_KERNEL = {"enabled": True}


def _use_cpu_kernel(gamma: torch.Tensor, num_quantiles: int) -> bool:
    # The C kernel (ipu_norm.ops.cpu_kernels) where it applies; _CPU_KERNEL lets tests run the ATen path.
    return _CPU_KERNEL["enabled"] and cpu_proxy_stats_applies(gamma, num_quantiles)


def _check_inputs(tensors: tuple[torch.Tensor, ...], act: str, num_quantiles: int) -> None:
    if act not in PROXY_ACTS:
        raise ValueError(f"proxy_stats supports activations {PROXY_ACTS}, got {act!r}")
    if num_quantiles < 2:
        raise ValueError(f"need at least 2 proxy quantiles, got {num_quantiles}")
    ref = tensors[0]
    if ref.dim() != 1:
        raise ValueError(f"proxy_stats expects (C,) parameters, got shape {tuple(ref.shape)}")
    if ref.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the proxy_stats op computes in float32/float64, got {ref.dtype} (use proxy_stats())")
    for t in tensors[1:]:
        if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
            raise ValueError("proxy_stats op inputs must share shape, dtype and device")


# ----------------------------------------------------------------------------------------------------------
# Forward op.


def _moments(zc: torch.Tensor, d1: torch.Tensor | float, q: torch.Tensor) -> torch.Tensor:
    """(4, C) moments (A, B, Cq, D) of the module docstring from centred z and phi' (float 1.0 for identity)."""
    if isinstance(d1, float):  # identity: phi' = 1
        ones = torch.full_like(zc[:, 0], d1)
        return torch.stack([zc.sum(dim=1), ones * zc.shape[1], torch.mv(zc, q), ones * q.sum()])
    ed = zc * d1
    return torch.stack([ed.sum(dim=1), d1.sum(dim=1), torch.mv(ed, q), torch.mv(d1, q)])


@_custom_op("ipu_norm::proxy_stats", mutates_args=())
def _proxy_stats_op(
    gamma: torch.Tensor,
    beta: torch.Tensor,
    proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
    act: str,
    num_quantiles: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom op forward: (mean, var, moments); inputs (C,) of one float32/float64 dtype, moments (4, C).

    moments (module docstring) only feed this op's own backward; they are not differentiable.
    """
    _check_inputs((gamma, beta, proxy_gamma, proxy_beta), act, num_quantiles)
    with _no_autocast(gamma.device.type):
        q = _cached_quantiles(num_quantiles, gamma.device, gamma.dtype)
        if _use_cpu_kernel(gamma, num_quantiles):
            return cpu_proxy_stats_forward(act, q, gamma, beta, proxy_gamma, proxy_beta)
        z, d1 = _act_and_derivs(_proxy_u(gamma, beta, proxy_gamma, proxy_beta, q), act, 1)
        mean, var = _mean_var_(z)  # centres z in place (for identity z is the temporary u itself)
        return mean, var, _moments(z, d1, q)


@_proxy_stats_op.register_fake
def _proxy_stats_fake(gamma, beta, proxy_gamma, proxy_beta, act, num_quantiles):  # noqa: ANN001, ANN202
    _check_inputs((gamma, beta, proxy_gamma, proxy_beta), act, num_quantiles)
    return gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape), gamma.new_empty((4, *gamma.shape))


# ----------------------------------------------------------------------------------------------------------
# Backward op: gradients of (mean, var) w.r.t. (gamma, beta, proxy_gamma, proxy_beta).


def _backward_terms(
    grad_mean: torch.Tensor,
    grad_var: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    pg: torch.Tensor,
    pb: torch.Tensor,
    act: str,
    n: int,
    order: int,
) -> tuple[torch.Tensor, ...]:
    """Shared by the backward op and its backward: q, z, derivatives, mean and w (all (C, n) but mean)."""
    q = _cached_quantiles(n, g.device, g.dtype)
    z, *ds = _act_and_derivs(_proxy_u(g, b, pg, pb, q), act, order)
    zc = z - z.mean(dim=1)[:, None]
    # w_ci = d (gm . mean + gv . var) / d u_ci; the d mean / d u term of var cancels (sum_i zc_i = 0).
    w = torch.addcmul(grad_mean[:, None] * (1.0 / n), zc, grad_var[:, None] * (2.0 / n)) * ds[0]
    return q, zc, ds, w


def act_vjp(grad: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """grad * phi'(u) with ATen's fused activation-backward kernels (one pass, no phi' tensor).

    Same values as grad * _act_and_derivs(u, act, 1)[1] (phi'(0) = 0 for relu); tested against it.
    """
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, u, 0)
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, u)
    if act == "gelu":
        return torch.ops.aten.gelu_backward(grad, u, approximate="none")
    if act == "identity":
        return grad
    raise ValueError(f"proxy_stats supports activations {PROXY_ACTS}, got {act!r}")


def _param_grads(
    s0: torch.Tensor, sq: torch.Tensor, gamma: torch.Tensor, proxy_gamma: torch.Tensor, proxy_beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d gamma, d beta, d proxy_gamma, d proxy_beta) from S0 and Sq (module docstring), per channel."""
    return torch.addcmul(proxy_beta * s0, 1.0 + proxy_gamma, sq), s0, gamma * sq, gamma * s0


@_custom_op("ipu_norm::proxy_stats_backward", mutates_args=())
def _proxy_stats_backward_op(
    grad_mean: torch.Tensor,
    grad_var: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
    act: str,
    num_quantiles: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic backward of ipu_norm::proxy_stats: (d gamma, d beta, d proxy_gamma, d proxy_beta)."""
    _check_inputs((grad_mean, grad_var, gamma, beta, proxy_gamma, proxy_beta), act, num_quantiles)
    n = num_quantiles
    with _no_autocast(gamma.device.type):
        q = _cached_quantiles(n, gamma.device, gamma.dtype)
        if _use_cpu_kernel(gamma, n):
            return cpu_proxy_stats_backward(act, q, grad_mean, grad_var, gamma, beta, proxy_gamma, proxy_beta)
        u = _proxy_u(gamma, beta, proxy_gamma, proxy_beta, q)
        # For identity z is u itself and is overwritten below: fine, its vjp never reads u.
        z = _act(u, act)
        # In place on the temporary z: coef = (gm + 2 gv (z - mean)) / n.
        coef = z.sub_(z.mean(dim=1)[:, None]).mul_(grad_var[:, None] * (2.0 / n)).add_(grad_mean[:, None] * (1.0 / n))
        # w_ci = d (gm . mean + gv . var) / d u_ci = coef_ci phi'(u_ci); the d mean / d u term of var
        # cancels because sum_i (z_ci - mean_c) = 0.
        w = act_vjp(coef, u, act)
        return _param_grads(w.sum(dim=1), torch.mv(w, q), gamma, proxy_gamma, proxy_beta)


@_proxy_stats_backward_op.register_fake
def _proxy_stats_backward_fake(grad_mean, grad_var, gamma, beta, proxy_gamma, proxy_beta, act, num_quantiles):  # noqa: ANN001, ANN202, E501
    _check_inputs((grad_mean, grad_var, gamma, beta, proxy_gamma, proxy_beta), act, num_quantiles)
    return tuple(gamma.new_empty(gamma.shape) for _ in range(4))


def _setup_forward(ctx, inputs, output) -> None:  # noqa: ANN001
    gamma, beta, proxy_gamma, proxy_beta, act, num_quantiles = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(gamma, beta, proxy_gamma, proxy_beta, output[2])
    ctx.act = act
    ctx.num_quantiles = num_quantiles


def _backward_forward(ctx, grad_mean, grad_var, _grad_moments):  # noqa: ANN001, ANN202
    gamma, beta, proxy_gamma, proxy_beta, moments = ctx.saved_tensors
    # An output that did not reach the loss has no gradient: treat it as zero.
    grad_mean = torch.zeros_like(gamma) if grad_mean is None else grad_mean.to(gamma.dtype)
    grad_var = torch.zeros_like(gamma) if grad_var is None else grad_var.to(gamma.dtype)
    if torch.is_grad_enabled():
        # create_graph: the backward op, which recomputes from the inputs and has an analytic backward of its own.
        grads = _proxy_stats_backward_op(
            grad_mean, grad_var, gamma, beta, proxy_gamma, proxy_beta, ctx.act, ctx.num_quantiles
        )
        return (*grads, None, None)
    # First order: S0 and Sq from the forward's moments (module docstring), O(C).
    n = ctx.num_quantiles
    a, b, cq, d = moments
    gv2 = grad_var * (2.0 / n)
    gm1 = grad_mean * (1.0 / n)
    s0 = torch.addcmul(gv2 * a, gm1, b)
    sq = torch.addcmul(gv2 * cq, gm1, d)
    return (*_param_grads(s0, sq, gamma, proxy_gamma, proxy_beta), None, None)


_proxy_stats_op.register_autograd(_backward_forward, setup_context=_setup_forward)


# ----------------------------------------------------------------------------------------------------------
# Double backward (backward of the backward op), analytic and vectorised.
#
# Let h = (hg, hb, hpg, hpb) be the cotangents of the backward op's outputs. Its scalar objective is
# L = hg.dgamma + hb.dbeta + hpg.dpg + hpb.dpb = sum_i w_i a_i, with a_i = hg y_i + hb + gamma (hpg q_i + hpb)
# = the tangent du_i along h (a JVP). Hence dL/dgm = (1/n) sum d1 a, dL/dgv = (2/n) sum zc d1 a, and with
# r_j = dL/du_j = (1/n)[2 gv d1_j (d1_j a_j - mean_i(d1 a)) + (gm + 2 gv zc_j) d2_j a_j]:
# dL/dgamma = sum r y + sum w (hpg q + hpb), dL/dbeta = sum r, dL/dy_j = gamma r_j + hg w_j,
# dL/dpg = sum (dL/dy) q, dL/dpb = sum dL/dy.


def _setup_backward(ctx, inputs, output) -> None:  # noqa: ANN001
    grad_mean, grad_var, gamma, beta, proxy_gamma, proxy_beta, act, num_quantiles = inputs
    ctx.save_for_backward(grad_mean, grad_var, gamma, beta, proxy_gamma, proxy_beta)
    ctx.act = act
    ctx.num_quantiles = num_quantiles


def _backward_backward(ctx, hg, hb, hpg, hpb):  # noqa: ANN001, ANN202
    gm, gv, g, b, pg, pb = ctx.saved_tensors
    n = ctx.num_quantiles
    hg, hb, hpg, hpb = (torch.zeros_like(g) if h is None else h for h in (hg, hb, hpg, hpb))
    q, zc, (d1, d2), w = _backward_terms(gm, gv, g, b, pg, pb, ctx.act, n, order=2)
    y = torch.addcmul(pb[:, None], (1.0 + pg)[:, None], q[None, :])
    a = hg[:, None] * y + (hb + g * hpb)[:, None] + (g * hpg)[:, None] * q[None, :]
    d1a = d1 * a
    grad_gm = d1a.mean(dim=1)
    grad_gv = 2.0 * (zc * d1a).mean(dim=1)
    r = (
        2.0 * gv[:, None] * d1 * (d1a - grad_gm[:, None])
        + (gm[:, None] + 2.0 * gv[:, None] * zc) * d2 * a
    ) * (1.0 / n)
    grad_g = (r * y).sum(dim=1) + hpg * torch.mv(w, q) + hpb * w.sum(dim=1)
    grad_b = r.sum(dim=1)
    dl_dy = g[:, None] * r + hg[:, None] * w
    grad_pg = torch.mv(dl_dy, q)
    grad_pb = dl_dy.sum(dim=1)
    return grad_gm, grad_gv, grad_g, grad_b, grad_pg, grad_pb, None, None


_proxy_stats_backward_op.register_autograd(_backward_backward, setup_context=_setup_backward)


# ----------------------------------------------------------------------------------------------------------
# Public entry point.


def running_on_ipu() -> bool:
    """True while PopTorch traces the model for the IPU; never imports poptorch itself."""
    if is_compiling():
        # torch.compile (dynamo) never runs under PopTorch; also keeps this branch out of the graph.
        return False
    poptorch = sys.modules.get("poptorch")
    # If poptorch was never imported nothing can be tracing for the IPU.
    return poptorch is not None and bool(poptorch.isRunningOnIpu())


# Set (per thread / task) by `plain_ops()`: the layers take the path PopTorch traces.
_PLAIN_OPS: contextvars.ContextVar[bool] = contextvars.ContextVar("ipu_norm_plain_ops", default=False)


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
    """Within this context the layers run the plain ATen ops that PopTorch traces for the IPU (no CPU fused kernels,
    no memory-lean custom autograd functions, no batched proxy statistics), on any device.

    The IPU memory estimate profiles the model this way (ipu_norm/memory/measure.py): what autograd saves for the
    plain ops is what PopART's backward needs. A context variable, so it is scoped to the caller's thread / task.
    """
    token = _PLAIN_OPS.set(True)
    try:
        yield
    finally:
        _PLAIN_OPS.reset(token)


def uses_plain_ops() -> bool:
    """True when the layers must take the plain-op path: PopTorch is tracing, or inside `plain_ops()`."""
    from ipu_norm.compat import is_compiling

    if is_compiling():
        return False
    return _PLAIN_OPS.get() or running_on_ipu()


def proxy_stats(
    gamma: torch.Tensor,
    beta: torch.Tensor,
    proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
    act: str = "relu",
    num_quantiles: int = PROXY_NUM_QUANTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proxy statistics used by the Proxy Norm layers (see `proxy_stats_reference` for the math).

    Parameters of any floating dtype; computed and returned in fp32 (fp64 if gamma is fp64), also
    inside torch.autocast. Runs the `ipu_norm::proxy_stats` custom op (analytic backward), or the
    PopART custom op `ipu_norm.ProxyStats` when PopTorch is tracing the model for the IPU.
    """
    from ipu_norm.layers.activations import canonical_act_name

    act_name = canonical_act_name(act)
    if act_name not in PROXY_ACTS:
        raise ValueError(f"proxy_stats supports activations {PROXY_ACTS}, got {act!r}")
    if running_on_ipu():
        from ipu_norm.ops.proxy_stats_ipu import proxy_stats_ipu

        return proxy_stats_ipu(gamma, beta, proxy_gamma, proxy_beta, act_name, num_quantiles)
    dtype = _stats_dtype(gamma)
    # The casts must stay fp32 even when called inside torch.autocast(bf16/fp16).
    with _no_autocast(gamma.device.type):
        args = tuple(t.to(dtype) for t in (gamma, beta, proxy_gamma, proxy_beta))
        mean, var, _ = _proxy_stats_op(*args, act_name, num_quantiles)
        return mean, var
