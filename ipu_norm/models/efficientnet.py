"""EfficientNet-B0..B7 (Tan & Le 2019, V1) with BN, GN, LN, GN+PN or LN+PN, in Graphcore's G1 and G16 forms.

Architecture (identical to torchvision.models.efficientnet_b*, so BN models import its weights):
- stem: 3x3/2 conv to make_divisible(32 * width) -> norm+SiLU;
- 7 stages of MBConv blocks (expand ratio, kernel, stride, in, out, repeats):
  (1,3,1,32,16,1) (6,3,2,16,24,2) (6,5,2,24,40,2) (6,3,2,40,80,3) (6,5,1,80,112,3) (6,5,2,112,192,4)
  (6,3,1,192,320,1); channels scaled by `width` and rounded with make_divisible(., 8), repeats by
  ceil(repeats * depth);
- MBConv: [1x1 expand -> norm+SiLU] (skipped when the expand ratio is 1) -> kxk grouped/depthwise conv
  (stride) -> norm+SiLU -> squeeze-excite (rd = block input channels // 4, SiLU) -> 1x1 projection ->
  norm WITHOUT activation (for '+pn' norms a plain affine norm: no PN there, REFERENCE.md) -> stochastic
  depth + identity shortcut when stride 1 and in == out. Stochastic depth rate drop_path_rate * i / N for
  block i of N (linear, as torchvision/timm);
- head: 1x1 conv to 4 * make_divisible(320 * width) (= 1280 * width for B0..B7) -> norm+SiLU -> average
  pool -> dropout -> Linear.

G16 (Graphcore, "EfficientNet with grouped convolutions", REFERENCE.md), names efficientnet_b*_g16: every
kxk conv becomes a grouped conv with group size 16 and the expand ratio 6 becomes 4 (about the same FLOPs).
We follow Graphcore's graphcore/examples vision/cnns/pytorch implementation (efficientnet.py: expand ratio
substituted in the "ir" stages, the "ds" first stage keeps e1; then every module named "*conv_dw" is
replaced by a conv with groups = in_channels // group_dim), which means the first stage's kxk conv (expand
ratio 1) is grouped too, not depthwise. Graphcore only built B0 and B4, where that stage has 32 and 48
channels (2 and 3 groups of 16). For B3 (40) and B6 (56) channels are not divisible into groups of 16, so
we use the largest number of groups whose size is at least 16 (B3: 2 x 20, B6: 2 x 28; Graphcore's
in_channels // 16 would ask for 3 groups of 56 channels, which nn.Conv2d rejects). The expanded channels of
the other stages are multiples of 32, so their groups are exactly 16 wide. Pass `group_first_stage=False`
to keep that stage depthwise.

Train/test resolutions (default_cfg): test = the paper's resolution (224, 240, 260, 300, 380, 456, 528,
600); train = Graphcore's half-resolution sizes from REFERENCE.md for B0..B5 (160, 176, 192, 204, 252,
328). For B6/B7, which Graphcore did not publish, we apply the "half the pixels" rule those sizes roughly
follow, side = test / sqrt(2) rounded to a multiple of 8: B6 528 -> 376, B7 600 -> 424.

BN eps: 1e-5 for B0..B4 and 1e-3 for B5..B7 (momentum 0.01), as torchvision, so imported weights give
identical logits. GN/LN eps: 1e-3 (create_norm_act default, Graphcore's configs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ipu_norm.layers.drop_path import DropPath
from ipu_norm.layers.norm_act import BatchNormAct2d, create_norm_act, parse_norm
from ipu_norm.layers.squeeze_excite import SqueezeExcite
from ipu_norm.models.base import StemBlocksHead
from ipu_norm.models.registry import register_model

__all__ = ["EfficientNet", "MBConv", "make_divisible", "EFFICIENTNET_VARIANTS"]

# expand ratio, kernel, stride, in channels, out channels, repeats (B0 before scaling).
_BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)

# variant: (width, depth, dropout, train size, test size, BN eps)
EFFICIENTNET_VARIANTS: dict[str, tuple[float, float, float, int, int, float]] = {
    "b0": (1.0, 1.0, 0.2, 160, 224, 1e-5),
    "b1": (1.0, 1.1, 0.2, 176, 240, 1e-5),
    "b2": (1.1, 1.2, 0.3, 192, 260, 1e-5),
    "b3": (1.2, 1.4, 0.3, 204, 300, 1e-5),
    "b4": (1.4, 1.8, 0.4, 252, 380, 1e-5),
    "b5": (1.6, 2.2, 0.4, 328, 456, 1e-3),
    "b6": (1.8, 2.6, 0.5, 376, 528, 1e-3),
    "b7": (2.0, 3.1, 0.5, 424, 600, 1e-3),
}


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round value to the nearest multiple of divisor, never going more than 10% below value."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def conv_groups(channels: int, group_size: int) -> int:
    """Number of groups of a kxk conv: depthwise for group_size 1, else the most groups at least group_size wide."""
    if group_size <= 1:
        return channels
    for groups in range(max(channels // group_size, 1), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class ConvNormAct(nn.Module):
    """conv (no bias) -> norm (+ activation)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int,
        norm: str,
        act: str | None,
        stride: int = 1,
        groups: int = 1,
        norm_kw: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False
        )
        self.norm = create_norm_act(norm, out_chans, act, **(norm_kw or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class MBConv(nn.Module):
    """Inverted residual block: [expand 1x1] -> kxk grouped/depthwise -> SE -> project 1x1 (+ shortcut)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        group_size: int,
        norm: str,
        norm_kw: dict[str, Any],
        drop_path_rate: float = 0.0,
        se_ratio: float = 0.25,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        mid = make_divisible(in_chans * expand_ratio, 8)
        self.has_skip = stride == 1 and in_chans == out_chans
        # Registration order = torchvision's (expand, depthwise, SE, project) for the weight importer.
        self.conv_pw = ConvNormAct(in_chans, mid, 1, norm, "silu", norm_kw=norm_kw) if mid != in_chans else None
        self.conv_dw = ConvNormAct(
            mid, mid, kernel_size, norm, "silu", stride=stride, groups=conv_groups(mid, group_size), norm_kw=norm_kw
        )
        self.se = SqueezeExcite(mid, max(1, int(in_chans * se_ratio)), act="silu")
        # zero_init_last only on residual blocks: a block without shortcut would output zeros.
        self.conv_pwl = ConvNormAct(
            mid, out_chans, 1, norm, None, norm_kw={**norm_kw, "zero_init": zero_init_last and self.has_skip}
        )
        self.drop_path = DropPath(drop_path_rate) if self.has_skip and drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.conv_pw is None else self.conv_pw(x)
        out = self.conv_pwl(self.se(self.conv_dw(out)))
        if self.has_skip:
            out = self.drop_path(out) + x
        return out


class EfficientNetHead(nn.Module):
    """1x1 conv -> norm+SiLU -> average pool -> dropout -> Linear (`.fc`)."""

    def __init__(
        self, in_chans: int, num_features: int, num_classes: int, drop_rate: float, norm: str, norm_kw: dict[str, Any]
    ) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_chans, num_features, 1, norm, "silu", norm_kw=norm_kw)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.pool(self.conv(x)), 1)))


class EfficientNet(StemBlocksHead):
    """EfficientNet following the model contract: `.stem`, `.blocks` (flat list of MBConv), `.head`.

    Args:
        width, depth: channel and depth multipliers.
        norm: 'bn', 'gn', 'ln', 'gn+pn', 'ln+pn' (or 'none').
        group_size: 1 = depthwise kxk convs (G1), 16 = Graphcore's G16.
        expand_ratio: expand ratio of every stage but the first (6 for G1, 4 for G16).
        group_first_stage: group the first stage's kxk conv too (Graphcore's G16 does; see module doc).
        drop_rate: dropout before the classifier; drop_path_rate: final stochastic depth rate.
        norm_groups, eps: GroupNorm groups and norm epsilon passed to create_norm_act.
        zero_init_last: zero the projection norm gain of the residual blocks (default False, as torchvision).
        stages: override the (expand, kernel, stride, in, out, repeats) table (tiny test models).
    """

    def __init__(
        self,
        width: float = 1.0,
        depth: float = 1.0,
        norm: str = "bn",
        num_classes: int = 1000,
        in_chans: int = 3,
        group_size: int = 1,
        expand_ratio: int = 6,
        group_first_stage: bool = True,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.2,
        norm_groups: int | None = None,
        eps: float | None = None,
        zero_init_last: bool = False,
        stages: tuple[tuple[int, int, int, int, int, int], ...] = _BASE_STAGES,
    ) -> None:
        super().__init__()
        self.norm = str(parse_norm(norm))
        norm_kw: dict[str, Any] = {"groups": norm_groups, "eps": eps}
        stem_chans = make_divisible(stages[0][3] * width, 8)
        self.stem = ConvNormAct(in_chans, stem_chans, 3, self.norm, "silu", stride=2, norm_kw=norm_kw)

        plan = []
        for exp, k, s, cin, cout, reps in stages:
            if exp != 1:
                exp = expand_ratio
            gs = group_size if (exp != 1 or group_first_stage) else 1
            cin, cout = make_divisible(cin * width, 8), make_divisible(cout * width, 8)
            for i in range(int(math.ceil(reps * depth))):
                plan.append((cin if i == 0 else cout, cout, k, s if i == 0 else 1, exp, gs))
        blocks = []
        for idx, (cin, cout, k, s, exp, gs) in enumerate(plan):
            dpr = drop_path_rate * idx / len(plan)
            blocks.append(
                MBConv(cin, cout, k, s, exp, gs, self.norm, norm_kw, drop_path_rate=dpr, zero_init_last=zero_init_last)
            )
        self.blocks = nn.Sequential(*blocks)

        last = plan[-1][1]
        self.num_features = 4 * last
        self.head = EfficientNetHead(last, self.num_features, num_classes, drop_rate, self.norm, norm_kw)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's init: He-normal (fan_out) convs with zero bias, Linear U(-1/sqrt(out), 1/sqrt(out))
        # with zero bias; norm layers keep their own init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)





def _create_efficientnet(
    variant: str,
    g16: bool,
    norm: str = "bn",
    num_classes: int = 1000,
    norm_groups: int | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float = 0.2,
    zero_init_last: bool = False,
    **kw: Any,
) -> EfficientNet:
    width, depth, default_drop, train_size, test_size, bn_eps = EFFICIENTNET_VARIANTS[variant]
    kw.update(norm_groups=norm_groups, drop_path_rate=drop_path_rate, zero_init_last=zero_init_last)
    kw["drop_rate"] = default_drop if drop_rate is None else drop_rate
    if parse_norm(norm).base == "bn":
        kw.setdefault("eps", bn_eps)
    if g16:
        kw.setdefault("group_size", 16)
        kw.setdefault("expand_ratio", 4)
    model = EfficientNet(width=width, depth=depth, norm=norm, num_classes=num_classes, **kw)
    if variant in ("b5", "b6", "b7"):
        # torchvision builds B5..B7 with BN momentum 0.01 (TF-ported); only matters for BN running stats.
        for m in model.modules():
            if isinstance(m, BatchNormAct2d):
                m.momentum = 0.01
    model.default_cfg = {
        "train_size": train_size, "test_size": test_size, "num_classes": num_classes, "norm": model.norm,
        "family": "efficientnet", "arch": f"efficientnet_{variant}" + ("_g16" if g16 else ""),
        "group_size": model.blocks[-1].conv_dw.conv.in_channels // model.blocks[-1].conv_dw.conv.groups,
    }
    return model


def _doc(variant: str, g16: bool) -> str:
    width, depth, drop, train, test, _ = EFFICIENTNET_VARIANTS[variant]
    kind = "G16 (group size 16, expand ratio 4)" if g16 else "G1 (depthwise, expand ratio 6)"
    return (f"EfficientNet-{variant.upper()} {kind}: width {width}, depth {depth}, dropout {drop}, "
            f"train/test {train}/{test}. drop_rate None = the variant's dropout; other keyword arguments "
            "(eps, group_size, expand_ratio, group_first_stage, in_chans) go to EfficientNet.")


def _register(variant: str, g16: bool) -> None:
    def builder(
        norm: str = "bn",
        num_classes: int = 1000,
        norm_groups: int | None = None,
        drop_rate: float | None = None,
        drop_path_rate: float = 0.2,
        zero_init_last: bool = False,
        **kw: Any,
    ) -> EfficientNet:
        return _create_efficientnet(
            variant, g16, norm=norm, num_classes=num_classes, norm_groups=norm_groups, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate, zero_init_last=zero_init_last, **kw,
        )

    builder.__name__ = builder.__qualname__ = f"efficientnet_{variant}" + ("_g16" if g16 else "")
    builder.__doc__ = _doc(variant, g16)
    globals()[builder.__name__] = register_model(builder)


for _v in EFFICIENTNET_VARIANTS:
    _register(_v, g16=False)
    _register(_v, g16=True)
