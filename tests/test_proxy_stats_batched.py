"""Batched Proxy Norm statistics (ipu_norm.layers.proxy_norm.prepare_proxy_stats) against the per-layer path.

One proxy_stats call per (activation, eps, quantiles, dtype, device) group per forward must give exactly the
outputs and parameter gradients of one call per layer (float64), also under checkpointing, autocast,
torch.compile and DDP, and without gradients it must cache the statistics until a parameter changes.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from ipu_norm.layers.norm_act import GroupNormAct
from ipu_norm.layers.proxy_norm import ProxyNormAct, prepare_proxy_stats, proxy_stats_batching
from ipu_norm.models.base import StemBlocksHead
from ipu_norm.models.efficientnet import EfficientNet
from ipu_norm.models.resnet import BasicBlock, ResNet
from ipu_norm.parallel.stages import CheckpointedSegment

_TINY_STAGES = ((1, 3, 1, 8, 8, 1), (4, 3, 2, 8, 16, 2))


class MixedActNet(StemBlocksHead):
    """Conv blocks whose PN layers mix relu/silu/gelu (and a standalone ProxyNormAct): several batch groups."""

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


def _out_and_grads(model: nn.Module, x: torch.Tensor, batched: bool) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with proxy_stats_batching(batched):
        out = model(x)
        (out.square().sum() + out.sum()).backward()
    # Keyed by the parameter itself: wrappers (DDP, stage modules, checkpoint segments) rename them.
    return out.detach(), {p: p.grad.clone() for p in model.parameters() if p.grad is not None}


def _assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict], **tol: float) -> None:
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys()
    for p in a[1]:
        torch.testing.assert_close(a[1][p], b[1][p], **tol, msg=lambda m, s=tuple(p.shape): f"param {s}: {m}")


def _count_stats_calls(model: nn.Module, x: torch.Tensor, batched: bool, backward: bool = False) -> int:
    """Number of proxy_affine computations (one proxy_stats op each) in a forward (and backward) of model."""
    import ipu_norm.layers.proxy_norm as pn  # noqa: PLC0415

    calls = []
    real = pn.proxy_affine

    def counting(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(args)
        return real(*args)

    pn.proxy_affine = counting
    try:
        with proxy_stats_batching(batched):
            out = model(x)
            if backward:
                out.sum().backward()
    finally:
        pn.proxy_affine = real
    return len(calls)


@pytest.mark.parametrize("name", list(_models()))
def test_batched_stats_match_per_layer_float64(name: str) -> None:
    model = _perturb(_models()[name].double())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    _assert_same(_out_and_grads(model, x, True), _out_and_grads(model, x, False), rtol=1e-12, atol=1e-12)


def test_one_stats_call_per_activation_group() -> None:
    model = MixedActNet()
    x = torch.randn(1, 3, 8, 8)
    n_layers = sum(isinstance(m, (GroupNormAct, ProxyNormAct)) for m in model.modules())
    assert _count_stats_calls(model, x, batched=False) == n_layers
    assert _count_stats_calls(model, x, batched=True) == 3  # relu, silu, gelu (same eps and quantiles)


def test_checkpointed_segments_reuse_the_batched_stats() -> None:
    """Stats computed before the checkpointed blocks get their gradients, and the recompute does not redo them."""
    model = _perturb(_models()["efficientnet_ln+pn"].double())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref = _out_and_grads(model, x, False)
    model.blocks = nn.Sequential(*(CheckpointedSegment(b) for b in model.blocks))
    _assert_same(_out_and_grads(model, x, True), ref, rtol=1e-12, atol=1e-12)
    # One computation (one silu group) for forward + backward, recompute included; per layer without batching.
    assert _count_stats_calls(model, x, batched=True, backward=True) == 1
    n_layers = sum(isinstance(m, GroupNormAct) and m.proxy for m in model.modules())
    assert _count_stats_calls(model, x, batched=False, backward=True) == 2 * n_layers - 2  # + recompute, not stem/head


def test_reentrant_checkpoint_gets_the_same_gradients() -> None:
    """torch.utils.checkpoint(use_reentrant=True) runs its own backward on the recompute: exact grads, no error."""
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415

    model = _perturb(_models()["resnet_gn+pn"].double())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    ref = _out_and_grads(model, x, False)

    class Reentrant(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.block, t, use_reentrant=True)

    model.blocks = nn.Sequential(*(Reentrant(b) for b in model.blocks))
    _assert_same(_out_and_grads(model, x, True), ref, rtol=1e-12, atol=1e-12)


def test_stats_after_backward_are_not_reused_with_gradients() -> None:
    """A layer called on its own after the model's backward computes fresh statistics (no freed graph)."""
    model = _perturb(_models()["resnet_gn+pn"])
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    layer = model.blocks[0].norm1
    y = layer(torch.randn(2, layer.num_channels, 4, 4))
    y.sum().backward()  # would raise "backward through the graph a second time" on the spent batch


def test_eval_cache_until_a_parameter_changes() -> None:
    from ipu_norm.train.ema import ModelEma  # noqa: PLC0415

    torch.manual_seed(0)
    model = _perturb(_models()["efficientnet_ln+pn"]).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        first = model(x)
        assert _count_stats_calls(model, x, batched=True) == 0  # cached: parameters unchanged
        with proxy_stats_batching(False):
            torch.testing.assert_close(model(x), first)
        model.blocks[0].conv_dw.norm.proxy_bias.add_(0.5)  # in place: bumps the version counter
        assert _count_stats_calls(model, x, batched=True) == 1
        changed = model(x)
        with proxy_stats_batching(False):
            torch.testing.assert_close(changed, model(x))
    assert not torch.allclose(changed, first)

    live = _perturb(_models()["efficientnet_ln+pn"], seed=1)
    ema = ModelEma(live, decay=0.5, warmup=False)
    with torch.no_grad():
        before = ema.module(x)
        _perturb(live, seed=2)
        ema.update(live, step=0)
        after = ema.module(x)
        with proxy_stats_batching(False):
            torch.testing.assert_close(after, ema.module(x))
    assert not torch.allclose(before, after)


def test_clear_after_a_write_through_data() -> None:
    from ipu_norm.layers.proxy_norm import clear_proxy_stats  # noqa: PLC0415

    model = _perturb(_models()["mixed_acts"]).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model(x)
        model.blocks[0][1].proxy_weight.data.add_(1.0)  # .data: no version bump, the cache cannot see it
        clear_proxy_stats(model)
        out = model(x)
        with proxy_stats_batching(False):
            torch.testing.assert_close(out, model(x))


def test_stats_follow_a_device_or_dtype_move() -> None:
    model = _perturb(_models()["mixed_acts"]).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model(x)
        model.double()  # new storages: the cached float32 statistics must not be used
        out = model(x.double())
        with proxy_stats_batching(False):
            torch.testing.assert_close(out, model(x.double()), rtol=1e-12, atol=1e-12)


def test_batched_stats_under_bf16_autocast() -> None:
    model = _perturb(_models()["efficientnet_ln+pn"])
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batched = _out_and_grads(model, x, True)
        per_layer = _out_and_grads(model, x, False)
    assert batched[0].dtype == torch.bfloat16
    _assert_same(batched, per_layer, rtol=0, atol=0)


def test_stage_modules_batch_their_own_layers() -> None:
    from ipu_norm.parallel.stages import build_stage_module  # noqa: PLC0415

    model = _perturb(_models()["resnet_gn+pn"].double())

    class Plan:  # the fields build_stage_module reads
        class stage:  # noqa: N801
            units = ("stem", "blocks.0", "blocks.1", "head")
        stages = (stage,)
        training = True
        recompute = "auto"
        recompute_checkpoints = ["blocks.0"]

    stage = build_stage_module(model, Plan, 0, autocast=False)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref = _out_and_grads(model, x, False)
    _assert_same(_out_and_grads(stage, x, True), ref, rtol=1e-12, atol=1e-12)
    assert _count_stats_calls(stage, x, batched=True) == 1


def test_batched_stats_under_ddp(tmp_path) -> None:
    """Single-process gloo DDP (no spawned workers): same gradients as the per-layer path."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = _perturb(_models()["efficientnet_ln+pn"].double())
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        ref = _out_and_grads(model, x, False)
        _assert_same(_out_and_grads(ddp, x, True), ref, rtol=1e-12, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_batched_stats_under_torch_compile() -> None:
    model = _perturb(_models()["mixed_acts"])
    x = torch.randn(1, 3, 8, 8)
    ref = _out_and_grads(model, x, True)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    got = _out_and_grads(compiled, x, True)
    _assert_same(got, ref)


def test_prepare_is_a_no_op_without_pn_layers() -> None:
    from tiny_models import TinyNet  # noqa: PLC0415

    model = TinyNet()
    prepare_proxy_stats(model)  # nothing to batch
    model(torch.randn(1, 3, 8, 8)).sum().backward()
