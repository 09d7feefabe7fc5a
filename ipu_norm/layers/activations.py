"""Activation functions by name, and the NF "gamma" constants that keep their output at unit variance."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Canonical activation names and their aliases.
_ALIASES = {"swish": "silu", "none": "identity", "linear": "identity", "leakyrelu": "leaky_relu"}

# Functional form of each supported activation (GELU is the exact erf form, as torch.nn.GELU()).
ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}

# gamma_phi such that gamma_phi * phi(x) has unit variance for x ~ N(0, 1) (Brock et al. 2021; the
# DeepMind nfnets reference values, see REFERENCE.md). Used by NF networks only.
NF_ACT_GAMMA: dict[str, float] = {
    "identity": 1.0,
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
    "silu": 1.7881293296813965,
    "elu": 1.2716004848480225,
    "leaky_relu": 1.70590341091156,
    "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291,
}


def canonical_act_name(name: str | None) -> str:
    """Return the canonical name of activation `name` (None means identity); raise on unknown names."""
    if name is None:
        return "identity"
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in ACT_FNS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACT_FNS) + sorted(_ALIASES)}")
    return key


def get_act_fn(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Functional activation for `name`."""
    return ACT_FNS[canonical_act_name(name)]


def create_act(name: str | None, inplace: bool = False) -> nn.Module:
    """An nn.Module for activation `name` (nn.Identity for None/"identity")."""
    key = canonical_act_name(name)
    if key == "relu":
        return nn.ReLU(inplace=inplace)
    if key == "silu":
        return nn.SiLU(inplace=inplace)
    if key == "gelu":
        return nn.GELU()
    if key == "elu":
        return nn.ELU(inplace=inplace)
    if key == "leaky_relu":
        return nn.LeakyReLU(inplace=inplace)
    if key == "tanh":
        return nn.Tanh()
    if key == "sigmoid":
        return nn.Sigmoid()
    return nn.Identity()


# Activations whose autograd saves only their input (not their output) and which return a new tensor: their
# output may be scaled in place. Not relu/tanh/sigmoid (backward reads the output) nor identity (returns x).
_SAVES_INPUT_ONLY = frozenset({"gelu", "silu", "elu", "leaky_relu"})


class GammaAct(nn.Module):
    """phi(x) * gamma_phi: an activation rescaled to preserve unit variance (NF networks)."""

    def __init__(self, name: str, gamma: float | None = None) -> None:
        super().__init__()
        self.name = canonical_act_name(name)
        self.fn = ACT_FNS[self.name]
        self.gamma = NF_ACT_GAMMA[self.name] if gamma is None else float(gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name in _SAVES_INPUT_ONLY:
            # In place on phi(x)'s fresh output (as timm's GammaAct): its backward needs only x, and a fresh
            # full-size tensor per activation costs an allocation and its page faults on CPU.
            return self.fn(x).mul_(self.gamma)
        return self.fn(x) * self.gamma

    def extra_repr(self) -> str:
        return f"{self.name}, gamma={self.gamma:.6f}"


def act_vjp(grad: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """grad * phi'(u) for relu, silu, gelu, identity: the one place that differentiates these activations by hand.

    ATen's fused activation-backward kernels (one pass, no phi' tensor). Twice differentiable: under grad mode
    (a create_graph backward) SiLU uses its closed form phi'(u) = s (1 + u (1 - s)), s = sigmoid(u), because
    ATen's `silu_backward` has no derivative of its own; `threshold_backward` and `gelu_backward` have one.
    phi'(0) = 0 for relu, as torch.relu's backward.
    """
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, u, 0)
    if act == "silu":
        if torch.is_grad_enabled():
            s = torch.sigmoid(u)
            return grad * s * (1.0 + u * (1.0 - s))
        return torch.ops.aten.silu_backward(grad, u)
    if act == "gelu":
        return torch.ops.aten.gelu_backward(grad, u, approximate="none")
    if act == "identity":
        return grad
    raise ValueError(f"act_vjp supports relu, silu, gelu and identity, got {act!r}")
