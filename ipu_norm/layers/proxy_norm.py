"""Proxy Normalization (Labatie et al., NeurIPS 2021): "PN-Act" after a batch-independent norm.

z = phi(gamma * x + beta) is normalised per channel by the mean and variance of the same affine +
activation applied to a Gaussian proxy variable instead of the batch:

    out = (z - mu~_c) / sqrt(sigma~^2_c + eps_pn)

so the output never depends on the other examples of the batch, in training or at inference. The
statistics cost C x 200 values per layer; the only full-tensor work is one extra per-channel affine
after phi (`_ProxyNormActFn` below).

The statistics are a function of the layer's four (C,) parameters only. Each PN layer computes them in its
own forward from its current parameters (`ipu_norm.ops.proxy_stats.proxy_stats`, plain ATen, float32):
nothing is cached between calls, so optimizer steps, EMA, load_state_dict, writes through ``.data``, freezing
(requires_grad=False) and checkpoint recomputation all see statistics of the parameters as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ipu_norm.layers.activations import ACT_FNS, act_vjp, canonical_act_name
from ipu_norm.ops import native
from ipu_norm.ops.proxy_stats import (
    PROXY_ACTS,
    PROXY_NUM_QUANTILES,
    native_ops_for,
    proxy_stats,
    uses_plain_ops,
)

DEFAULT_PROXY_EPS = 0.03
# Parameter names of the proxy variable (beta~, gamma~). Among the PN parameters only these are
# weight-decayed (REFERENCE.md); optim.param_groups reads this.
PROXY_PARAM_NAMES = ("proxy_weight", "proxy_bias")


def proxy_affine(
    gamma: torch.Tensor,
    beta: torch.Tensor,
    proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
    act: str,
    eps: float = DEFAULT_PROXY_EPS,
    num_quantiles: int = PROXY_NUM_QUANTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with PN(z) = z * scale + shift: scale = 1/sqrt(var~ + eps), shift = -mu~ * scale.

    On CPU one operator computes both from the four parameters, forward and backward (``ipu_norm.ops.native``);
    elsewhere `proxy_stats` and two ATen ops.
    """
    act = canonical_act_name(act)
    if act in PROXY_ACTS and gamma.dim() == 1 and native_ops_for(gamma, in_compiled_graphs=True):
        dtype = torch.float64 if gamma.dtype == torch.float64 else torch.float32
        params = [t.to(dtype) for t in (gamma, beta, proxy_gamma, proxy_beta)]
        return torch.ops.ipu_norm.proxy_affine(*params, num_quantiles, act, eps)
    mean, var = proxy_stats(gamma, beta, proxy_gamma, proxy_beta, act, num_quantiles)
    scale = torch.rsqrt(var + eps)
    return scale, -mean * scale


class ProxyStatsMixin:
    """Shared by the PN layers (ProxyNormAct, GroupNormAct with proxy=True): their proxy affine, per forward.

    A layer provides `_proxy_spec()` -> ((gamma, beta, gamma~, beta~), act, eps, num_quantiles), or None when
    it has no Proxy Norm. The statistics are recomputed from the current parameters on every call (C x n
    values): nothing is cached, so no write to the parameters, through any API, can leave them stale.
    """

    def _proxy_spec(self) -> tuple[tuple[torch.Tensor, ...], str, float, int] | None:
        raise NotImplementedError

    def proxy_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of the proxy normalisation for the current parameters."""
        spec = self._proxy_spec()
        if spec is None:
            raise RuntimeError(f"{type(self).__name__} has no Proxy Norm (proxy=False)")
        params, act, eps, num_quantiles = spec
        return proxy_affine(*params, act, eps, num_quantiles)


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (C,) vector to broadcast over the channel dim (1) of x, in x's dtype."""
    return v.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))


def _reduce_to_channel(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the channel dim (1), keeping dims (the shape of a _channel_view)."""
    return t.sum(dim=[d for d in range(t.dim()) if d != 1], keepdim=True)


class _ProxyNormActFn(torch.autograd.Function):
    """out = phi(u) * scale + shift with one saved activation (the memory of a plain norm + phi).

    Autograd on the unfused ops would save u (for phi'), phi(u) (for d/d scale) and the output (by the
    next conv): one full-size tensor more than GN + phi. Here phi(u) is recomputed in backward from u,
    and for ReLU nothing but the output is saved: scale > 0 (an rsqrt), so phi(u) = (out - shift) / scale
    and the ReLU mask is out > shift (exact up to rounding at the kink, where ReLU's derivative is
    conventionally 0 anyway).
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: str) -> torch.Tensor:  # noqa: ANN001
        # In place on phi(u)'s fresh tensor: a broadcasting out-of-place addcmul is several times slower on CPU.
        z = ACT_FNS[act](u)
        out = (z.clone() if z is u else z).mul_(scale).add_(shift)  # never write into u itself (identity)
        ctx.act = act
        ctx.save_for_backward(out if act == "relu" else u, scale, shift)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        saved, scale, shift = ctx.saved_tensors
        if ctx.act == "relu":
            centred = saved - shift  # phi(u) * scale
            # ATen's threshold_backward: grad where centred > 0 else 0 (several times faster than torch.where).
            grad_u = torch.ops.aten.threshold_backward(grad_out * scale, centred, 0)
            grad_scale = _reduce_to_channel(grad_out * centred) / scale
        elif torch.is_grad_enabled():
            # create_graph (double backward): out-of-place, differentiable ops only.
            grad_u = act_vjp(grad_out, saved, ctx.act) * scale
            grad_scale = _reduce_to_channel(ACT_FNS[ctx.act](saved) * grad_out)
        else:
            # In-place products on the two fresh tensors: full-size allocations cost page faults on CPU.
            grad_u = act_vjp(grad_out, saved, ctx.act).mul_(scale)
            grad_scale = _reduce_to_channel(ACT_FNS[ctx.act](saved).mul_(grad_out))
        return grad_u, grad_scale, _reduce_to_channel(grad_out), None


class _ReluShiftFn(torch.autograd.Function):
    """out = relu(u) + shift, saving only the output (the mask is out > shift)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = torch.relu(u).add_(shift)  # in place on relu's fresh tensor
        ctx.save_for_backward(out, shift)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        out, shift = ctx.saved_tensors
        # relu'(u) = [out > shift]; ATen's threshold_backward is several times faster than torch.where on CPU.
        return torch.ops.aten.threshold_backward(grad_out, out - shift, 0), _reduce_to_channel(grad_out)


def relu_add_shift(u: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(u) + shift per channel: the ReLU PN-Act once the PN scale is folded into the preceding affine.

    ReLU commutes with a positive per-channel scale and the PN scale 1/sqrt(var~ + eps) is always positive, so
    relu(gamma x + beta) * s + t == relu((gamma s) x + beta s) + t exactly; a norm with a fused affine
    (GroupNormAct) then pays one add per element for Proxy Norm instead of a multiply-add and its backward.
    """
    if native_ops_for(u):
        return torch.ops.ipu_norm.relu_shift(u, shift.to(u.dtype))
    t = _channel_view(shift, u)
    if torch.is_grad_enabled() and not uses_plain_ops():
        return _ReluShiftFn.apply(u, t)
    return torch.relu(u) + t


def apply_proxy_norm_act(
    x_affine: torch.Tensor, act: str, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """phi(x_affine) * scale + shift, per channel; x_affine is gamma * x + beta already.

    Uses the memory-lean fused autograd function when gradients are needed; under poptorch tracing
    (PopART differentiates the traced forward itself) and without grad, the plain two ops.
    """
    if act != "identity" and native_ops_for(x_affine):
        return torch.ops.ipu_norm.pn_act(x_affine, scale.to(x_affine.dtype), shift.to(x_affine.dtype), act)
    s, t = _channel_view(scale, x_affine), _channel_view(shift, x_affine)
    if torch.is_grad_enabled() and not uses_plain_ops() and act != "identity":
        return _ProxyNormActFn.apply(x_affine, s, t, act)
    return ACT_FNS[act](x_affine) * s + t


def proxy_norm_act(
    x_affine: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
    act: str,
    eps: float = DEFAULT_PROXY_EPS,
    num_quantiles: int = PROXY_NUM_QUANTILES,
) -> torch.Tensor:
    """The whole PN-Act: phi(x_affine) * scale + shift with (scale, shift) = `proxy_affine` of the four parameters.

    On CPU one operator does both, forward and backward (``ipu_norm.ops.native``); elsewhere `proxy_affine` and
    `apply_proxy_norm_act`.
    """
    if act != "identity" and all(t.dtype == x_affine.dtype for t in (gamma, beta, proxy_gamma, proxy_beta)) and (
        native_ops_for(x_affine)
    ):
        return torch.ops.ipu_norm.proxy_norm_act(
            x_affine, gamma, beta, proxy_gamma, proxy_beta, num_quantiles, act, eps
        )
    scale, shift = proxy_affine(gamma, beta, proxy_gamma, proxy_beta, act, eps, num_quantiles)
    return apply_proxy_norm_act(x_affine, act, scale, shift)


class ProxyNormAct(ProxyStatsMixin, nn.Module):
    """PN-Act: out = (phi(gamma x + beta) - mu~) / sqrt(sigma~^2 + eps), proxy statistics per channel.

    Place it after a norm that has no affine of its own (GroupNorm/LayerNorm with affine=False).
    Parameters: weight (gamma, init 1), bias (beta, init 0), proxy_weight (gamma~, init 0) and
    proxy_bias (beta~, init 0).
    """

    def __init__(
        self,
        num_channels: int,
        act: str | None = "relu",
        eps: float = DEFAULT_PROXY_EPS,
        num_quantiles: int = PROXY_NUM_QUANTILES,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.act = canonical_act_name(act)
        if self.act not in PROXY_ACTS:
            raise ValueError(f"Proxy Norm supports activations {PROXY_ACTS}, got {act!r}")
        self.eps = eps
        self.num_quantiles = num_quantiles
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.proxy_weight = nn.Parameter(torch.zeros(num_channels))
        self.proxy_bias = nn.Parameter(torch.zeros(num_channels))
        native.load()  # at construction, never in forward: the path is fixed before the first step

    def _proxy_spec(self) -> tuple[tuple[torch.Tensor, ...], str, float, int]:
        return (self.weight, self.bias, self.proxy_weight, self.proxy_bias), self.act, self.eps, self.num_quantiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * _channel_view(self.weight, x) + _channel_view(self.bias, x)
        return proxy_norm_act(x, self.weight, self.bias, self.proxy_weight, self.proxy_bias, self.act, self.eps,
                              self.num_quantiles)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, act={self.act}, eps={self.eps}, num_quantiles={self.num_quantiles}"
