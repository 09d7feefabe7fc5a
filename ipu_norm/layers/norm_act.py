"""Norm + activation layers, all built by `create_norm_act` from a norm string.

| norm     | layer                                                      | batch dependent |
|----------|------------------------------------------------------------|-----------------|
| bn       | BatchNorm (affine) -> phi                                  | yes             |
| gn       | GroupNorm (G groups, affine) -> phi                        | no              |
| ln       | GroupNorm with one group (LayerNorm for convnets) -> phi   | no              |
| gn+pn    | GroupNorm (no affine) -> PN-Act                            | no              |
| ln+pn    | LayerNorm (no affine) -> PN-Act                            | no              |
| none     | phi only                                                   | no              |

GroupNormAct with proxy=True is the fused form of "GN without affine -> ProxyNormAct": the PN affine
(gamma, beta) is passed to group_norm as its weight and bias, which is the same function with one
full-tensor pass fewer. Where a norm is not followed by an activation (the last norm of a residual
branch, a projection conv), Proxy Norm has nothing to correct and the norm keeps a plain affine
(REFERENCE.md: the projection conv gets no PN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ipu_norm.layers.activations import ACT_FNS, canonical_act_name
from ipu_norm.layers.proxy_norm import (
    DEFAULT_PROXY_EPS,
    ProxyStatsMixin,
    proxy_norm_act,
    relu_add_shift,
)
from ipu_norm.ops import native
from ipu_norm.ops.proxy_stats import PROXY_ACTS, PROXY_NUM_QUANTILES

NORM_KINDS = ("bn", "gn", "ln", "gn+pn", "ln+pn", "none")
DEFAULT_EPS = {"bn": 1e-5, "gn": 1e-3, "ln": 1e-3}
DEFAULT_GN_GROUPS = 4


@dataclass(frozen=True)
class NormSpec:
    """A parsed norm string: the base norm ('bn', 'gn', 'ln', 'none') and whether Proxy Norm follows it."""

    base: str
    proxy: bool

    @property
    def batch_dependent(self) -> bool:
        return self.base == "bn"

    def __str__(self) -> str:
        return f"{self.base}+pn" if self.proxy else self.base


def parse_norm(norm: str | NormSpec) -> NormSpec:
    """Parse 'bn' | 'gn' | 'ln' | 'gn+pn' | 'ln+pn' | 'none' (case-insensitive)."""
    if isinstance(norm, NormSpec):
        return norm
    key = str(norm).strip().lower().replace(" ", "")
    if key not in NORM_KINDS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORM_KINDS)}")
    base, _, pn = key.partition("+")
    return NormSpec(base=base, proxy=pn == "pn")


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation (state-dict compatible with nn.BatchNorm2d)."""

    def __init__(
        self,
        num_features: int,
        act: str | None = "relu",
        eps: float = DEFAULT_EPS["bn"],
        momentum: float = 0.1,
        inplace: bool = False,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.act_name = canonical_act_name(act)
        self.inplace = inplace and self.act_name in ("relu", "silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.act_name == "relu":
            return F.relu(x, inplace=self.inplace)
        if self.act_name == "silu":
            return F.silu(x, inplace=self.inplace)
        return ACT_FNS[self.act_name](x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act_name}"


class GroupNormAct(ProxyStatsMixin, nn.GroupNorm):
    """GroupNorm followed by an activation, optionally with Proxy Norm (GN+PN / LN+PN).

    weight/bias are GroupNorm's affine, which for proxy=True is the PN affine (gamma, beta);
    proxy_weight/proxy_bias (gamma~, beta~, init 0) parametrise the proxy variable.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = DEFAULT_GN_GROUPS,
        act: str | None = "relu",
        eps: float = DEFAULT_EPS["gn"],
        proxy: bool = False,
        proxy_eps: float = DEFAULT_PROXY_EPS,
        num_quantiles: int = PROXY_NUM_QUANTILES,
    ) -> None:
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.act_name = canonical_act_name(act)
        self.proxy = proxy
        if proxy:
            if self.act_name not in PROXY_ACTS:
                raise ValueError(f"Proxy Norm supports activations {PROXY_ACTS}, got {act!r}")
            self.proxy_eps = proxy_eps
            self.num_quantiles = num_quantiles
            self.proxy_weight = nn.Parameter(torch.zeros(num_channels))
            self.proxy_bias = nn.Parameter(torch.zeros(num_channels))
            native.load()  # at construction, never in forward: the path is fixed before the first step

    def _proxy_spec(self) -> tuple[tuple[torch.Tensor, ...], str, float, int] | None:
        if not self.proxy:
            return None
        params = (self.weight, self.bias, self.proxy_weight, self.proxy_bias)
        return params, self.act_name, self.proxy_eps, self.num_quantiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.proxy:
            x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            # In place on GroupNorm's fresh output (its backward reads only its input and statistics).
            if self.act_name == "relu":
                return F.relu(x, inplace=True)
            if self.act_name == "silu":
                return F.silu(x, inplace=True)
            return ACT_FNS[self.act_name](x)
        if self.act_name == "relu":
            # The PN scale (> 0) commutes with ReLU: fold it into GroupNorm's affine (relu_add_shift docstring).
            scale, shift = self.proxy_affine()
            x = F.group_norm(x, self.num_groups, self.weight * scale, self.bias * scale, self.eps)
            return relu_add_shift(x, shift)
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return proxy_norm_act(x, self.weight, self.bias, self.proxy_weight, self.proxy_bias, self.act_name,
                              self.proxy_eps, self.num_quantiles)

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, act={self.act_name}"
        return s + (f", proxy_eps={self.proxy_eps}" if self.proxy else "")


class ActOnly(nn.Module):
    """The 'none' norm: the activation alone."""

    def __init__(self, num_channels: int, act: str | None = "relu") -> None:
        super().__init__()
        self.num_channels = num_channels
        self.act_name = canonical_act_name(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACT_FNS[self.act_name](x)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, act={self.act_name}"


def create_norm_act(
    norm: str | NormSpec,
    num_channels: int,
    act: str | None = "relu",
    *,
    eps: float | None = None,
    groups: int | None = None,
    proxy_eps: float = DEFAULT_PROXY_EPS,
    zero_init: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Build norm + activation for `num_channels` channels from a norm string (see module docstring).

    eps: the norm's own epsilon (default 1e-5 for bn, 1e-3 for gn/ln); groups: GroupNorm groups for 'gn'
    (default 4); proxy_eps: Proxy Norm's epsilon (0.03); zero_init: initialise the norm gain to 0 (for
    the last norm of a residual branch). With act=None a '+pn' norm falls back to its base norm with a
    plain affine: there is no activation whose output PN would normalise.
    """
    spec = parse_norm(norm)
    act_name = canonical_act_name(act)
    if spec.base == "none":
        if zero_init:
            raise ValueError("zero_init needs a norm with a gain; norm 'none' has none")
        return ActOnly(num_channels, act_name)
    norm_eps = DEFAULT_EPS[spec.base] if eps is None else eps
    if spec.base == "bn":
        layer: nn.Module = BatchNormAct2d(num_channels, act_name, eps=norm_eps, inplace=inplace)
    else:
        num_groups = 1 if spec.base == "ln" else (DEFAULT_GN_GROUPS if groups is None else groups)
        proxy = spec.proxy and act_name != "identity"
        layer = GroupNormAct(num_channels, num_groups, act_name, eps=norm_eps, proxy=proxy, proxy_eps=proxy_eps)
    if zero_init:
        nn.init.zeros_(layer.weight)
    return layer
