"""Proxy Norm statistics owned by each PN layer (computed in its forward) against a float64 reference written here.

The reference replaces every PN layer's forward with plain float64 ops written in this file (GroupNorm by hand,
the activations from their formulas, the quantiles from `torch.special.ndtri`, the proxy mean/variance as sums),
so the model's outputs and parameter gradients are checked against code that shares nothing with
`ipu_norm.ops.proxy_stats` or `ipu_norm.layers.proxy_norm`. The scenarios are those that broke the former
module-level statistics cache: frozen layers, writes through ``.data``, EMA, checkpointing (both kinds), DDP,
torch.compile, dtype moves.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from ipu_norm.layers.norm_act import GroupNormAct
from ipu_norm.layers.proxy_norm import ProxyNormAct
from ipu_norm.models.base import StemBlocksHead
from ipu_norm.models.efficientnet import EfficientNet
from ipu_norm.models.resnet import BasicBlock, ResNet

_TINY_STAGES = ((1, 3, 1, 8, 8, 1), (4, 3, 2, 8, 16, 2))


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:  # noqa: ARG001
    """Tiny float64 models: one thread is faster and steadier (conftest's one_thread)."""
F64 = torch.float64

_PHI = {
    "relu": lambda u: torch.clamp(u, min=0.0),
    "silu": lambda u: u / (1.0 + torch.exp(-u)),
    "gelu": lambda u: 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0))),
    "identity": lambda u: u,
}


def _ref_pn(z_affine_input: torch.Tensor, g: torch.Tensor, b: torch.Tensor, pg: torch.Tensor, pb: torch.Tensor,
            act: str, eps: float, n: int) -> torch.Tensor:
    """(phi(g x + b) - mean~) / sqrt(var~ + eps) with the proxy statistics over n N(0, 1) quantiles."""
    q = torch.special.ndtri((torch.arange(n, dtype=F64) + 0.5) / n)
    proxy = _PHI[act](g[:, None] * ((1.0 + pg)[:, None] * q + pb[:, None]) + b[:, None])
    mean = proxy.sum(1) / n
    var = ((proxy - mean[:, None]) ** 2).sum(1) / n
    view = (1, -1) + (1,) * (z_affine_input.dim() - 2)
    z = _PHI[act](z_affine_input * g.view(view) + b.view(view))
    return (z - mean.view(view)) / torch.sqrt(var.view(view) + eps)


def _ref_gn_pn_forward(self: GroupNormAct, x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    xg = x.reshape(n, self.num_groups, -1)
    mu = xg.mean(-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(-1, keepdim=True)
    xn = ((xg - mu) / torch.sqrt(var + self.eps)).reshape(x.shape)
    if not self.proxy:
        view = (1, -1) + (1,) * (x.dim() - 2)
        return _PHI[self.act_name](xn * self.weight.view(view) + self.bias.view(view))
    return _ref_pn(xn, self.weight, self.bias, self.proxy_weight, self.proxy_bias, self.act_name, self.proxy_eps,
                   self.num_quantiles)


def _ref_pn_act_forward(self: ProxyNormAct, x: torch.Tensor) -> torch.Tensor:
    return _ref_pn(x, self.weight, self.bias, self.proxy_weight, self.proxy_bias, self.act, self.eps,
                   self.num_quantiles)


@contextlib.contextmanager
def reference_layers() -> Iterator[None]:
    """Every GroupNormAct / ProxyNormAct runs the float64 reference forward of this file inside the block."""
    mp = pytest.MonkeyPatch()
    mp.setattr(GroupNormAct, "forward", _ref_gn_pn_forward)
    mp.setattr(ProxyNormAct, "forward", _ref_pn_act_forward)
    try:
        yield
    finally:
        mp.undo()


class MixedActNet(StemBlocksHead):
    """Conv blocks whose PN layers mix relu/silu/gelu, and a standalone ProxyNormAct."""

    def __init__(self, acts: tuple[str, ...] = ("relu", "silu", "gelu", "silu", "relu", "gelu")) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), GroupNormAct(8, 2, "silu", proxy=True))
        blocks = []
        for i, act in enumerate(acts):
            norm = ProxyNormAct(8, act) if i == 1 else GroupNormAct(8, 1 + i % 2, act, proxy=True)
            blocks.append(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), norm))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, 5)))


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    # Non-trivial PN parameters (their init is gamma 1, beta 0, proxy 0): every gradient path is exercised.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "efficientnet_ln+pn": EfficientNet(norm="ln+pn", num_classes=5, stages=_TINY_STAGES, drop_rate=0.0,
                                           drop_path_rate=0.0),
        "efficientnet_gn+pn": EfficientNet(norm="gn+pn", num_classes=5, stages=_TINY_STAGES, drop_rate=0.0,
                                           drop_path_rate=0.0, norm_groups=2),
        "resnet_gn+pn": ResNet(BasicBlock, (1, 1), widths=(8, 16), stem_width=8, norm="gn+pn", num_classes=5,
                               norm_groups=2),
        "mixed_acts": MixedActNet(),
    }


def _out_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.square().sum() + out.sum()).backward()
    # Keyed by the parameter itself: wrappers (DDP, checkpoint segments) rename them.
    return out.detach(), {p: p.grad.clone() for p in model.parameters() if p.grad is not None}


def _reference(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    with reference_layers():
        return _out_and_grads(model, x)


def _assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict], **tol: float) -> None:
    tol = tol or {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys()
    for p in a[1]:
        torch.testing.assert_close(a[1][p], b[1][p], **tol, msg=lambda m, s=tuple(p.shape): f"param {s}: {m}")


@pytest.mark.parametrize("name", list(_models()))
def test_model_outputs_and_grads_match_float64_reference(name: str) -> None:
    model = _perturb(_models()[name].double())
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    _assert_same(_out_and_grads(model, x), _reference(model, x))


def test_reference_catches_a_wrong_quantile_count() -> None:
    # The reference is sensitive to the statistics: a layer computing them over 199 quantiles differs.
    model = _perturb(_models()["mixed_acts"].double())
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    want = _reference(model, x)
    model.blocks[0][1].num_quantiles = 199
    got = _out_and_grads(model, x)
    assert not torch.allclose(got[0], want[0], rtol=1e-9, atol=1e-11)


def test_frozen_layers_train_over_several_steps() -> None:
    """Freezing the first PN layers (fine-tuning) leaves the rest trainable over several steps; each step equals
    the reference at the current parameters (the former statistics cache crashed on the second backward)."""
    model = _perturb(_models()["efficientnet_ln+pn"].double())
    for p in [*model.stem.parameters(), *model.blocks[0].parameters()]:
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    frozen = [p.clone() for p in model.stem.parameters()]
    for step in range(2):
        x = torch.randn(2, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(step))
        got = _out_and_grads(model, x)
        _assert_same(got, _reference(model, x))
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.stem.parameters()))


@pytest.mark.parametrize("api", ["data", "copy_no_grad", "load_state_dict", "double"])
def test_writes_through_any_api_are_seen(api: str) -> None:
    model = _perturb(_models()["mixed_acts"].double()).eval()
    x = torch.randn(1, 3, 8, 8, dtype=F64)
    with torch.no_grad():
        before = model(x)
        layer = model.blocks[0][1]
        if api == "data":
            layer.proxy_weight.data.add_(1.0)  # bypasses the version counter
        elif api == "copy_no_grad":
            layer.proxy_bias.copy_(layer.proxy_bias + 0.5)
        elif api == "load_state_dict":
            state = model.state_dict()
            state["blocks.0.1.bias"] = state["blocks.0.1.bias"] + 0.5
            model.load_state_dict(state)
        else:
            model.float()
            model.double()
            layer.proxy_weight.add_(1.0)
        after = model(x)
        with reference_layers():
            want = model(x)
    torch.testing.assert_close(after, want, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(before, after)


def test_ema_copy_uses_its_own_parameters() -> None:
    from ipu_norm.train.ema import ModelEma  # noqa: PLC0415

    live = _perturb(_models()["efficientnet_ln+pn"].double(), seed=1)
    ema = ModelEma(live, decay=0.5, warmup=False)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    with torch.no_grad():
        before = ema.module(x)
        _perturb(live, seed=2)
        ema.update(live, step=0)
        after = ema.module(x)
        with reference_layers():
            want = ema.module(x)
    torch.testing.assert_close(after, want, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_blocks_match_reference(reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415

    class Ckpt(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.block, t, use_reentrant=reentrant)

    model = _perturb(_models()["resnet_gn+pn"].double())
    x = torch.randn(2, 3, 8, 8, dtype=F64, requires_grad=True)
    want = _reference(model, x)
    model.blocks = nn.Sequential(*(Ckpt(b) for b in model.blocks))
    _assert_same(_out_and_grads(model, x), want)


def test_single_process_ddp_matches_reference(tmp_path) -> None:  # noqa: ANN001
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = _perturb(_models()["efficientnet_ln+pn"].double())
        x = torch.randn(2, 3, 8, 8, dtype=F64)
        want = _reference(model, x)
        _assert_same(_out_and_grads(nn.parallel.DistributedDataParallel(model), x), want)
    finally:
        dist.destroy_process_group()


def test_bf16_autocast_keeps_float32_statistics() -> None:
    model = _perturb(_models()["efficientnet_ln+pn"])
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    want = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.1, atol=0.1)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_torch_compile_one_graph_matches_reference() -> None:
    from torch._dynamo.testing import CompileCounter  # noqa: PLC0415

    torch._dynamo.reset()
    model = _perturb(_models()["mixed_acts"].double())
    x = torch.randn(1, 3, 8, 8, dtype=F64)
    want = _reference(model, x)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(2):
        _assert_same(_out_and_grads(compiled, x), want)
    assert counter.frame_count == 1
