"""Composable layers: activations, norm+activation (BN, GN, LN, GN/LN+Proxy Norm), NF layers."""

from ipu_norm.layers.activations import NF_ACT_GAMMA, GammaAct, canonical_act_name, create_act, get_act_fn
from ipu_norm.layers.norm_act import (
    NORM_KINDS,
    ActOnly,
    BatchNormAct2d,
    GroupNormAct,
    NormSpec,
    create_norm_act,
    parse_norm,
)
from ipu_norm.layers.proxy_norm import (
    PROXY_PARAM_NAMES,
    ProxyNormAct,
    apply_proxy_norm_act,
    proxy_affine,
)

__all__ = [
    "NF_ACT_GAMMA", "NORM_KINDS", "PROXY_PARAM_NAMES", "ActOnly", "BatchNormAct2d", "GammaAct", "GroupNormAct",
    "NormSpec", "ProxyNormAct", "apply_proxy_norm_act", "canonical_act_name", "create_act", "create_norm_act",
    "get_act_fn", "parse_norm", "proxy_affine",
]
