"""Which parameters get weight decay: conv/linear weights and the Proxy Norm proxy parameters.

Not decayed: biases, norm gains and shifts (including PN's gamma, beta), NF gains and skip gains
(REFERENCE.md: "Weight decay applies to beta~, gamma~ only among the PN parameters"; NFNets: "not on
gains/biases").
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ipu_norm.layers.proxy_norm import PROXY_PARAM_NAMES

_DECAYED_WEIGHT_OWNERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def iter_decay_flags(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, decayed?) for every trainable parameter of model, each parameter once."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            decayed = (local == "weight" and isinstance(module, _DECAYED_WEIGHT_OWNERS)) or local in PROXY_PARAM_NAMES
            yield (f"{mod_name}.{local}" if mod_name else local), p, decayed


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer parameter groups: decayed (weight_decay) and not decayed (0.0)."""
    decay, no_decay = [], []
    for _, p, decayed in iter_decay_flags(model):
        (decay if decayed else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
