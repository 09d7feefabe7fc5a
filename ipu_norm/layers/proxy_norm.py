"""Proxy Normalization (Labatie et al., NeurIPS 2021): "PN-Act" after a batch-independent norm.

z = phi(gamma * x + beta) is normalised per channel by the mean and variance of the same affine +
activation applied to a Gaussian proxy variable instead of the batch:

    out = (z - mu~_c) / sqrt(sigma~^2_c + eps_pn)

so the output never depends on the other examples of the batch, in training or at inference. The
statistics cost C x 200 values per layer; the only full-tensor work is one extra per-channel affine
after phi (the `torch.addcmul` below).
"""

from __future__ import annotations

import torch
from torch import nn

from ipu_norm.layers.activations import ACT_FNS, canonical_act_name
from ipu_norm.ops.proxy_stats import PROXY_ACTS, PROXY_NUM_QUANTILES, proxy_stats

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


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (C,) vector to broadcast over the channel dim (1) of x, in x's dtype."""
    return v.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))


def apply_proxy_norm_act(
    x_affine: torch.Tensor, act: str, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """phi(x_affine) * scale + shift, per channel; x_affine is gamma * x + beta already."""
    return torch.addcmul(_channel_view(shift, x_affine), ACT_FNS[act](x_affine), _channel_view(scale, x_affine))


class ProxyNormAct(nn.Module):
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

    def proxy_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of the proxy normalisation for the current parameters."""
        return proxy_affine(
            self.weight, self.bias, self.proxy_weight, self.proxy_bias, self.act, self.eps, self.num_quantiles
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(_channel_view(self.bias, x), x, _channel_view(self.weight, x))
        return apply_proxy_norm_act(x, self.act, *self.proxy_affine())

    def extra_repr(self) -> str:
        return f"{self.num_channels}, act={self.act}, eps={self.eps}, num_quantiles={self.num_quantiles}"
