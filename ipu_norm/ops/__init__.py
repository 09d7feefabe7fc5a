"""Ops with one definition shared by the CPU/GPU path and the IPU custom op."""

from ipu_norm.ops.proxy_stats import (
    PROXY_ACTS,
    PROXY_NUM_QUANTILES,
    gaussian_quantiles,
    proxy_stats,
)

__all__ = ["PROXY_ACTS", "PROXY_NUM_QUANTILES", "gaussian_quantiles", "proxy_stats"]
