"""ResNet-18/34/50/101/152 (He et al. 2016, torchvision "v1.5" layout) with any norm string.

Architecture (identical to torchvision.models.resnet, so BN models import its weights):
- stem: 7x7/2 conv (64) -> norm+ReLU -> 3x3/2 max-pool;
- blocks: BasicBlock (3x3, 3x3) for ResNet-18/34, Bottleneck (1x1, 3x3, 1x1, expansion 4) for 50/101/152,
  the stride on the 3x3 conv (v1.5); shortcut = identity, or 1x1 conv (stride) + norm when the shape changes;
- each conv is followed by `create_norm_act(norm, C, act)`: ReLU inside the branch, act=None for the last
  norm of the branch (with '+pn' norms that last norm has a plain affine, no Proxy Norm, since PN needs an
  activation to correct); out = relu(branch + shortcut);
- head: global average pool -> dropout -> Linear.

`zero_init_last=True` zeroes the gain of the last norm of every residual branch (Goyal et al. 2017), so
each block starts as the identity. `drop_path_rate` adds stochastic depth on the residual branches (not in
torchvision; rate * i / (N - 1) for block i of N, as timm's ResNet), default 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ipu_norm.layers.drop_path import DropPath
from ipu_norm.layers.norm_act import create_norm_act, parse_norm
from ipu_norm.models.base import StemBlocksHead
from ipu_norm.models.registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ClassifierHead", "ResNet", "ResNetStem"]


def _norm_act(norm: str, channels: int, act: str | None, norm_kw: dict[str, Any], zero_init: bool = False) -> nn.Module:
    return create_norm_act(norm, channels, act, zero_init=zero_init, **norm_kw)


class ClassifierHead(nn.Module):
    """Global average pool -> flatten -> dropout -> Linear (`.fc`)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


class ResNetStem(nn.Module):
    """7x7/2 conv -> norm+ReLU -> 3x3/2 max-pool."""

    def __init__(self, in_chans: int, out_chans: int, norm: str, norm_kw: dict[str, Any]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 7, stride=2, padding=3, bias=False)
        self.norm = _norm_act(norm, out_chans, "relu", norm_kw)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(self.conv(x)))


class Downsample(nn.Module):
    """Projection shortcut: 1x1 conv (stride) -> norm without activation."""

    def __init__(self, in_chans: int, out_chans: int, stride: int, norm: str, norm_kw: dict[str, Any]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False)
        self.norm = _norm_act(norm, out_chans, None, norm_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def _add_relu_(branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """relu(branch + shortcut), in place on `branch`: the residual branch's last op is a norm (or a conv) whose
    backward does not read its own output, so the sum and ReLU need no fresh full-size tensors (as timm's blocks)."""
    return F.relu_(branch.add_(shortcut))


class BasicBlock(nn.Module):
    """3x3 (stride) -> norm+ReLU -> 3x3 -> norm; relu(branch + shortcut)."""

    expansion = 1

    def __init__(
        self,
        in_chans: int,
        width: int,
        stride: int,
        norm: str,
        norm_kw: dict[str, Any],
        zero_init_last: bool,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        out_chans = width * self.expansion
        # Registration order (conv1, norm1, conv2, norm2, downsample) matches torchvision: the weight
        # importer pairs modules in state-dict order.
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm_act(norm, width, "relu", norm_kw)
        self.conv2 = nn.Conv2d(width, out_chans, 3, padding=1, bias=False)
        self.norm2 = _norm_act(norm, out_chans, None, norm_kw, zero_init=zero_init_last)
        self.downsample = (
            Downsample(in_chans, out_chans, stride, norm, norm_kw) if stride != 1 or in_chans != out_chans else None
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        return _add_relu_(self.drop_path(out), shortcut)


class Bottleneck(nn.Module):
    """1x1 -> norm+ReLU -> 3x3 (stride) -> norm+ReLU -> 1x1 (x4) -> norm; relu(branch + shortcut)."""

    expansion = 4

    def __init__(
        self,
        in_chans: int,
        width: int,
        stride: int,
        norm: str,
        norm_kw: dict[str, Any],
        zero_init_last: bool,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        out_chans = width * self.expansion
        self.conv1 = nn.Conv2d(in_chans, width, 1, bias=False)
        self.norm1 = _norm_act(norm, width, "relu", norm_kw)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _norm_act(norm, width, "relu", norm_kw)
        self.conv3 = nn.Conv2d(width, out_chans, 1, bias=False)
        self.norm3 = _norm_act(norm, out_chans, None, norm_kw, zero_init=zero_init_last)
        self.downsample = (
            Downsample(in_chans, out_chans, stride, norm, norm_kw) if stride != 1 or in_chans != out_chans else None
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.norm1(self.conv1(x))
        out = self.norm2(self.conv2(out))
        out = self.norm3(self.conv3(out))
        return _add_relu_(self.drop_path(out), shortcut)


class ResNet(StemBlocksHead):
    """ResNet following the model contract: `.stem`, `.blocks` (flat), `.head` (`.head.fc`).

    Args:
        block: BasicBlock or Bottleneck.
        depths: number of blocks per stage (4 stages, strides 1, 2, 2, 2).
        widths: branch width of each stage (the output has width * block.expansion channels).
        norm: norm string for `create_norm_act` ('bn', 'gn', 'ln', 'gn+pn', 'ln+pn', 'none').
        norm_groups: GroupNorm groups for 'gn' (default of create_norm_act: 4).
        eps: the norm's epsilon (default of create_norm_act: 1e-5 for bn, 1e-3 for gn/ln).
        zero_init_last: zero the last norm gain of every residual branch.
        drop_rate: dropout before the classifier; drop_path_rate: stochastic depth of the last block.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, ...],
        widths: tuple[int, ...] = (64, 128, 256, 512),
        norm: str = "bn",
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_width: int = 64,
        zero_init_last: bool = False,
        norm_groups: int | None = None,
        eps: float | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"depths {depths} and widths {widths} must have the same length")
        self.norm = str(parse_norm(norm))
        norm_kw: dict[str, Any] = {"groups": norm_groups, "eps": eps}
        self.stem = ResNetStem(in_chans, stem_width, self.norm, norm_kw)
        blocks: list[nn.Module] = []
        chans = stem_width
        n_blocks = sum(depths)
        for stage, (depth, width) in enumerate(zip(depths, widths)):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                dpr = drop_path_rate * len(blocks) / max(n_blocks - 1, 1)
                blocks.append(block(chans, width, stride, self.norm, norm_kw, zero_init_last, dpr))
                chans = width * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.num_features = chans
        self.head = ClassifierHead(chans, num_classes, drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's init: He-normal (fan_out) convs; norm layers keep their own init (gain 1 or 0 for
        # zero_init_last, shift 0, PN proxy params 0); the Linear keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")





_CFGS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def _create_resnet(
    name: str,
    norm: str = "bn",
    num_classes: int = 1000,
    zero_init_last: bool = False,
    norm_groups: int | None = None,
    drop_rate: float = 0.0,
    **kw: Any,
) -> ResNet:
    block, depths = _CFGS[name]
    model = ResNet(
        block, depths, norm=norm, num_classes=num_classes, zero_init_last=zero_init_last,
        norm_groups=norm_groups, drop_rate=drop_rate, **kw,
    )
    model.default_cfg = {
        "train_size": 224, "test_size": 224, "num_classes": num_classes, "norm": model.norm, "family": "resnet",
        "arch": name,
    }
    return model


@register_model
def resnet18(norm: str = "bn", num_classes: int = 1000, zero_init_last: bool = False,
             norm_groups: int | None = None, drop_rate: float = 0.0, **kw: Any) -> ResNet:
    """ResNet-18 (BasicBlock, depths 2-2-2-2), 11.69M params with BN."""
    return _create_resnet("resnet18", norm, num_classes, zero_init_last, norm_groups, drop_rate, **kw)


@register_model
def resnet34(norm: str = "bn", num_classes: int = 1000, zero_init_last: bool = False,
             norm_groups: int | None = None, drop_rate: float = 0.0, **kw: Any) -> ResNet:
    """ResNet-34 (BasicBlock, depths 3-4-6-3), 21.80M params with BN."""
    return _create_resnet("resnet34", norm, num_classes, zero_init_last, norm_groups, drop_rate, **kw)


@register_model
def resnet50(norm: str = "bn", num_classes: int = 1000, zero_init_last: bool = False,
             norm_groups: int | None = None, drop_rate: float = 0.0, **kw: Any) -> ResNet:
    """ResNet-50 (Bottleneck, depths 3-4-6-3), 25.56M params with BN."""
    return _create_resnet("resnet50", norm, num_classes, zero_init_last, norm_groups, drop_rate, **kw)


@register_model
def resnet101(norm: str = "bn", num_classes: int = 1000, zero_init_last: bool = False,
              norm_groups: int | None = None, drop_rate: float = 0.0, **kw: Any) -> ResNet:
    """ResNet-101 (Bottleneck, depths 3-4-23-3), 44.55M params with BN."""
    return _create_resnet("resnet101", norm, num_classes, zero_init_last, norm_groups, drop_rate, **kw)


@register_model
def resnet152(norm: str = "bn", num_classes: int = 1000, zero_init_last: bool = False,
              norm_groups: int | None = None, drop_rate: float = 0.0, **kw: Any) -> ResNet:
    """ResNet-152 (Bottleneck, depths 3-8-36-3), 60.19M params with BN."""
    return _create_resnet("resnet152", norm, num_classes, zero_init_last, norm_groups, drop_rate, **kw)
