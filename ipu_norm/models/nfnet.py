"""Normalizer-free networks: NFNet-F0..F7 (Brock et al. 2021b) and NF-ResNet-50 (Brock et al. 2021a).

No activation normalization anywhere: signal propagation is controlled analytically (REFERENCE.md).

- Every conv is a `ScaledStdConv2d` (Scaled Weight Standardization, learnable gain, bias).
- Activations are scaled by their NF gamma so a unit-variance input gives a unit-variance output.
- Residual stream h_{i+1} = h_i + alpha * f_i(h_i / beta_i), alpha = 0.2, beta_i = sqrt(expected Var(h_i)),
  where the expected variance is reset to 1 after each transition block (first block of a stage, whose
  shortcut is avgpool + 1x1 conv of the pre-activated input) and grows by alpha^2 after every block.

Block (pre-activation; shared by both families):

    out = phi(x) * beta
    shortcut = x                          or  conv1x1(avgpool2x2(out)) / conv1x1(out) for a transition block
    out = conv1x1(out) -> phi -> conv3x3 (stride, grouped) [-> phi -> conv3x3 grouped] -> phi -> conv1x1
    out = out * 2 * sigmoid(SE(out))      (NFNet only: ratio 0.5, ReLU inside)
    out = drop_path(out) * skip_gain      (stochastic depth without 1/keep rescaling)
    return out * alpha + shortcut

NFNet-F (DeepMind's reference, matched to timm's `dm_nfnet_f*`): stem 3x3 convs 16 (s2), 32, 64, 128 (s2)
with phi between them, widths [256, 512, 1536, 1536], strides [1, 2, 2, 2], depths [1, 2, 6, 3] * k,
bottleneck ratio 0.5, group width 128, two grouped 3x3 convs, SE, scalar skip gain init 0, GELU applied as
GammaAct (gamma in the activation), TensorFlow 'SAME' padding, final 1x1 conv to 2 * 1536 = 3072, phi,
global mean pool, dropout, Linear (N(0, 0.01) weight, zero bias). Stochastic depth 0.25 * i / N for block i.
Weight standardization defaults to DeepMind's form (eps 1e-4); `ipu_norm.models.import_timm` switches it
to timm's form when importing weights (see ipu_norm/layers/weight_std.py).

NF-ResNet-50 (the architecture of timm's `nf_resnet50`): stem 7x7/2 conv to 64 + 3x3/2 max-pool, pre-activation
bottlenecks (ratio 0.25, no groups, one 3x3 conv, no SE) with widths [256, 512, 1024, 2048], depths
[3, 4, 6, 3], ReLU. As in timm, the ReLU gamma is folded into every conv's weight scale (stem conv included)
rather than applied after the activation, so the final ReLU before the pool is not gamma-scaled; the last
conv of each branch has its WS gain initialised to 0 instead of a scalar skip gain; padding is PyTorch
symmetric and weight standardization uses timm's form (eps 1e-5).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ipu_norm.layers.activations import NF_ACT_GAMMA, GammaAct, canonical_act_name, create_act
from ipu_norm.layers.drop_path import DropPath
from ipu_norm.layers.squeeze_excite import SqueezeExcite
from ipu_norm.layers.weight_std import WS_FORMS, ScaledStdConv2d
from ipu_norm.models.base import StemBlocksHead
from ipu_norm.models.registry import register_model

__all__ = ["NFBlock", "NFHead", "NFNetCfg", "NFShortcut", "NormFreeNet", "NFNET_VARIANTS", "nf_resnet50",
           "nfnet_f0", "nfnet_f1", "nfnet_f2", "nfnet_f3", "nfnet_f4", "nfnet_f5", "nfnet_f6", "nfnet_f7"]

_NF_NORMS = (None, "nf", "none")


@dataclass(frozen=True)
class NFNetCfg:
    """Architecture of a normalizer-free network (see the module docstring for the two families)."""

    depths: tuple[int, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...] = (1, 2, 2, 2)
    stem: str = "nfnet"  # 'nfnet': 4 x 3x3 convs (16, 32, 64, stem_chs); 'resnet': 7x7/2 conv + 3x3/2 max-pool
    stem_chs: int = 128
    bottle_ratio: float = 0.5  # bottleneck width = out channels * ratio (rounded down to whole groups)
    group_size: int | None = 128  # channels per group of the 3x3 convs; None = dense
    extra_conv: bool = True  # second grouped 3x3 conv in the branch (NFNet)
    se_ratio: float | None = 0.5  # SE hidden = int(out * ratio); None = no SE
    num_features: int = 3072  # final 1x1 conv width; 0 = no final conv
    act: str = "gelu"
    gamma_in_act: bool = True  # True: phi(x) * gamma (DeepMind); False: gamma folded into the convs (timm NF-ResNet)
    padding: str = "same"  # 'same' (TF/Haiku SAME) or 'symmetric' (PyTorch)
    ws_form: str = "deepmind"
    skip_gain: bool = True  # scalar skip gain init 0; False: last branch conv WS gain init 0 instead
    alpha: float = 0.2
    drop_rate: float = 0.2  # dropout before the classifier
    drop_path_rate: float = 0.25  # stochastic depth rate of the last block (block i: rate * i / N)
    train_size: int = 192
    test_size: int = 256
    extra: dict = field(default_factory=dict)


class NFShortcut(nn.Module):
    """Transition shortcut: 2x2 average pool (if strided) then 1x1 ScaledStdConv2d."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, conv_layer: Callable[..., ScaledStdConv2d]) -> None:
        super().__init__()
        # ceil_mode + count_include_pad=False == Haiku's avg_pool with SAME padding on odd sizes.
        self.pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1
                     else nn.Identity())
        self.conv = conv_layer(in_chs, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class NFBlock(nn.Module):
    """Normalizer-free pre-activation bottleneck block (module docstring).

    beta: 1 / expected std of the block input; alpha: residual branch scale.
    act_layer: builds the branch activation (GammaAct, or a plain one when gamma is folded into the convs).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int = 1,
        alpha: float = 0.2,
        beta: float = 1.0,
        bottle_ratio: float = 0.5,
        group_size: int | None = None,
        extra_conv: bool = False,
        se_ratio: float | None = None,
        act_layer: Callable[[], nn.Module],
        conv_layer: Callable[..., ScaledStdConv2d],
        drop_path_rate: float = 0.0,
        skip_gain: bool = True,
    ) -> None:
        super().__init__()
        mid_chs = int(out_chs * bottle_ratio)
        if group_size:
            groups = max(mid_chs // group_size, 1)
            mid_chs = groups * group_size  # whole groups, as DeepMind's NFBlock
        else:
            groups = 1
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.stride = stride
        self.is_transition = in_chs != out_chs or stride != 1
        self.shortcut = NFShortcut(in_chs, out_chs, stride, conv_layer) if self.is_transition else None
        self.act1 = act_layer()
        self.conv1 = conv_layer(in_chs, mid_chs, 1)
        self.act2 = act_layer()
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, groups=groups)
        if extra_conv:
            self.act2b = act_layer()
            self.conv2b = conv_layer(mid_chs, mid_chs, 3, groups=groups)
        else:
            self.act2b = self.conv2b = None
        self.act3 = act_layer()
        # Without a scalar skip gain, timm zero-initialises the last conv's WS gain to get the same identity init.
        self.conv3 = conv_layer(mid_chs, out_chs, 1, gain_init=1.0 if skip_gain else 0.0)
        self.se = (SqueezeExcite(out_chs, max(1, int(out_chs * se_ratio)), act="relu", gate_scale=2.0)
                   if se_ratio else None)
        self.drop_path = DropPath(drop_path_rate, scale_by_keep=False)
        self.skip_gain = nn.Parameter(torch.zeros(())) if skip_gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(self.act2(self.conv1(out)))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        out = self.conv3(self.act3(out))
        if self.se is not None:
            out = self.se(out)
        out = self.drop_path(out)
        if self.skip_gain is not None:
            out = out * self.skip_gain
        # One fused shortcut + alpha * out (one output tensor instead of two).
        return torch.add(shortcut, out, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.6f}, transition={self.is_transition}"


class NFHead(nn.Module):
    """Final 1x1 conv (optional) -> activation -> global mean pool -> dropout -> Linear `fc`."""

    def __init__(
        self,
        in_chs: int,
        num_features: int,
        num_classes: int,
        *,
        act_layer: Callable[[], nn.Module],
        conv_layer: Callable[..., ScaledStdConv2d],
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if num_features:
            self.conv = conv_layer(in_chs, num_features, 1)
        else:
            self.conv = nn.Identity()
            num_features = in_chs
        self.num_features = num_features
        self.act = act_layer()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.flatten(self.pool(self.act(self.conv(x))))))


def _make_stem(cfg: NFNetCfg, in_chans: int, act_layer: Callable[[], nn.Module],
               conv_layer: Callable[..., ScaledStdConv2d]) -> nn.Sequential:
    if cfg.stem == "nfnet":
        c = cfg.stem_chs
        chs, strides = (c // 8, c // 4, c // 2, c), (2, 1, 1, 2)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        prev = in_chans
        for i, (ch, s) in enumerate(zip(chs, strides), start=1):
            layers[f"conv{i}"] = conv_layer(prev, ch, 3, stride=s)
            if i < len(chs):  # no activation after the last stem conv: the first block pre-activates
                layers[f"act{i}"] = act_layer()
            prev = ch
        return nn.Sequential(layers)
    if cfg.stem == "resnet":
        return nn.Sequential(OrderedDict(
            conv=conv_layer(in_chans, cfg.stem_chs, 7, stride=2),
            pool=nn.MaxPool2d(3, stride=2, padding=1),
        ))
    raise ValueError(f"unknown NF stem {cfg.stem!r}")


class NormFreeNet(StemBlocksHead):
    """Normalizer-free network following the project's model contract (ipu_norm/models/registry.py).

    Keyword args (None = the cfg's value): drop_rate (dropout before fc), drop_path_rate (stochastic depth of
    the last block), ws_form / ws_eps (weight standardization, ipu_norm/layers/weight_std.py), zero_init_last
    (default True: skip gains / last WS gains start at 0; False starts them at 1).

    Attributes beyond the contract: `expected_vars[i]` (expected variance of the residual stream entering
    block i, beta_i = expected_vars[i] ** -0.5), `block_stage[i]` (stage index of block i), `cfg`.
    """

    def __init__(
        self,
        cfg: NFNetCfg,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float | None = None,
        drop_path_rate: float | None = None,
        ws_form: str | None = None,
        ws_eps: float | None = None,
        zero_init_last: bool | None = None,
        name: str = "nfnet",
    ) -> None:
        super().__init__()
        drop_rate = cfg.drop_rate if drop_rate is None else float(drop_rate)
        drop_path_rate = cfg.drop_path_rate if drop_path_rate is None else float(drop_path_rate)
        # Residual branches start switched off (skip gain / last WS gain = 0) unless zero_init_last=False.
        self.zero_init_last = True if zero_init_last is None else bool(zero_init_last)
        ws_form = cfg.ws_form if ws_form is None else ws_form
        if ws_form not in WS_FORMS:
            raise ValueError(f"unknown weight-standardization form {ws_form!r}; expected one of {WS_FORMS}")
        if cfg.padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', got {cfg.padding!r}")
        self.cfg = cfg
        act = canonical_act_name(cfg.act)
        gamma = NF_ACT_GAMMA[act]
        conv_kw: dict = {"form": ws_form, "eps": ws_eps}
        if cfg.padding == "same":
            conv_kw["padding"] = "same"
        if cfg.gamma_in_act:
            act_layer: Callable[[], nn.Module] = partial(GammaAct, act)
        else:
            act_layer = partial(create_act, act)
            conv_kw["gamma"] = gamma
        conv_layer = partial(ScaledStdConv2d, **conv_kw)

        self.stem = _make_stem(cfg, in_chans, act_layer, conv_layer)

        num_blocks = sum(cfg.depths)
        blocks: list[nn.Module] = []
        self.expected_vars: list[float] = []
        self.block_stage: list[int] = []
        prev_chs = cfg.stem_chs
        expected_var = 1.0
        index = 0
        for stage, (depth, out_chs, stride) in enumerate(zip(cfg.depths, cfg.channels, cfg.strides)):
            for b in range(depth):
                self.expected_vars.append(expected_var)
                self.block_stage.append(stage)
                blocks.append(NFBlock(
                    prev_chs, out_chs,
                    stride=stride if b == 0 else 1,
                    alpha=cfg.alpha,
                    beta=expected_var ** -0.5,
                    bottle_ratio=cfg.bottle_ratio,
                    group_size=cfg.group_size,
                    extra_conv=cfg.extra_conv,
                    se_ratio=cfg.se_ratio,
                    act_layer=act_layer,
                    conv_layer=conv_layer,
                    drop_path_rate=drop_path_rate * index / num_blocks,
                    skip_gain=cfg.skip_gain,
                ))
                prev_chs = out_chs
                index += 1
                # A transition block's conv shortcut sees phi(h)*beta, ~unit variance: reset, then grow. (DeepMind
                # resets after block 0 of every stage; that is the transition block in every config here.)
                if blocks[-1].is_transition:
                    expected_var = 1.0
                expected_var += cfg.alpha ** 2
        self.blocks = nn.Sequential(*blocks)
        self.head = NFHead(prev_chs, cfg.num_features, num_classes, act_layer=act_layer, conv_layer=conv_layer,
                           drop_rate=drop_rate)
        self.num_features = self.head.num_features
        self.num_classes = num_classes
        self._init_weights()
        if not self.zero_init_last:
            self.set_branch_gains(1.0)
        self.default_cfg = {
            "train_size": cfg.train_size,
            "test_size": cfg.test_size,
            "num_classes": num_classes,
            "norm": "nf",
            "family": "nfnet",
            "arch": name,
            "drop_rate": drop_rate,
            "drop_path_rate": drop_path_rate,
            "ws_form": ws_form,
            # AGC clip factor of the paper at batch 4096 (REFERENCE.md); smaller batches tolerate larger.
            "agc_clip_factor": 0.01,
            **cfg.extra,
        }

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, ScaledStdConv2d):
                continue  # initialised by its own reset_parameters (incl. the zero last-gain of NF-ResNets)
            if isinstance(m, nn.Conv2d):  # SE fc layers: fan-in normal, zero bias (timm / DeepMind)
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.fc.bias)

    @torch.no_grad()
    def set_branch_gains(self, value: float) -> None:
        """Set what zero-initialises the residual branches (scalar skip gains, or the last conv's WS gain)."""
        for b in self.blocks:
            if b.skip_gain is not None:
                b.skip_gain.fill_(value)
            else:
                b.conv3.gain.fill_(value)


    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for `num_classes` classes."""
        old = self.head.fc
        self.head.fc = nn.Linear(self.num_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        nn.init.normal_(self.head.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.fc.bias)
        self.num_classes = num_classes
        self.default_cfg["num_classes"] = num_classes




# variant: (depths, train size, test size, dropout) from REFERENCE.md / DeepMind's nfnet_params.
NFNET_VARIANTS: dict[str, tuple[tuple[int, int, int, int], int, int, float]] = {
    "f0": ((1, 2, 6, 3), 192, 256, 0.2),
    "f1": ((2, 4, 12, 6), 224, 320, 0.3),
    "f2": ((3, 6, 18, 9), 256, 352, 0.4),
    "f3": ((4, 8, 24, 12), 320, 416, 0.4),
    "f4": ((5, 10, 30, 15), 384, 512, 0.5),
    "f5": ((6, 12, 36, 18), 416, 544, 0.5),
    "f6": ((7, 14, 42, 21), 448, 576, 0.5),
    "f7": ((8, 16, 48, 24), 480, 608, 0.5),
}


def _check_norm(norm: str | None, name: str) -> None:
    if norm not in _NF_NORMS:
        raise ValueError(
            f"{name} is a normalizer-free network: norm must be None, 'nf' or 'none', got {norm!r} "
            "(NF models control signal propagation with Scaled WS and fixed scalars, not a norm layer)"
        )


def _nfnet(variant: str, norm: str | None, **kwargs) -> NormFreeNet:
    name = f"nfnet_{variant}"
    _check_norm(norm, name)
    depths, train_size, test_size, drop = NFNET_VARIANTS[variant]
    cfg = NFNetCfg(depths=depths, channels=(256, 512, 1536, 1536), drop_rate=drop, train_size=train_size,
                   test_size=test_size)
    return NormFreeNet(cfg, name=name, **kwargs)


@register_model
def nfnet_f0(norm: str | None = None, **kwargs) -> NormFreeNet:
    """NFNet-F0: depths (1, 2, 6, 3), 192/256 px, dropout 0.2, 71.5M params."""
    return _nfnet("f0", norm, **kwargs)


@register_model
def nfnet_f1(norm: str | None = None, **kwargs) -> NormFreeNet:
    """NFNet-F1: depths (2, 4, 12, 6), 224/320 px, dropout 0.3, 132.6M params."""
    return _nfnet("f1", norm, **kwargs)


@register_model
def nfnet_f2(norm: str | None = None, **kwargs) -> NormFreeNet:
    """NFNet-F2: depths (3, 6, 18, 9), 256/352 px, dropout 0.4, 193.8M params."""
    return _nfnet("f2", norm, **kwargs)


@register_model
def nfnet_f3(norm: str | None = None, **kwargs) -> NormFreeNet:
    """NFNet-F3: depths (4, 8, 24, 12), 320/416 px, dropout 0.4, 254.9M params."""
    return _nfnet("f3", norm, **kwargs)


@register_model
def nfnet_f4(norm: str | None = None, **kwargs) -> NormFreeNet:
    """NFNet-F4: depths (5, 10, 30, 15), 384/512 px, dropout 0.5, 316.1M params."""
    return _nfnet("f4", norm, **kwargs)


@register_model
def nfnet_f5(norm: str | None = None, **kwargs) -> NormFreeNet:
    """NFNet-F5: depths (6, 12, 36, 18), 416/544 px, dropout 0.5, 377.2M params."""
    return _nfnet("f5", norm, **kwargs)


@register_model
def nfnet_f6(norm: str | None = None, **kwargs) -> NormFreeNet:
    """NFNet-F6: depths (7, 14, 42, 21), 448/576 px, dropout 0.5, 438.4M params."""
    return _nfnet("f6", norm, **kwargs)


@register_model
def nfnet_f7(norm: str | None = None, **kwargs) -> NormFreeNet:
    """NFNet-F7: depths (8, 16, 48, 24), 480/608 px, dropout 0.5, ~499.5M params."""
    return _nfnet("f7", norm, **kwargs)


def nf_resnet_cfg(depths: tuple[int, ...] = (3, 4, 6, 3),
                  channels: tuple[int, ...] = (256, 512, 1024, 2048), **overrides) -> NFNetCfg:
    """Config of timm's NF-ResNet layout (module docstring); `overrides` replace any NFNetCfg field."""
    base = dict(
        depths=depths, channels=channels, stem="resnet", stem_chs=64, bottle_ratio=0.25, group_size=None,
        extra_conv=False, se_ratio=None, num_features=0, act="relu", gamma_in_act=False, padding="symmetric",
        ws_form="timm", skip_gain=False, drop_rate=0.0, drop_path_rate=0.0, train_size=224, test_size=224,
    )
    base.update(overrides)
    return NFNetCfg(**base)


@register_model
def nf_resnet50(norm: str | None = None, **kwargs) -> NormFreeNet:
    """NF-ResNet-50 (timm's `nf_resnet50` architecture), 25.56M params, ReLU, 224/224 px.

    Dropout and stochastic depth default to 0 (timm's defaults; pass drop_rate / drop_path_rate).
    timm's ImageNet weights (ra2) were trained at 256 px and evaluated at 288 px.
    """
    _check_norm(norm, "nf_resnet50")
    return NormFreeNet(nf_resnet_cfg(), name="nf_resnet50", **kwargs)
