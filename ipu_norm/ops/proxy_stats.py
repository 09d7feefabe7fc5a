"""Proxy Norm statistics (Labatie et al. 2021): the per-channel mean and variance of
phi(gamma * Y~ + beta) over a proxy variable Y~ = (1 + gamma~) * q + beta~, where q are the fixed
quantiles of N(0, 1).

This module is the single definition of that math on CPU/GPU. The C++ kernel in custom_ops/ mirrors it
for the IPU and is tested against it.
"""

from __future__ import annotations

import functools
import math

import torch

from ipu_norm.layers.activations import ACT_FNS, canonical_act_name

PROXY_NUM_QUANTILES = 200
# Activations the proxy-statistics op supports (those the C++ kernel implements as well).
PROXY_ACTS = ("relu", "silu", "gelu", "identity")


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
    return _quantiles_f64(n).to(device=device, dtype=dtype)


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


def proxy_stats(
    gamma: torch.Tensor,
    beta: torch.Tensor,
    proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
    act: str = "relu",
    num_quantiles: int = PROXY_NUM_QUANTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proxy statistics used by the Proxy Norm layers (see `proxy_stats_reference` for the math)."""
    return proxy_stats_reference(gamma, beta, proxy_gamma, proxy_beta, act, num_quantiles)
