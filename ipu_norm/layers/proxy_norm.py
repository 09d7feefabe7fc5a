"""Proxy Normalization (Labatie et al., NeurIPS 2021): "PN-Act" after a batch-independent norm.

z = phi(gamma * x + beta) is normalised per channel by the mean and variance of the same affine +
activation applied to a Gaussian proxy variable instead of the batch:

    out = (z - mu~_c) / sqrt(sigma~^2_c + eps_pn)

so the output never depends on the other examples of the batch, in training or at inference. The
statistics cost C x 200 values per layer; the only full-tensor work is one extra per-channel affine
after phi (`_ProxyNormActFn` below).

Batched statistics (`prepare_proxy_stats`): a model (StemBlocksHead.forward) or a CPU/GPU pipeline stage
computes the statistics of all its PN layers at the start of its forward, one `proxy_stats` call per
(activation, eps, quantiles, dtype, device) group over the concatenated parameters, and hands each layer its
slice; autograd then runs one batched backward per group. Each layer validates its slice against its
parameters' (data_ptr, _version) before use and otherwise computes its own statistics (the per-layer path,
also used standalone, under PopTorch tracing and under torch.compile).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ipu_norm.compat import is_compiling
from ipu_norm.layers.activations import ACT_FNS, canonical_act_name
from ipu_norm.ops.cpu_kernels import (
    fused_pn_act_applies,
    fused_pn_act_backward,
    fused_pn_act_forward,
    fused_relu_shift_backward,
    fused_relu_shift_forward,
)
from ipu_norm.ops.proxy_stats import PROXY_ACTS, PROXY_NUM_QUANTILES, act_vjp, proxy_stats, uses_plain_ops

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
    """Per-channel (scale, shift) with PN(z) = z * scale + shift: scale = 1/sqrt(var~ + eps), shift = -mu~ * scale."""
    mean, var = proxy_stats(gamma, beta, proxy_gamma, proxy_beta, act, num_quantiles)
    scale = torch.rsqrt(var + eps)
    return scale, -mean * scale


_BATCHING = {"enabled": True}


@contextlib.contextmanager
def proxy_stats_batching(enabled: bool) -> Iterator[None]:
    """Turn the batched proxy statistics on or off inside the block (off = every PN layer computes its own)."""
    previous = _BATCHING["enabled"]
    _BATCHING["enabled"] = enabled
    try:
        yield
    finally:
        _BATCHING["enabled"] = previous


class _StatsEntry:
    """A PN layer's (scale, shift) from a batched computation, valid for the parameter state in `key`.

    `spent` is shared by the entries of one batched computation and set once autograd has produced the
    gradient of the batched statistics: their graph is then freed, so a later forward that records gradients
    must not reuse them (one recorded before that, e.g. the recompute of a torch.utils.checkpoint segment
    during backward, uses them and sends its gradients through the one batched backward).
    """

    __slots__ = ("scale", "shift", "key", "spent", "used_without_grad")

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, key: tuple, spent: list[bool]) -> None:
        self.scale, self.shift, self.key, self.spent = scale, shift, key, spent
        self.used_without_grad = False


# layer -> its _StatsEntry. Kept off the module so that copy.deepcopy (EMA) and pickling never see graph tensors.
_ENTRIES: weakref.WeakKeyDictionary[nn.Module, _StatsEntry] = weakref.WeakKeyDictionary()


def _param_key(params: tuple[torch.Tensor, ...]) -> tuple:
    # In-place updates (optimizer, EMA, load_state_dict) bump _version; .to()/.data = ... change data_ptr.
    return tuple((p.data_ptr(), p._version) for p in params)


def _batching_active() -> bool:
    return _BATCHING["enabled"] and not is_compiling() and not uses_plain_ops()


class ProxyStatsMixin:
    """Shared by the PN layers (ProxyNormAct, GroupNormAct with proxy=True): their statistics, batched or own.

    A layer provides `_proxy_spec()` -> ((gamma, beta, gamma~, beta~), act, eps, num_quantiles), or None when
    it has no Proxy Norm.
    """

    def _proxy_spec(self) -> tuple[tuple[torch.Tensor, ...], str, float, int] | None:
        raise NotImplementedError

    def _batched_proxy_affine(self, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = _ENTRIES.get(self)
        if entry is None or not _batching_active() or entry.key != _param_key(params):
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            # Needs the statistics' graph: only from a batch computed with gradients whose backward has not run.
            # Not after a no-grad use of that batch either: that was the forward of a reentrant checkpoint, whose
            # recompute (now) runs its own backward, which must not reach into the shared batched graph.
            if entry.spent[0] or not entry.scale.requires_grad or entry.used_without_grad:
                return None
        elif entry.scale.requires_grad:
            entry.used_without_grad = True
        return entry.scale, entry.shift

    def proxy_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of the proxy normalisation for the current parameters (batched slice or own call)."""
        spec = self._proxy_spec()
        if spec is None:
            raise RuntimeError(f"{type(self).__name__} has no Proxy Norm (proxy=False)")
        params, act, eps, num_quantiles = spec
        batched = self._batched_proxy_affine(params)
        if batched is not None:
            return batched
        return proxy_affine(*params, act, eps, num_quantiles)


def _mark_spent(spent: list[bool]):  # noqa: ANN202
    def hook(grad: torch.Tensor) -> None:
        spent[0] = True

    return hook


# root -> its PN layers, found once: a stale list after a module swap only costs speed (a new layer computes
# its own statistics, a removed one is still computed), never correctness.
_LAYERS: weakref.WeakKeyDictionary[nn.Module, list[ProxyStatsMixin]] = weakref.WeakKeyDictionary()


def _proxy_layers(root: nn.Module) -> list[ProxyStatsMixin]:
    layers = _LAYERS.get(root)
    if layers is None:
        layers = [m for m in root.modules() if isinstance(m, ProxyStatsMixin) and m._proxy_spec() is not None]
        _LAYERS[root] = layers
    return layers


def clear_proxy_stats(root: nn.Module) -> None:
    """Drop the cached statistics of the PN layers under `root`.

    Only needed after writing parameters in a way that bypasses their version counter (``p.data.copy_(...)``):
    optimizers, EMA, ``load_state_dict`` and ``.to()`` are detected by themselves.
    """
    for m in root.modules():
        _ENTRIES.pop(m, None)


def prepare_proxy_stats(root: nn.Module) -> None:
    """Compute the proxy statistics of every PN layer under `root` in one batched call per group.

    Groups are (activation, eps, num_quantiles, dtype, device); a group's parameters are concatenated, go
    through one `proxy_affine` (one `ipu_norm::proxy_stats` op, one backward op) and the (scale, shift) are
    split back per layer. Without gradients (eval, no_grad, EMA) layers whose parameters did not change since
    the last computation keep their statistics: at inference they are constants. A no-op while PopTorch
    traces (the IPU op is per layer and pipeline stages live on different IPUs), under torch.compile, and
    inside `proxy_stats_batching(False)`.
    """
    layers = _proxy_layers(root)
    if not layers or not _batching_active():
        return
    grad = torch.is_grad_enabled()
    groups: dict[tuple, list[tuple[ProxyStatsMixin, tuple[torch.Tensor, ...], tuple]]] = {}
    for m in layers:
        spec = m._proxy_spec()
        if spec is None:
            continue
        params, act, eps, nq = spec
        key = _param_key(params)
        entry = _ENTRIES.get(m)
        needs_graph = grad and any(p.requires_grad for p in params)
        if not needs_graph and entry is not None and entry.key == key:
            continue  # unchanged parameters, no gradient needed: the cached statistics stay valid
        g = params[0]
        groups.setdefault((act, eps, nq, g.dtype, g.device), []).append((m, params, key))
    for (act, eps, nq, _, _), members in groups.items():
        spent = [False]
        if len(members) == 1:
            _, params, _ = members[0]
            scale, shift = proxy_affine(*params, act, eps, nq)
            scales, shifts = (scale,), (shift,)
        else:
            cat = [torch.cat([ps[i] for _, ps, _ in members]) for i in range(4)]
            scale, shift = proxy_affine(*cat, act, eps, nq)
            sizes = [ps[0].numel() for _, ps, _ in members]
            scales, shifts = scale.split(sizes), shift.split(sizes)
        if scale.requires_grad:
            scale.register_hook(_mark_spent(spent))
            shift.register_hook(_mark_spent(spent))
        for (m, _, key), sc, sh in zip(members, scales, shifts):
            _ENTRIES[m] = _StatsEntry(sc, sh, key, spent)


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
        ctx.fused = fused_pn_act_applies(u, act)
        if ctx.fused:
            out = fused_pn_act_forward(u, scale, shift, act)  # SiLU/GELU on CPU: one pass (ipu_norm.ops.cpu_kernels)
        else:
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
        elif ctx.fused and grad_out.dtype == saved.dtype:
            grad_u, grad_scale, grad_shift = fused_pn_act_backward(grad_out, saved, scale, ctx.act)
            return grad_u, grad_scale.view(scale.shape), grad_shift.view(shift.shape), None
        else:
            # In-place products on the two fresh tensors: full-size allocations cost page faults on CPU.
            grad_u = act_vjp(grad_out, saved, ctx.act).mul_(scale)
            grad_scale = _reduce_to_channel(ACT_FNS[ctx.act](saved).mul_(grad_out))
        return grad_u, grad_scale, _reduce_to_channel(grad_out), None


class _ReluShiftFn(torch.autograd.Function):
    """out = relu(u) + shift, saving only the output (the mask is out > shift)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.fused = fused_pn_act_applies(u, "relu_shift")
        # One pass on CPU (ipu_norm.ops.cpu_kernels), else in place on relu's fresh tensor.
        out = fused_relu_shift_forward(u, shift) if ctx.fused else torch.relu(u).add_(shift)
        ctx.save_for_backward(out, shift)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        out, shift = ctx.saved_tensors
        if ctx.fused:
            grad_u, grad_shift = fused_relu_shift_backward(grad_out, out, shift)
            return grad_u, grad_shift.view(shift.shape)
        # relu'(u) = [out > shift]; ATen's threshold_backward is several times faster than torch.where on CPU.
        return torch.ops.aten.threshold_backward(grad_out, out - shift, 0), _reduce_to_channel(grad_out)


def relu_add_shift(u: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(u) + shift per channel: the ReLU PN-Act once the PN scale is folded into the preceding affine.

    ReLU commutes with a positive per-channel scale and the PN scale 1/sqrt(var~ + eps) is always positive, so
    relu(gamma x + beta) * s + t == relu((gamma s) x + beta s) + t exactly; a norm with a fused affine
    (GroupNormAct) then pays one add per element for Proxy Norm instead of a multiply-add and its backward.
    """
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
    s, t = _channel_view(scale, x_affine), _channel_view(shift, x_affine)
    if torch.is_grad_enabled() and not uses_plain_ops() and act != "identity":
        return _ProxyNormActFn.apply(x_affine, s, t, act)
    return ACT_FNS[act](x_affine) * s + t


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

    def _proxy_spec(self) -> tuple[tuple[torch.Tensor, ...], str, float, int]:
        return (self.weight, self.bias, self.proxy_weight, self.proxy_bias), self.act, self.eps, self.num_quantiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * _channel_view(self.weight, x) + _channel_view(self.bias, x)
        return apply_proxy_norm_act(x, self.act, *self.proxy_affine())

    def extra_repr(self) -> str:
        return f"{self.num_channels}, act={self.act}, eps={self.eps}, num_quantiles={self.num_quantiles}"
