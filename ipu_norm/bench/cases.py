"""The benchmark groups: each ipu_norm model next to its timm peer (and the ablations that share its run).

| group           | ipu_norm rows                                   | timm peer                                   |
|-----------------|-------------------------------------------------|---------------------------------------------|
| effnet_b0_bn    | efficientnet_b0 norm=bn                         | efficientnet_b0                             |
| effnet_b0_gn    | efficientnet_b0 norm=gn+pn, ln+pn, gn           | efficientnet_b0, GroupNormAct(4 groups)     |
| resnet50_bn     | resnet50 norm=bn                                | resnet50                                    |
| resnet50_gn     | resnet50 norm=gn+pn, ln+pn, gn                  | resnet50, GroupNorm(4 groups)               |
| nfnet_f0_agc    | nfnet_f0 + AGC, nfnet_f0 without AGC            | dm_nfnet_f0 + timm.utils.adaptive_clip_grad |

timm has no Proxy Norm, so for GN+PN the nearest peer is timm's model with a GroupNorm norm layer (same
groups and eps as ipu_norm's 'gn'); the like-for-like architecture+norm comparison of that group is
ipu_norm 'gn' vs timm GN, and 'gn+pn' vs ipu_norm 'gn' is the Proxy Norm overhead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ipu_norm.bench.harness import ClipFactory, Variant, params_excluding
from ipu_norm.layers.norm_act import DEFAULT_EPS, DEFAULT_GN_GROUPS

# AGC clip factor for the benchmark. Its value does not change the cost of the clip call.
AGC_CLIP = 0.01
# Dropout and stochastic depth off on both sides: their defaults differ between the libraries, and they
# would make the step cost depend on random draws.
NO_DROP = {"drop_rate": 0.0, "drop_path_rate": 0.0}
# NFNet-F0's training resolution (Brock et al. 2021, Table 6); the AGC share goal is stated at it.
NFNET_F0_TRAIN_RESOLUTION = 192


@dataclass
class Group:
    """Variants timed interleaved in one run, and which ratios to report from them."""

    name: str
    variants: list[Variant]
    # (numerator row, denominator row, label, goal): ratio = throughput(numerator) / throughput(denominator)
    ratios: list[tuple[str, str, str, str]] = field(default_factory=list)
    # (row with PN, row without PN): reported as PN overhead in step time.
    pn_pair: tuple[str, str] | None = None
    # (row with AGC, row without AGC): reported as AGC overhead.
    agc_pair: tuple[str, str] | None = None
    # Prototype rows: more (with PN, without PN) pairs, and more rows whose clip share is reported.
    extra_pn_pairs: list[tuple[str, str]] = field(default_factory=list)
    extra_agc_rows: list[str] = field(default_factory=list)
    # A fixed image size for this group (e.g. a model's training resolution), else each of --resolution.
    resolution: int | None = None


def _ipu(name: str, num_classes: int, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ipu_norm.models import create_model  # noqa: PLC0415 - families may still be landing

        return create_model(name, num_classes=num_classes, **kw)

    return build


def _timm(name: str, num_classes: int, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm  # noqa: PLC0415 - only the benchmark needs timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, **NO_DROP, **kw)

    return build


def timm_agc(clip_factor: float = AGC_CLIP) -> ClipFactory:
    """timm.utils.adaptive_clip_grad over every parameter except the classifier's."""

    def factory(model: nn.Module) -> Callable[[], None]:
        from timm.utils import adaptive_clip_grad  # noqa: PLC0415

        params = params_excluding(model, [model.get_classifier()])
        return functools.partial(adaptive_clip_grad, params, clip_factor=clip_factor)

    return factory


def ipu_norm_agc(clip_factor: float = AGC_CLIP) -> ClipFactory:
    """ipu_norm.optim.agc.AGC over the model (it excludes `model.get_classifier()` itself)."""

    def factory(model: nn.Module) -> Callable[[], None]:
        from ipu_norm.optim.agc import AGC  # noqa: PLC0415

        return AGC(model, clip_factor=clip_factor).clip_

    return factory


def build_groups(num_classes: int = 1000, names: list[str] | None = None) -> list[Group]:
    """The benchmark groups (all, or those named), with their variants and reported ratios.
    """
    gn_eps = DEFAULT_EPS["gn"]
    groups = [
        Group(
            "effnet_b0_bn",
            [
                Variant("ipu_norm efficientnet_b0 bn", "ipu_norm",
                        _ipu("efficientnet_b0", num_classes, norm="bn", **NO_DROP)),
                Variant("timm efficientnet_b0", "timm", _timm("efficientnet_b0", num_classes)),
            ],
            ratios=[("ipu_norm efficientnet_b0 bn", "timm efficientnet_b0", "EffNet-B0 BN vs timm", ">=1.0")],
        ),
        Group(
            "effnet_b0_gn",
            [
                Variant("ipu_norm efficientnet_b0 gn+pn", "ipu_norm",
                        _ipu("efficientnet_b0", num_classes, norm="gn+pn", **NO_DROP)),
                Variant("ipu_norm efficientnet_b0 ln+pn", "ipu_norm",
                        _ipu("efficientnet_b0", num_classes, norm="ln+pn", **NO_DROP)),
                Variant("ipu_norm efficientnet_b0 gn", "ipu_norm",
                        _ipu("efficientnet_b0", num_classes, norm="gn", **NO_DROP)),
                Variant(
                    "timm efficientnet_b0 gn", "timm",
                    _timm("efficientnet_b0", num_classes, norm_layer=functools.partial(
                        _timm_group_norm_act(), num_groups=DEFAULT_GN_GROUPS, eps=gn_eps)),
                    note="timm GroupNormAct, 4 groups: nearest peer of GN+PN (timm has no Proxy Norm)",
                ),
            ],
            ratios=[
                ("ipu_norm efficientnet_b0 gn+pn", "timm efficientnet_b0 gn", "EffNet-B0 GN+PN vs timm GN (peer)",
                 ">=1.0"),
                ("ipu_norm efficientnet_b0 gn", "timm efficientnet_b0 gn", "EffNet-B0 GN vs timm GN", ">=1.0"),
            ],
            pn_pair=("ipu_norm efficientnet_b0 gn+pn", "ipu_norm efficientnet_b0 gn"),
            # LN+PN (the flagship configs/effnet_b0_proxy.yml) against the same GN row.
            extra_pn_pairs=[("ipu_norm efficientnet_b0 ln+pn", "ipu_norm efficientnet_b0 gn")],
        ),
        Group(
            "resnet50_bn",
            [
                Variant("ipu_norm resnet50 bn", "ipu_norm", _ipu("resnet50", num_classes, norm="bn")),
                Variant("timm resnet50", "timm", _timm("resnet50", num_classes)),
            ],
            ratios=[("ipu_norm resnet50 bn", "timm resnet50", "ResNet-50 BN vs timm", ">=1.0")],
        ),
        Group(
            "resnet50_gn",
            [
                Variant("ipu_norm resnet50 gn+pn", "ipu_norm", _ipu("resnet50", num_classes, norm="gn+pn")),
                Variant("ipu_norm resnet50 ln+pn", "ipu_norm", _ipu("resnet50", num_classes, norm="ln+pn")),
                Variant("ipu_norm resnet50 gn", "ipu_norm", _ipu("resnet50", num_classes, norm="gn")),
                Variant(
                    "timm resnet50 gn", "timm",
                    _timm("resnet50", num_classes, norm_layer=functools.partial(
                        _timm_group_norm(), num_groups=DEFAULT_GN_GROUPS, eps=gn_eps)),
                    note="timm GroupNorm, 4 groups: nearest peer of GN+PN (timm has no Proxy Norm)",
                ),
            ],
            ratios=[
                ("ipu_norm resnet50 gn+pn", "timm resnet50 gn", "ResNet-50 GN+PN vs timm GN (peer)", ">=1.0"),
                ("ipu_norm resnet50 gn", "timm resnet50 gn", "ResNet-50 GN vs timm GN", ">=1.0"),
            ],
            pn_pair=("ipu_norm resnet50 gn+pn", "ipu_norm resnet50 gn"),
            extra_pn_pairs=[("ipu_norm resnet50 ln+pn", "ipu_norm resnet50 gn")],
        ),
        Group(
            "nfnet_f0_agc",
            [
                Variant("ipu_norm nfnet_f0 +agc", "ipu_norm", _ipu("nfnet_f0", num_classes, **NO_DROP),
                        clip=ipu_norm_agc()),
                Variant("ipu_norm nfnet_f0 no-agc", "ipu_norm", _ipu("nfnet_f0", num_classes, **NO_DROP)),
                Variant("timm dm_nfnet_f0 +agc", "timm", _timm("dm_nfnet_f0", num_classes), clip=timm_agc(),
                        note="timm's dm_nfnet_f0 uses TF 'same' padding convs (dynamic pad)"),
            ],
            ratios=[("ipu_norm nfnet_f0 +agc", "timm dm_nfnet_f0 +agc", "NFNet-F0 + AGC vs timm", ">=1.0")],
            agc_pair=("ipu_norm nfnet_f0 +agc", "ipu_norm nfnet_f0 no-agc"),
            resolution=NFNET_F0_TRAIN_RESOLUTION,
        ),
    ]
    if names:
        unknown = set(names) - {g.name for g in groups}
        if unknown:
            raise ValueError(f"unknown benchmark group(s) {sorted(unknown)}; known: {[g.name for g in groups]}")
        groups = [g for g in groups if g.name in names]
    return groups


def _timm_group_norm_act() -> type:
    from timm.layers import GroupNormAct  # noqa: PLC0415

    return GroupNormAct


def _timm_group_norm() -> type:
    from timm.layers import GroupNorm  # noqa: PLC0415

    return GroupNorm


GROUP_NAMES = ("effnet_b0_bn", "effnet_b0_gn", "resnet50_bn", "resnet50_gn", "nfnet_f0_agc")
