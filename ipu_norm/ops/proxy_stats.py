"""Proxy Norm statistics (Labatie et al. 2021): the per-channel mean and variance of
phi(gamma * Y~ + beta) over a proxy variable Y~ = (1 + gamma~) * q + beta~, where q are the fixed
quantiles of N(0, 1).

``proxy_stats`` is the one host-side (CPU/GPU) definition of that math, in plain ATen ops: autograd
differentiates it (twice, too, wherever ATen's activation backward is itself differentiable; see the README's
"Double backward"), torch.compile traces it like any other ops, and it imports under torch 2.0.1. While
PopTorch traces a model for the IPU it dispatches to the PopART custom op ``ipu_norm.ProxyStats``
(custom_ops/, ``ipu_norm.ops.proxy_stats_ipu``), whose C++ kernel is tested against this function.

Math, per channel c and quantile i (n quantiles):
    u_ci = gamma_c * ((1 + pg_c) q_i + pb_c) + beta_c = a_c q_i + c_c,  a = gamma (1 + pg), c = gamma pb + beta
    z_ci = phi(u_ci),  mean_c = (1/n) sum_i z_ci,  var_c = (1/n) sum_i (z_ci - mean_c)^2
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ipu_norm import compat

PROXY_NUM_QUANTILES = 200
# Activations the proxy statistics support (those the PopART kernel implements as well).
PROXY_ACTS = ("relu", "silu", "gelu", "identity")


def gaussian_quantiles(
    n: int = PROXY_NUM_QUANTILES, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The n fixed quantiles q_i = sqrt(2) erfinv(2 (i + 0.5) / n - 1) of N(0, 1), i = 0..n-1 (a fresh tensor).

    Computed in float64 and cast, on every call (n erfinv: microseconds; no cache to share or corrupt).
    """
    if n < 2:
        raise ValueError(f"need at least 2 proxy quantiles, got {n}")
    i = torch.arange(n, dtype=torch.float64, device=device)
    return (math.sqrt(2.0) * torch.erfinv((2.0 * i + 1.0) / n - 1.0)).to(dtype)


def _act(u: torch.Tensor, act: str) -> torch.Tensor:
    """phi(u) elementwise with ATen's activation kernels (gelu is the exact erf form)."""
    if act == "relu":
        return torch.relu(u)
    if act == "silu":
        return F.silu(u)
    if act == "gelu":
        return F.gelu(u)
    if act == "identity":
        return u
    raise ValueError(f"proxy_stats supports activations {PROXY_ACTS}, got {act!r}")


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for this device type (a no-op where the device has no autocast)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def running_on_ipu() -> bool:
    """True while PopTorch traces the model for the IPU; never imports poptorch itself."""
    if compat.is_compiling():
        # torch.compile (dynamo) never runs under PopTorch; also keeps this branch out of the graph.
        return False
    poptorch = sys.modules.get("poptorch")
    # If poptorch was never imported nothing can be tracing for the IPU.
    return poptorch is not None and bool(poptorch.isRunningOnIpu())



_PLAIN_OPS: contextvars.ContextVar[bool] = contextvars.ContextVar("ipu_norm_plain_ops", default=False)


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
    """Within this context the layers run the plain ATen ops that PopTorch traces for the IPU (no memory-lean custom
    autograd functions), on any device.

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
    if compat.is_compiling():
        return False
    return _PLAIN_OPS.get() or running_on_ipu()

def native_ops_for(x: torch.Tensor, *, in_compiled_graphs: bool = False) -> bool:
    """Whether the compiled CPU operators (``ipu_norm.ops.native``) compute the Proxy Norm of tensor `x`.

    Yes for CPU float32/float64 contiguous tensors once the operators are built, except under `plain_ops()` and
    PopTorch tracing. Eager calls build them on first use (layers do so at construction). Under torch.compile
    (which never builds them) only where `in_compiled_graphs`: the layers keep the statistics operator in compiled
    graphs but give Inductor the ATen form of the norm's elementwise tail, which it fuses with the norm into
    kernels of its own (faster there than an opaque operator between them; docs/benchmarks.md).
    """
    from ipu_norm.ops import native  # noqa: PLC0415 - lazily: a light module, but it imports the build tools

    if compat.is_compiling():
        return in_compiled_graphs and native.usable_for(x)
    if uses_plain_ops() or x.device.type != "cpu":
        return False
    native.load()
    return native.usable_for(x)


def proxy_stats(
    gamma: torch.Tensor,
    beta: torch.Tensor,
    proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
    act: str = "relu",
    num_quantiles: int = PROXY_NUM_QUANTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, population variance) of phi(gamma ((1 + proxy_gamma) q + proxy_beta) + beta) over q.

    All inputs have shape (C,) and any floating dtype; computed and returned in float32 (float64 if gamma is
    float64), also inside torch.autocast. Plain ATen ops (autograd differentiates them); under PopTorch
    tracing, the PopART custom op `ipu_norm.ProxyStats`.
    """
    from ipu_norm.layers.activations import canonical_act_name  # lazily: ipu_norm.layers imports this module

    act_name = canonical_act_name(act)
    if act_name not in PROXY_ACTS:
        raise ValueError(f"proxy_stats supports activations {PROXY_ACTS}, got {act!r}")
    if num_quantiles < 2:
        raise ValueError(f"need at least 2 proxy quantiles, got {num_quantiles}")
    if gamma.dim() != 1 or any(t.shape != gamma.shape for t in (beta, proxy_gamma, proxy_beta)):
        shapes = [tuple(t.shape) for t in (gamma, beta, proxy_gamma, proxy_beta)]
        raise ValueError(f"proxy_stats expects four (C,) parameters of one shape, got shapes {shapes}")
    if running_on_ipu():
        from ipu_norm.ops.proxy_stats_ipu import proxy_stats_ipu

        return proxy_stats_ipu(gamma, beta, proxy_gamma, proxy_beta, act_name, num_quantiles)
    dtype = torch.float64 if gamma.dtype == torch.float64 else torch.float32
    with _no_autocast(gamma.device.type):
        g, b, pg, pb = (t.to(dtype) for t in (gamma, beta, proxy_gamma, proxy_beta))
        q = gaussian_quantiles(num_quantiles, device=g.device, dtype=dtype)
        # u = a q^T + c as one rank-1 addmm (a doubly-broadcast addcmul is ~3x slower on CPU).
        u = torch.addmm(torch.addcmul(b, g, pb)[:, None], (g * (1.0 + pg))[:, None], q[None, :])
        # One op each way (population variance); fewer autograd nodes than mean, sub, square, mean.
        var, mean = torch.var_mean(_act(u, act_name), dim=1, correction=0)
    return mean, var
