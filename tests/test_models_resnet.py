"""ResNet family: torchvision parity of structure and parameter counts, norms, contract, zero-init, FLOPs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from ipu_norm.layers.norm_act import BatchNormAct2d, GroupNormAct
from ipu_norm.models import create_model, list_models, model_family
from ipu_norm.models.flops import count_flops, count_params
from ipu_norm.models.resnet import BasicBlock, Bottleneck, ResNet

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
NON_BN = ["gn", "ln", "gn+pn", "ln+pn"]


def _tiny(norm: str, block: type = Bottleneck, **kw) -> ResNet:
    # Two stages, 8-wide: exercises stem, strided transition blocks with projection and identity blocks.
    return ResNet(block, (2, 1), widths=(8, 16), stem_width=8, norm=norm, num_classes=5, **kw)


def test_registered() -> None:
    assert set(RESNETS) <= set(list_models("resnet*"))
    assert all(model_family(n) == "resnet" for n in RESNETS)


def test_resnet50_param_count() -> None:
    with torch.device("meta"):
        m = create_model("resnet50", norm="bn")
    assert count_params(m) == 25_557_032


@pytest.mark.parametrize("name", RESNETS)
def test_param_count_equals_torchvision(name: str) -> None:
    with torch.device("meta"):
        ours = create_model(name, norm="bn")
        tv = getattr(torchvision.models, name)(weights=None)
    assert count_params(ours) == sum(p.numel() for p in tv.parameters())
    # Same layer shapes in the same order (conv, norm, linear), not just the same total.
    assert [t.shape for t in ours.state_dict().values()] == [t.shape for t in tv.state_dict().values()]


@pytest.mark.parametrize("norm", ["gn", "ln", "gn+pn", "ln+pn"])
def test_norm_variants_param_counts(norm: str) -> None:
    with torch.device("meta"):
        bn = create_model("resnet50", norm="bn")
        m = create_model("resnet50", norm=norm)
    pn_layers = [x for x in m.modules() if isinstance(x, GroupNormAct) and x.proxy]
    # BN has no extra trainable params over GN (running stats are buffers); PN adds 2 per channel of every
    # norm followed by a ReLU (everything but the last norm of each branch and the shortcut norms).
    extra = sum(2 * x.num_channels for x in pn_layers)
    assert count_params(m) == count_params(bn) + extra
    if "+pn" in norm:
        n_blocks = len(m.blocks)
        assert len(pn_layers) == 1 + 2 * n_blocks  # stem + norm1, norm2 of every bottleneck
        assert all(x.proxy_weight.shape == (x.num_channels,) for x in pn_layers)
    else:
        assert not pn_layers
    groups = {x.num_groups for x in m.modules() if isinstance(x, GroupNormAct)}
    assert groups == ({1} if norm.startswith("ln") else {4})


def test_contract_and_default_cfg() -> None:
    with torch.device("meta"):
        m = create_model("resnet50", norm="ln+pn", num_classes=10)
    assert isinstance(m.blocks, nn.Sequential) and len(m.blocks) == 16
    assert all(isinstance(b, Bottleneck) for b in m.blocks)
    assert m.get_classifier() is m.head.fc and m.head.fc.out_features == 10
    cfg = m.default_cfg
    assert (cfg["train_size"], cfg["test_size"], cfg["num_classes"], cfg["norm"], cfg["family"]) == (
        224, 224, 10, "ln+pn", "resnet")


def test_forward_is_head_blocks_stem_and_equals_torchvision() -> None:
    # Independent reference: torchvision's resnet18 with the same tensors (same shapes in the same order, see
    # test_param_count_equals_torchvision), random BN statistics, float64, eval mode.
    gen = torch.Generator().manual_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=7).double().eval()
    with torch.no_grad():
        for name, t in tv.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.2)
    m = create_model("resnet18", norm="bn", num_classes=7).double().eval()
    m.load_state_dict(dict(zip(m.state_dict().keys(), tv.state_dict().values(), strict=True)))
    x = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        want = tv(x)
        torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.head(m.blocks(m.stem(x))), want, rtol=1e-10, atol=1e-10)


def test_stride_on_3x3_v1_5() -> None:
    with torch.device("meta"):
        m = create_model("resnet50")
    b = m.blocks[3]  # first block of stage 2
    assert b.conv1.stride == (1, 1) and b.conv2.stride == (2, 2)
    assert b.downsample.conv.kernel_size == (1, 1) and b.downsample.conv.stride == (2, 2)
    assert isinstance(b.downsample.norm, BatchNormAct2d) and b.downsample.norm.act_name == "identity"


@pytest.mark.parametrize("norm", NON_BN + ["bn", "none"])
@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_forward_backward(norm: str, block: type) -> None:
    m = _tiny(norm, block)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    if "+pn" in norm:
        proxy = [p for n, p in m.named_parameters() if "proxy_" in n]
        assert proxy and any(p.grad.abs().sum() > 0 for p in proxy)


@pytest.mark.parametrize("norm", NON_BN + ["none"])
def test_batch_independent_in_eval_and_train(norm: str) -> None:
    m = _tiny(norm)
    x = torch.randn(4, 3, 32, 32)
    other = x.clone()
    other[1:] = torch.randn(3, 3, 32, 32) * 3 + 1
    for mode in (False, True):  # eval and train mode: no norm here uses batch statistics
        m.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(m(x)[0], m(other)[0], rtol=1e-5, atol=1e-5)


def test_bn_batch_dependent_in_train_mode() -> None:
    m = _tiny("bn").train()
    x = torch.randn(4, 3, 32, 32)
    other = x.clone()
    other[1:] = torch.randn(3, 3, 32, 32) * 3 + 1
    with torch.no_grad():
        assert (m(x)[0] - m(other)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("norm", ["bn", "gn", "ln+pn"])
@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_zero_init_last_blocks_are_identity(norm: str, block: type) -> None:
    m = _tiny(norm, block, zero_init_last=True).eval()
    last = "norm2" if block is BasicBlock else "norm3"
    for b in m.blocks:
        assert torch.count_nonzero(getattr(b, last).weight) == 0
        assert not getattr(getattr(b, last), "proxy", False)  # no PN without activation
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = m.stem(x)
        ident = m.blocks[1]  # second block of stage 1: identity shortcut
        assert ident.downsample is None
        # relu(0 * x + 0 + h) == h, because h is already the output of a ReLU
        torch.testing.assert_close(ident(m.blocks[0](h)), m.blocks[0](h))


def test_zero_init_last_false_keeps_unit_gain() -> None:
    m = _tiny("gn")
    assert all(torch.all(b.norm3.weight == 1) for b in m.blocks)


def test_norm_groups_and_eps_pass_through() -> None:
    with torch.device("meta"):
        m = create_model("resnet18", norm="gn", norm_groups=8, eps=1e-5)
    gns = [x for x in m.modules() if isinstance(x, GroupNormAct)]
    assert gns and all(x.num_groups == 8 and x.eps == 1e-5 for x in gns)


def test_drop_rate_and_unknown_norm() -> None:
    with torch.device("meta"):
        m = create_model("resnet18", drop_rate=0.3)
    assert m.head.drop.p == 0.3
    with pytest.raises(ValueError, match="unknown norm"):
        create_model("resnet18", norm="batchnorm")


def test_flops_resnet50_published() -> None:
    with torch.device("meta"):
        m = create_model("resnet50")
    f = count_flops(m, 224)
    assert f.gflops == pytest.approx(4.09, abs=0.01)  # the usual "4.1 GFLOPs" (MACs) of ResNet-50
    assert f.flops_2x == 2 * f.macs and f.params == 25_557_032
    assert f.by_op["aten.addmm"] == 2048 * 1000
    # Linear in input resolution squared (conv MACs scale with H*W; the fc does not).
    f2 = count_flops(m, (448, 448))
    assert f2.macs - f2.by_op["aten.addmm"] == 4 * (f.macs - f.by_op["aten.addmm"])


def test_count_flops_leaves_real_model_untouched() -> None:
    m = _tiny("bn").train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    f = count_flops(m, 32)
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.device.type == "cpu" for p in m.parameters())
    # Stem conv by hand: 8 output channels, 16x16 output, 3*7*7 MACs each.
    assert f.macs > 8 * 16 * 16 * 3 * 49


def test_count_flops_falls_back_to_a_real_pass() -> None:
    class MakesRealTensors(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + torch.ones(4, 1, 1)  # a CPU tensor: cannot be mixed with meta ones

    with pytest.warns(UserWarning, match="real forward pass"):
        f = count_flops(MakesRealTensors(), 8)
    assert f.macs == 4 * 8 * 8 * 3 * 9


def test_drop_path_rates_and_trainer_kwargs() -> None:
    # The trainer passes norm, norm_groups, drop_rate, drop_path_rate, zero_init_last to every family.
    with torch.device("meta"):
        m = create_model("resnet50", norm="gn", norm_groups=2, drop_rate=0.1, drop_path_rate=0.15,
                         zero_init_last=True)
    n = len(m.blocks)
    assert isinstance(m.blocks[0].drop_path, nn.Identity)  # rate 0 for the first block
    for i, b in enumerate(list(m.blocks)[1:], start=1):
        assert b.drop_path.drop_prob == pytest.approx(0.15 * i / (n - 1))
    assert m.blocks[-1].drop_path.drop_prob == pytest.approx(0.15)


def test_drop_path_only_in_training() -> None:
    m = _tiny("ln", drop_path_rate=0.5)
    x = torch.randn(8, 3, 32, 32)
    m.eval()
    plain = _tiny("ln", drop_path_rate=0.0).eval()  # the same weights without stochastic depth
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
    m.train()
    with torch.no_grad():
        torch.manual_seed(3)
        a = m(x)
        torch.manual_seed(4)
        b = m(x)
    assert (a - b).abs().max() > 0
