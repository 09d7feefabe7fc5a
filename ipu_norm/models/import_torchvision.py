"""Import torchvision ResNet / EfficientNet weights into the BN models of this package.

The mapping is structural, not a per-model name table: both state dicts are split into per-module groups
(conv, batch norm, linear, ...) in registration order, and the i-th group of the source is paired with the
i-th group of the destination. Our ResNet and EfficientNet register their layers in torchvision's order
(stem conv/norm, per block: convs and norms in forward order, SE fc1/fc2, then the shortcut conv/norm,
head conv/norm, classifier), so the pairing is exact; every pair must agree in kind, parameter names and
shapes, otherwise the import fails with the list of groups that could not be mapped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["WeightImportError", "load_torchvision_weights", "map_state_dict"]

# Buffers a BN state dict may lack (checkpoints saved before PyTorch 0.4.1 have no num_batches_tracked).
_OPTIONAL_KEYS = ("num_batches_tracked",)


class WeightImportError(RuntimeError):
    """The source and destination state dicts could not be paired module by module."""


def _groups(state: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Split a state dict into (module prefix, {local name: tensor}) groups, in state-dict order."""
    groups: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    for key, value in state.items():
        prefix, _, local = key.rpartition(".")
        groups.setdefault(prefix, {})[local] = value
    return list(groups.items())


def _kind(tensors: Mapping[str, torch.Tensor]) -> str:
    """'bn', 'conv', 'linear' or 'other' from a module's state (names and shapes)."""
    if "running_mean" in tensors:
        return "bn"
    w = tensors.get("weight")
    if w is not None and w.dim() == 4:
        return "conv"
    if w is not None and w.dim() == 2:
        return "linear"
    if w is not None and w.dim() == 1:
        return "affine-norm"  # GroupNorm / LayerNorm / a norm gain without running statistics
    return "other"


def _describe(prefix: str, tensors: Mapping[str, torch.Tensor]) -> str:
    shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in tensors.items() if k not in _OPTIONAL_KEYS)
    return f"{prefix or '<root>'} [{_kind(tensors)}: {shapes}]"


def map_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> list[tuple[str, str]]:
    """Pair every source key with a target key by module structure; raise WeightImportError if they differ.

    Returns the (source key, target key) pairs. Keys in _OPTIONAL_KEYS may be absent from the source
    (the target keeps its value).
    """
    src_groups, dst_groups = _groups(source), _groups(target)
    pairs: list[tuple[str, str]] = []
    problems: list[str] = []
    for (sp, st), (dp, dt) in zip(src_groups, dst_groups):
        s_names = {k for k in st if k not in _OPTIONAL_KEYS}
        d_names = {k for k in dt if k not in _OPTIONAL_KEYS}
        ok = _kind(st) == _kind(dt) and s_names == d_names and all(st[k].shape == dt[k].shape for k in s_names)
        if not ok:
            problems.append(f"  source {_describe(sp, st)}\n    != target {_describe(dp, dt)}")
            continue
        for local in st:
            if local in dt:
                pairs.append((f"{sp}.{local}" if sp else local, f"{dp}.{local}" if dp else local))
    n = min(len(src_groups), len(dst_groups))
    unmapped = [_describe(p, t) for p, t in src_groups[n:]]
    missing = [_describe(p, t) for p, t in dst_groups[n:]]
    if problems or unmapped or missing:
        msg = [f"cannot map state dict ({len(src_groups)} source modules, {len(dst_groups)} target modules)"]
        if problems:
            msg.append(f"{len(problems)} module pair(s) differ (first 10):\n" + "\n".join(problems[:10]))
        if unmapped:
            msg.append(f"unmapped source modules ({len(unmapped)}): " + "; ".join(unmapped[:10]))
        if missing:
            msg.append(f"target modules missing from the source ({len(missing)}): " + "; ".join(missing[:10]))
        raise WeightImportError("\n".join(msg))
    return pairs


def _check_bn_eps(model: nn.Module, tv_model: nn.Module) -> None:
    # eps and the norm type are not in the state dict; compare them module by module when we have one.
    ours = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    theirs = [m for m in tv_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bad = [(a.eps, b.eps) for a, b in zip(ours, theirs) if a.eps != b.eps]
    if bad:
        raise WeightImportError(
            f"{len(bad)} BatchNorm layer(s) have a different eps than the torchvision model "
            f"(ours, theirs) = {bad[0]}: the logits would differ; build the model with eps={bad[0][1]}"
        )


def load_torchvision_weights(
    model: nn.Module, tv_model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]
) -> list[tuple[str, str]]:
    """Copy the weights of a torchvision ResNet / EfficientNet (module or state dict) into `model`.

    `model` must be the matching architecture of this package built with norm='bn' (and num_classes equal
    to the source classifier's). With a torchvision module, the BN eps values are checked as well. All
    parameters and buffers (BN running statistics included) are copied; raises WeightImportError listing
    the unmapped/missing modules if the structures differ. Returns the (source key, model key) pairs.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise WeightImportError("torchvision weights need a BatchNorm model (build it with norm='bn')")
    if isinstance(tv_model_or_state_dict, nn.Module):
        _check_bn_eps(model, tv_model_or_state_dict)
        source = tv_model_or_state_dict.state_dict()
    else:
        source = tv_model_or_state_dict
    target = model.state_dict()
    pairs = map_state_dict(source, target)
    new_state = dict(target)
    for src_key, dst_key in pairs:
        new_state[dst_key] = source[src_key].detach().to(dtype=target[dst_key].dtype)
    model.load_state_dict(new_state, strict=True)
    return pairs
