"""Forward MAC counts (torch's FlopCounterMode behind ipu_norm.models.flops) against an independent count.

The reference here counts, with forward hooks on the real modules, ``out.numel() * in_channels / groups *
prod(kernel)`` per convolution and ``out.numel() * in_features`` per Linear: shape formulas written in the
test, not torch's dispatch-level counter.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ipu_norm.models import create_model
from ipu_norm.models.flops import count_flops


def _hook_macs(model: nn.Module, size: int) -> int:
    total = 0

    def hook(module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            total += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            total += out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.device("meta"), torch.no_grad():
            model.eval()(torch.empty(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize(
    "name,kw,size",
    [
        ("resnet50", {}, 224),
        ("efficientnet_b0", {"norm": "ln+pn"}, 224),
        ("efficientnet_b0_g16", {"norm": "gn"}, 224),  # grouped (G16) convolutions
        ("nfnet_f0", {}, 192),
    ],
)
def test_forward_macs_equal_the_shape_formula(name: str, kw: dict, size: int) -> None:
    with torch.device("meta"):
        m = create_model(name, **kw)
    f = count_flops(m, size)
    assert f.macs == _hook_macs(m, size)
    assert f.flops_2x == 2 * f.macs
    assert set(f.by_op) == {"aten.convolution", "aten.addmm"}
    assert f.by_op["aten.addmm"] == m.get_classifier().in_features * m.get_classifier().out_features


def test_published_figures() -> None:
    with torch.device("meta"):
        r50 = create_model("resnet50")
        nf = create_model("nfnet_f0")
    assert count_flops(r50, 224).gflops == pytest.approx(4.09, abs=0.01)  # the usual "4.1 GFLOPs" (MACs)
    assert count_flops(nf, 256).gflops == pytest.approx(12.38, abs=0.01)  # REFERENCE.md: NFNet-F0 12.38B FLOPs
