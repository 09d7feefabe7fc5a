"""EfficientNet family (G1 and G16): torchvision/Graphcore parity, norms, stochastic depth, FLOPs, model table."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torchvision
from torch import nn

from ipu_norm.layers.drop_path import DropPath
from ipu_norm.layers.norm_act import BatchNormAct2d, GroupNormAct
from ipu_norm.models import create_model, list_models, model_family
from ipu_norm.models.__main__ import main, model_rows
from ipu_norm.models.efficientnet import EFFICIENTNET_VARIANTS, EfficientNet, MBConv, conv_groups, make_divisible
from ipu_norm.models.flops import count_flops, count_params

VARIANTS = [f"b{i}" for i in range(8)]
NON_BN = ["gn", "ln", "gn+pn", "ln+pn"]
TINY_STAGES = ((1, 3, 1, 16, 8, 1), (6, 3, 2, 8, 16, 2), (6, 5, 2, 16, 24, 1))


def _tiny(norm: str, **kw) -> EfficientNet:
    kw.setdefault("drop_path_rate", 0.0)
    kw.setdefault("drop_rate", 0.0)  # no dropout randomness in train-mode comparisons
    return EfficientNet(norm=norm, num_classes=5, stages=TINY_STAGES, **kw)


def test_registered() -> None:
    names = set(list_models("efficientnet*"))
    assert names == {f"efficientnet_{v}" for v in VARIANTS} | {f"efficientnet_{v}_g16" for v in VARIANTS}
    assert model_family("efficientnet_b3_g16") == "efficientnet"


def test_b0_param_count() -> None:
    with torch.device("meta"):
        assert count_params(create_model("efficientnet_b0", norm="bn")) == 5_288_548


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_torchvision(variant: str) -> None:
    name = f"efficientnet_{variant}"
    with torch.device("meta"):
        ours = create_model(name, norm="bn")
        tv = getattr(torchvision.models, name)(weights=None)
    assert count_params(ours) == sum(p.numel() for p in tv.parameters())
    assert [t.shape for t in ours.state_dict().values()] == [t.shape for t in tv.state_dict().values()]
    assert ours.head.drop.p == tv.classifier[0].p
    tv_bn = [m for m in tv.modules() if isinstance(m, nn.BatchNorm2d)]
    our_bn = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [(m.eps, m.momentum) for m in our_bn] == [(m.eps, m.momentum) for m in tv_bn]
    # Stochastic depth: torchvision applies its StochasticDepth only on residual blocks.
    tv_blocks = [b for stage in tv.features[1:-1] for b in stage]
    assert len(tv_blocks) == len(ours.blocks)
    for tb, ob in zip(tv_blocks, ours.blocks):
        assert tb.use_res_connect == ob.has_skip
        if ob.has_skip and tb.stochastic_depth.p > 0:
            assert isinstance(ob.drop_path, DropPath)
            assert ob.drop_path.drop_prob == pytest.approx(tb.stochastic_depth.p)


def test_drop_path_linear_over_blocks() -> None:
    with torch.device("meta"):
        m = create_model("efficientnet_b0", drop_path_rate=0.3)
    n = len(m.blocks)
    for i, b in enumerate(m.blocks):
        if b.has_skip:
            assert b.drop_path.drop_prob == pytest.approx(0.3 * i / n)
        else:
            assert isinstance(b.drop_path, nn.Identity)


def test_make_divisible_and_conv_groups() -> None:
    assert [make_divisible(32 * w) for w in (1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0)] == [32, 32, 40, 48, 48, 56, 64]
    assert make_divisible(1280 * 1.1) == 1408
    assert conv_groups(96, 1) == 96  # depthwise
    assert conv_groups(96, 16) == 6
    assert conv_groups(32, 16) == 2 and conv_groups(48, 16) == 3
    assert conv_groups(40, 16) == 2 and conv_groups(56, 16) == 2  # groups at least 16 wide, divide C
    assert conv_groups(8, 16) == 1


def _graphcore_style_g16(width: float, depth: float) -> nn.Module:
    """Independent reference: Graphcore's recipe on timm (arch strings with e4, every conv_dw regrouped)."""
    from timm.layers import create_conv2d
    from timm.models.efficientnet import EfficientNet as TimmEfficientNet
    from timm.models.efficientnet import decode_arch_def, round_channels

    arch = [["ds_r1_k3_s1_e1_c16_se0.25"]] + [
        [f"ir_r{r}_k{k}_s{s}_e4_c{c}_se0.25"]
        for r, k, s, c in [(2, 3, 2, 24), (2, 5, 2, 40), (3, 3, 2, 80), (3, 5, 1, 112), (4, 5, 2, 192), (1, 3, 1, 320)]
    ]
    rc = partial(round_channels, multiplier=width)
    m = TimmEfficientNet(block_args=decode_arch_def(arch, depth), num_features=rc(1280), stem_size=32,
                         round_chs_fn=rc)
    for name, mod in list(m.named_modules()):
        if name.endswith("conv_dw"):
            parent = m.get_submodule(name.rsplit(".", 1)[0])
            parent.conv_dw = create_conv2d(mod.in_channels, mod.out_channels, mod.kernel_size[0],
                                           stride=mod.stride[0], groups=max(mod.in_channels // 16, 1))
    return m


@pytest.mark.parametrize("variant", ["b0", "b4"])
def test_g16_matches_graphcore_construction(variant: str) -> None:
    width, depth = EFFICIENTNET_VARIANTS[variant][:2]
    with torch.device("meta"):
        ours = create_model(f"efficientnet_{variant}_g16")
        ref = _graphcore_style_g16(width, depth)
    assert count_params(ours) == count_params(ref)
    ref_convs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.groups)
                 for n, m in ref.named_modules() if n.endswith("conv_dw")]
    our_convs = [(b.conv_dw.conv.in_channels, b.conv_dw.conv.out_channels, b.conv_dw.conv.kernel_size,
                  b.conv_dw.conv.stride, b.conv_dw.conv.groups) for b in ours.blocks]
    assert our_convs == ref_convs


@pytest.mark.parametrize("variant", VARIANTS)
def test_g16_structure(variant: str) -> None:
    with torch.device("meta"):
        m = create_model(f"efficientnet_{variant}_g16")
    # The first stage (1 block, 2 from B3 on: ceil(1 * depth)) keeps expand ratio 1.
    n_first = -(-EFFICIENTNET_VARIANTS[variant][1] // 1)
    first, rest = list(m.blocks)[: int(n_first)], list(m.blocks)[int(n_first):]
    for b in first:
        assert b.conv_pw is None
        dw = b.conv_dw.conv
        assert dw.in_channels % dw.groups == 0 and dw.in_channels // dw.groups >= 16
    for b in rest:
        cin = b.conv_pw.conv.in_channels
        assert b.conv_pw.conv.out_channels == 4 * cin  # expand ratio 4
        dw = b.conv_dw.conv
        assert dw.in_channels // dw.groups == 16  # group size exactly 16
    assert m.default_cfg["group_size"] == 16


def test_g16_first_stage_depthwise_option() -> None:
    with torch.device("meta"):
        m = create_model("efficientnet_b0_g16", group_first_stage=False)
    dw = m.blocks[0].conv_dw.conv
    assert dw.groups == dw.in_channels


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_cfg(variant: str) -> None:
    with torch.device("meta"):
        m = create_model(f"efficientnet_{variant}", norm="gn", num_classes=7)
    cfg = m.default_cfg
    _, _, _, train, test, _ = EFFICIENTNET_VARIANTS[variant]
    assert (cfg["train_size"], cfg["test_size"], cfg["num_classes"], cfg["norm"], cfg["family"]) == (
        train, test, 7, "gn", "efficientnet")
    assert train < test
    assert m.get_classifier() is m.head.fc and isinstance(m.blocks, nn.Sequential)
    assert all(isinstance(b, MBConv) for b in m.blocks)


def test_half_res_train_sizes() -> None:
    sizes = {v: EFFICIENTNET_VARIANTS[v][3:5] for v in VARIANTS}
    assert sizes["b0"] == (160, 224) and sizes["b1"] == (176, 240) and sizes["b2"] == (192, 260)
    assert sizes["b3"] == (204, 300) and sizes["b4"] == (252, 380) and sizes["b5"] == (328, 456)
    for v in ("b6", "b7"):  # our rule: test / sqrt(2) to a multiple of 8
        train, test = sizes[v]
        assert train % 8 == 0 and abs(train - test / 2**0.5) <= 4


@pytest.mark.parametrize("norm", ["gn+pn", "ln+pn"])
def test_pn_placement(norm: str) -> None:
    with torch.device("meta"):
        m = create_model("efficientnet_b0", norm=norm)
    for b in m.blocks:
        assert not b.conv_pwl.norm.proxy  # projection: no activation, no PN
        assert b.conv_dw.norm.proxy and b.conv_dw.norm.act_name == "silu"
        if b.conv_pw is not None:
            assert b.conv_pw.norm.proxy
        assert b.se.fc1.out_channels == max(1, (b.conv_pw.conv.in_channels if b.conv_pw else
                                                b.conv_dw.conv.in_channels) // 4)
    assert m.stem.norm.proxy and m.head.conv.norm.proxy
    groups = {x.num_groups for x in m.modules() if isinstance(x, GroupNormAct)}
    assert groups == ({1} if norm.startswith("ln") else {4})
    with torch.device("meta"):
        gn = create_model("efficientnet_b0", norm=norm.split("+")[0])
    pn_channels = sum(x.num_channels for x in m.modules() if isinstance(x, GroupNormAct) and x.proxy)
    assert count_params(m) == count_params(gn) + 2 * pn_channels


@pytest.mark.parametrize("norm", ["bn", *NON_BN])
@pytest.mark.parametrize("group_size,expand", [(1, 6), (16, 4)])
def test_forward_backward(norm: str, group_size: int, expand: int) -> None:
    m = _tiny(norm, group_size=group_size, expand_ratio=expand, drop_path_rate=0.2)
    x = torch.randn(2, 3, 64, 64)
    out = m(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    if "+pn" in norm:
        assert any("proxy_weight" in n for n, _ in m.named_parameters())
    if norm == "bn":
        assert any(isinstance(x, BatchNormAct2d) for x in m.modules())


@pytest.mark.parametrize("norm", NON_BN)
def test_batch_independent(norm: str) -> None:
    m = _tiny(norm)
    x = torch.randn(3, 3, 64, 64)
    other = x.clone()
    other[1:] = 2 * torch.randn(2, 3, 64, 64) - 1
    for mode in (False, True):
        m.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(m(x)[0], m(other)[0], rtol=1e-5, atol=1e-5)


def test_bn_batch_dependent_in_train_mode() -> None:
    m = _tiny("bn").train()
    x = torch.randn(3, 3, 64, 64)
    other = x.clone()
    other[1:] = 2 * torch.randn(2, 3, 64, 64) - 1
    with torch.no_grad():
        assert (m(x)[0] - m(other)[0]).abs().max() > 1e-4


def test_drop_path_active_only_in_training() -> None:
    m = _tiny("gn", drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    m.eval()
    plain = _tiny("gn", drop_path_rate=0.0).eval()  # the same weights without stochastic depth
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
    m.train()
    torch.manual_seed(1)
    with torch.no_grad():
        c = m(x)
    torch.manual_seed(2)
    with torch.no_grad():
        d = m(x)
    assert (c - d).abs().max() > 0


def test_flops_published_b0() -> None:
    with torch.device("meta"):
        m = create_model("efficientnet_b0")
    assert count_flops(m, 224).gflops == pytest.approx(0.39, abs=0.01)  # Tan & Le 2019: 0.39B FLOPs (MACs)


def test_model_table_rows_cover_families() -> None:
    rows = model_rows("*resnet50")  # ours and, when registered, the NF family's nf_resnet50
    assert [r["name"] for r in rows] == list_models("*resnet50")
    r50 = rows[[r["name"] for r in rows].index("resnet50")]
    assert (r50["family"], r50["norm"], r50["train_size"], r50["test_size"]) == ("resnet", "bn", 224, 224)
    assert r50["gmacs"] == pytest.approx(4.09, abs=0.01)


@pytest.mark.slow
def test_model_table_lists_every_registered_model() -> None:
    rows = model_rows("*", flops=False)
    assert [r["name"] for r in rows] == list_models()
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet50"]["params_m"] == pytest.approx(25.557032)
    assert by_name["efficientnet_b4"]["train_size"] == 252


def test_model_table_cli(capsys: pytest.CaptureFixture) -> None:
    assert main(["--list", "--norm", "ln+pn", "--filter", "efficientnet_b0*"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and out[2].startswith("| efficientnet_b0 | efficientnet | ln+pn | 5.33 | 0.39 | 160/224 |")
    assert out[3].startswith("| efficientnet_b0_g16 |")
    assert main(["--filter", "no_such_model*"]) == 1


def test_zero_init_last_only_on_residual_blocks() -> None:
    m = _tiny("gn+pn", zero_init_last=True).eval()
    for b in m.blocks:
        gain = b.conv_pwl.norm.weight
        assert torch.count_nonzero(gain) == (0 if b.has_skip else gain.numel())
    res = [b for b in m.blocks if b.has_skip]
    assert res
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(res[0](x), x)  # a residual block starts as the identity


def test_trainer_kwargs_accepted() -> None:
    with torch.device("meta"):
        m = create_model("efficientnet_b2_g16", norm="gn", norm_groups=8, drop_rate=0.1, drop_path_rate=0.1,
                         zero_init_last=True, num_classes=3)
    assert m.head.drop.p == 0.1 and m.head.fc.out_features == 3
    assert {x.num_groups for x in m.modules() if isinstance(x, GroupNormAct)} == {8}
    assert max(b.drop_path.drop_prob for b in m.blocks if b.has_skip) == pytest.approx(0.1 * (len(m.blocks) - 1)
                                                                                       / len(m.blocks))
    with torch.device("meta"):
        assert create_model("efficientnet_b2").head.drop.p == 0.3  # None -> the variant's dropout
