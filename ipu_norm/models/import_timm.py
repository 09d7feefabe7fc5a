"""Import timm weights (`dm_nfnet_f0`..`dm_nfnet_f7`, `nf_resnet50`) into ipu_norm's NF models.

timm keeps NF blocks per stage (``stages.<s>.<b>.*``) while ipu_norm's model contract has one flat
``blocks`` sequence, and a few modules are named differently:

=====================================  =====================================
timm                                   ipu_norm
=====================================  =====================================
stem.conv1 .. stem.conv4 / stem.conv   stem.conv1 .. stem.conv4 / stem.conv
stages.s.b.downsample.conv             blocks.i.shortcut.conv
stages.s.b.conv1/conv2/conv2b/conv3    blocks.i.conv1/conv2/conv2b/conv3
stages.s.b.attn_last.fc1/fc2           blocks.i.se.fc1/fc2
stages.s.b.skipinit_gain               blocks.i.skip_gain
final_conv                             head.conv
head.fc                                head.fc
=====================================  =====================================

timm's ScaledStdConv2d uses its own standardization form, W * gain * gamma / sqrt(N) standardized with
sqrt(var + eps), eps = 1e-5, for the DeepMind-compatible `dm_nfnet_*` models too. With
``match_weight_std=True`` (default) every ScaledStdConv2d of the target is switched to that form and to
the source layer's eps, which is what makes the logits equal (see ipu_norm/layers/weight_std.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ipu_norm.layers.weight_std import WS_DEFAULT_EPS, ScaledStdConv2d

__all__ = ["convert_timm_state_dict", "load_timm_weights", "timm_key_to_ipu_norm"]

_STAGE_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)$")
_BLOCK_RENAMES = (
    ("downsample.conv.", "shortcut.conv."),
    ("attn_last.", "se."),
)


def _stage_offsets(keys: list[str]) -> dict[int, int]:
    """First flat block index of each timm stage, from the stage/block indices present in the keys."""
    depth: dict[int, int] = {}
    for k in keys:
        m = _STAGE_KEY.match(k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            depth[s] = max(depth.get(s, 0), b + 1)
    offsets, total = {}, 0
    for s in sorted(depth):
        offsets[s] = total
        total += depth[s]
    return offsets


def timm_key_to_ipu_norm(key: str, stage_offsets: Mapping[int, int]) -> str:
    """Name of the ipu_norm parameter that holds timm's parameter `key`."""
    m = _STAGE_KEY.match(key)
    if m:
        s, b, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if rest == "skipinit_gain":
            rest = "skip_gain"
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
        return f"blocks.{stage_offsets[s] + b}.{rest}"
    if key.startswith("final_conv."):
        return "head.conv." + key[len("final_conv."):]
    return key  # stem.* and head.fc.* keep their names


def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm NormFreeNet state dict -> ipu_norm NormFreeNet state dict (names only; tensors are shared)."""
    offsets = _stage_offsets(list(state_dict))
    return {timm_key_to_ipu_norm(k, offsets): v for k, v in state_dict.items()}


def _timm_conv_spec(module: nn.Module) -> tuple[float, float, tuple[int, int], bool]:
    """(gamma, eps, static padding, dynamic SAME?) of a timm ScaledStdConv2d[Same]."""
    fan_in = module.weight[0].numel()
    gamma = float(module.scale) * fan_in ** 0.5  # timm stores gamma / sqrt(fan_in)
    return gamma, float(module.eps), tuple(module.padding), bool(getattr(module, "same_pad", False))


def _check_and_match_convs(model: nn.Module, source: nn.Module, offsets: Mapping[int, int],
                           match_weight_std: bool) -> None:
    """Check that every timm std-conv has a twin with the same gamma / padding, and match the WS form."""
    ours = dict(model.named_modules())
    for name, mod in source.named_modules():
        if not hasattr(mod, "gain") or not hasattr(mod, "scale") or not isinstance(mod, nn.Conv2d):
            continue
        target_name = timm_key_to_ipu_norm(name + ".weight", offsets)[: -len(".weight")]
        tgt = ours.get(target_name)
        if not isinstance(tgt, ScaledStdConv2d):
            raise ValueError(f"timm conv {name!r} has no ScaledStdConv2d twin ({target_name!r}) in the model")
        gamma, eps, padding, same = _timm_conv_spec(mod)
        if abs(gamma - tgt.gamma) > 1e-6 * max(1.0, gamma):
            raise ValueError(
                f"{target_name}: timm folds gamma={gamma:.6f} into the conv, the model uses {tgt.gamma:.6f} "
                "(activation-gamma placement differs: build the matching ipu_norm architecture)"
            )
        if tuple(tgt.padding) != padding or tgt.tf_same != same or tuple(tgt.stride) != tuple(mod.stride):
            raise ValueError(f"{target_name}: padding/stride differ from timm's {name!r}")
        if match_weight_std:
            tgt.set_form("timm", eps)


def load_timm_weights(
    model: nn.Module,
    timm_model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    match_weight_std: bool = True,
    include_classifier: bool = True,
    strict: bool = True,
) -> nn.Module:
    """Copy a timm `dm_nfnet_f*` / `nf_resnet50` model (or its state dict) into an ipu_norm NF model.

    model: an ipu_norm NormFreeNet of the same architecture (nfnet_fK for dm_nfnet_fK, nf_resnet50).
    match_weight_std: switch every ScaledStdConv2d to timm's standardization form and eps (the source
        module's eps when a module is given, timm's default 1e-5 for a state dict), so logits match.
        With a module, gamma placement and padding of every conv are also checked against timm's.
    include_classifier: False leaves `model.get_classifier()` untouched (fine-tuning to other classes).
    strict: every target parameter must be provided (and no source tensor may be left over).
    Returns the model (modified in place).
    """
    if isinstance(timm_model_or_state_dict, nn.Module):
        source_module: nn.Module | None = timm_model_or_state_dict
        state_dict = timm_model_or_state_dict.state_dict()
    else:
        source_module = None
        state_dict = dict(timm_model_or_state_dict)
    offsets = _stage_offsets(list(state_dict))
    converted = convert_timm_state_dict(state_dict)

    classifier_keys: set[str] = set()
    if not include_classifier:
        fc = model.get_classifier()
        classifier_keys = {n for n, p in model.named_parameters() if any(p is q for q in fc.parameters())}
        converted = {k: v for k, v in converted.items() if k not in classifier_keys}

    target = model.state_dict()
    unexpected = sorted(k for k in converted if k not in target)
    missing = sorted(k for k in target if k not in converted and k not in classifier_keys)
    if strict and (unexpected or missing):
        raise KeyError(f"timm -> ipu_norm key mismatch; unexpected {unexpected[:8]}, missing {missing[:8]}")
    for k, v in converted.items():
        if k in target and target[k].shape != v.shape:
            # timm stores scalar skip gains as 0-d tensors, as we do; anything else is a real mismatch.
            raise ValueError(f"shape mismatch for {k}: model {tuple(target[k].shape)}, timm {tuple(v.shape)}")

    if source_module is not None:
        _check_and_match_convs(model, source_module, offsets, match_weight_std)
    elif match_weight_std:
        for m in model.modules():
            if isinstance(m, ScaledStdConv2d):
                m.set_form("timm", WS_DEFAULT_EPS["timm"])

    model.load_state_dict({k: v for k, v in converted.items() if k in target}, strict=False)
    if hasattr(model, "default_cfg") and match_weight_std:
        model.default_cfg["ws_form"] = "timm"
    return model
