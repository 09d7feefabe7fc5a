"""Adaptive Gradient Clipping: per-unit float64 reference, timm parity, eps guards, classifier exclusion,
gradient accumulation, GradScaler call order and DDP (clip after the all-reduce)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from procs import spawn_gloo
from torch import nn

from ipu_norm.optim.agc import AGC, adaptive_clip_grad_, agc_parameters, unitwise_norm


def _reference_clip(w: torch.Tensor, g: torch.Tensor, clip: float, eps: float = 1e-3) -> torch.Tensor:
    """REFERENCE.md's formula, unit by unit, in float64."""
    w, g = w.double(), g.double()
    out = g.clone()
    units = [...] if w.ndim <= 1 else list(range(w.shape[0]))
    for u in units:
        w_norm = max(w[u].norm().item(), eps)
        g_norm = g[u].norm().item()
        if g_norm / w_norm > clip:
            out[u] = clip * w_norm / max(g_norm, 1e-6) * g[u]
    return out


def _params_with_grads(dtype: torch.dtype = torch.float64) -> list[nn.Parameter]:
    """Conv, linear, WS gain, bias and scalar parameters; per-unit grad/weight ratios spread over [0, 0.03]."""
    shapes = [(8, 4, 3, 3), (6, 8, 3, 3), (5, 7), (8, 1, 1, 1), (8,), ()]
    params = []
    for shape in shapes:
        w = torch.randn(shape, dtype=torch.float64)
        g = torch.randn(shape, dtype=torch.float64)
        if w.ndim >= 2:
            ratio = torch.linspace(0.0, 0.03, shape[0], dtype=torch.float64).view(-1, *([1] * (w.ndim - 1)))
            g = g / unitwise_norm(g) * unitwise_norm(w) * ratio
        else:
            g = g / g.norm() * w.norm() * 0.02
        p = nn.Parameter(w.to(dtype))
        p.grad = g.to(dtype)
        params.append(p)
    return params


def test_unitwise_norm() -> None:
    conv = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(unitwise_norm(conv).flatten(), conv.reshape(4, -1).norm(dim=1))
    assert unitwise_norm(conv).shape == (4, 1, 1, 1)
    lin = torch.randn(5, 7)
    assert unitwise_norm(lin).shape == (5, 1)
    torch.testing.assert_close(unitwise_norm(lin).flatten(), lin.norm(dim=1))
    vec = torch.randn(9)
    assert unitwise_norm(vec).shape == () and unitwise_norm(vec) == pytest.approx(vec.norm().item())
    assert unitwise_norm(torch.tensor(-3.0)).item() == pytest.approx(3.0)


@pytest.mark.parametrize("clip", [0.01, 0.005])
def test_matches_per_unit_reference_float64(clip: float) -> None:
    params = _params_with_grads()
    before = [p.grad.clone() for p in params]
    expected = [_reference_clip(p.detach(), p.grad, clip) for p in params]
    fraction = adaptive_clip_grad_(params, clip)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-15)
    # The returned fraction counts the units the reference changed (rows of conv/linear, whole vectors/scalars).
    units = [(b != e).reshape(e.shape[0], -1).any(1) if e.ndim >= 2 else (b != e).reshape(1, -1).any(1)
             for b, e in zip(before, expected)]
    assert fraction.item() == pytest.approx(torch.cat(units).double().mean().item())
    # Both branches of the rule were exercised: some conv/linear rows clipped, some left untouched.
    changed = [(b != e).reshape(e.shape[0], -1).any(1) for b, e in zip(before, expected) if e.ndim >= 2]
    changed = torch.cat(changed)
    assert changed.any() and not changed.all()


def test_matches_timm() -> None:
    timm_agc = pytest.importorskip("timm.utils.agc")
    ours = _params_with_grads(torch.float32)
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        b.grad = a.grad.clone()
    adaptive_clip_grad_(ours, 0.01, eps=1e-3)
    timm_agc.adaptive_clip_grad(theirs, clip_factor=0.01, eps=1e-3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_row_subset_multiply_is_bitwise_a_full_multiply(dtype: torch.dtype) -> None:
    # The CPU path multiplies only clipped units; multiplying every unit by its factor (1.0 where not clipped,
    # as on accelerators) must give the very same bits. Covers: no unit clipped, some rows, all rows, vectors,
    # scalars, a non-contiguous gradient (full multiply fallback) and bf16 gradients (fp32 factors cast down).
    from ipu_norm.optim.agc import _scale_clipped_rows_cpu

    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (6, 5), (7, 3), (4, 1, 1, 1), (5,), (), (6, 4)]
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads[-1] = torch.randn(4, 6, generator=g).to(dtype).t()  # non-contiguous (6, 4)
    units = [s[0] if len(s) > 1 else 1 for s in shapes]
    masks = [torch.rand(n, generator=g) < 0.3 for n in units]
    masks[1][:] = False  # nothing clipped in this tensor
    masks[2][:] = True  # every row clipped
    masks[4][:] = True  # the vector is clipped
    masks[-1][:2] = True
    masks[-1][2:] = False
    clipped = torch.cat(masks)
    factors = torch.where(clipped, torch.rand(clipped.numel(), generator=g), torch.ones(clipped.numel()))
    dense = []
    for grad, f in zip(grads, factors.split(units)):
        dense.append(grad * f.to(dtype).view((-1,) + (1,) * (grad.ndim - 1) if grad.ndim > 1 else ()))
    before = [t.clone() for t in grads]
    _scale_clipped_rows_cpu(grads, factors, clipped, units)
    for a, b, old, m in zip(grads, dense, before, masks):
        assert torch.equal(a, b)
        if a.ndim > 1:  # clipped rows changed in place, the others kept their bits
            assert torch.equal(a[~m], old[~m])
            if m.any():
                assert not torch.equal(a[m], old[m])


def test_eps_guards() -> None:
    zero_w = nn.Parameter(torch.zeros(4, 3))  # e.g. a zero-initialised gain: ||W||* = 1e-3
    zero_w.grad = torch.ones(4, 3)
    zero_g = nn.Parameter(torch.randn(4, 3))
    zero_g.grad = torch.zeros(4, 3)
    both = nn.Parameter(torch.zeros(5))
    both.grad = torch.zeros(5)
    no_grad = nn.Parameter(torch.randn(3))
    adaptive_clip_grad_([zero_w, zero_g, both, no_grad], 0.01)
    # Each row of zero_w's grad is clipped to norm 0.01 * 1e-3.
    torch.testing.assert_close(zero_w.grad.norm(dim=1), torch.full((4,), 1e-5))
    assert torch.equal(zero_g.grad, torch.zeros(4, 3)) and torch.equal(both.grad, torch.zeros(5))
    assert no_grad.grad is None


def test_half_precision_grads() -> None:
    ref = _params_with_grads()
    expected = [_reference_clip(p.detach(), p.grad, 0.01) for p in ref]
    params = [nn.Parameter(p.detach().to(torch.bfloat16)) for p in ref]
    for p, r in zip(params, ref):
        p.grad = r.grad.to(torch.bfloat16)
    adaptive_clip_grad_(params, 0.01)
    for p, e in zip(params, expected):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.double(), e, rtol=2e-2, atol=1e-3)


class _ClassifierFirst(nn.Module):
    """The classifier is registered first: selecting it "by order" (last parameters) would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.conv = nn.Conv2d(2, 8, 3)
        self.gain = nn.Parameter(torch.ones(8))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)) * self.gain)


def test_classifier_excluded_by_module() -> None:
    model = _ClassifierFirst()
    params = agc_parameters(model)
    assert {id(p) for p in params} == {id(model.conv.weight), id(model.conv.bias), id(model.gain)}

    class Wrapper(nn.Module):  # DDP-like: exposes the wrapped model as .module
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.module = m

    assert {id(p) for p in agc_parameters(Wrapper(model))} == {id(p) for p in params}
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e3)
    AGC(model, clip_factor=0.01).clip_()
    assert (model.fc.weight.grad == 1e3).all() and (model.fc.bias.grad == 1e3).all()
    assert model.conv.weight.grad.abs().max() < 1.0
    with pytest.raises(TypeError):
        agc_parameters(nn.Linear(2, 2))


def test_classifier_excluded_for_nfnet() -> None:
    from ipu_norm.models.nfnet import NFNetCfg, NormFreeNet

    model = NormFreeNet(NFNetCfg(depths=(1, 1), channels=(16, 32), strides=(1, 2), stem_chs=16, group_size=8,
                                 num_features=32), num_classes=4)
    params = agc_parameters(model)
    fc = {id(p) for p in model.get_classifier().parameters()}
    assert len(params) == len(list(model.parameters())) - 2 and not fc & {id(p) for p in params}


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))


def test_accumulate_then_clip_differs_from_clipping_micro_batches() -> None:
    model = _toy()
    params = list(model.parameters())
    # Two micro-batches whose gradients point in different directions.
    batches = [(torch.randn(8, 4), torch.randn(8, 1) * 5) for _ in range(2)]

    def grads_of(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        (nn.functional.mse_loss(model(x), y) / 2).backward()
        return [p.grad.clone() for p in params]

    micro = [grads_of(x, y) for x, y in batches]
    # Right: accumulate, then clip once.
    for p, g0, g1 in zip(params, *micro):
        p.grad = g0 + g1
    adaptive_clip_grad_(params, 0.01)
    right = [p.grad.clone() for p in params]
    # Wrong: clip every micro-batch, then accumulate.
    wrong = [torch.zeros_like(p) for p in params]
    for g in micro:
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        adaptive_clip_grad_(params, 0.01)
        for w, p in zip(wrong, params):
            w += p.grad
    assert max((a - b).abs().max().item() for a, b in zip(right, wrong)) > 1e-4


def test_step_once_per_optimizer_step_with_accumulation() -> None:
    model, ref = _toy(), _toy()
    agc = AGC(list(model.parameters()), clip_factor=0.02)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n_steps, n_micro = 3, 4
    data = [[(torch.randn(4, 4), torch.randn(4, 1) * 3) for _ in range(n_micro)] for _ in range(n_steps)]
    for step in data:
        for x, y in step:
            (nn.functional.mse_loss(model(x), y) / n_micro).backward()
        agc.step_(opt)  # the only AGC call: after the last micro-batch's backward
        opt.zero_grad()
    assert agc.num_clips == n_steps
    # Independent reference: full-batch gradient of the step (== accumulated mean), clipped, plain SGD.
    with torch.no_grad():
        ref_params = [p.clone() for p in ref.parameters()]
    for step in data:
        x = torch.cat([x for x, _ in step])
        y = torch.cat([y for _, y in step])
        for p, rp in zip(ref.parameters(), ref_params):
            p.data.copy_(rp)
        ref.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for p, rp in zip(ref.parameters(), ref_params):
                g = _reference_clip(rp, p.grad, 0.02).float()
                rp -= 0.1 * g
    for p, rp in zip(model.parameters(), ref_params):
        torch.testing.assert_close(p.detach(), rp, rtol=1e-5, atol=1e-6)


def test_grad_scaler_unscale_before_clip() -> None:
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=True)
    except (RuntimeError, TypeError) as e:  # pragma: no cover - older torch without CPU GradScaler
        pytest.skip(f"CPU GradScaler unavailable: {e}")
    x, y = torch.randn(16, 4), torch.randn(16, 1) * 3

    def run(use_scaler: bool, clip_before_unscale: bool = False) -> list[torch.Tensor]:
        model = _toy()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        agc = AGC(list(model.parameters()), clip_factor=0.01)
        loss = nn.functional.mse_loss(model(x), y)
        if not use_scaler:
            loss.backward()
            agc.step_(opt)
        elif not clip_before_unscale:
            s = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            s.scale(loss).backward()
            agc.step_(opt, s)  # unscale_ -> clip_ -> step -> update
        else:
            s = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            s.scale(loss).backward()
            agc.clip_()  # wrong order: on grads 4096x too large
            s.step(opt)
            s.update()
        return [p.detach().clone() for p in model.parameters()]

    assert scaler.is_enabled()
    plain, scaled, wrong = run(False), run(True), run(True, clip_before_unscale=True)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(plain, wrong)) > 1e-4


# --------------------------------------------------------------------------------------------------------------
# DDP: the gradient is averaged over replicas during the last backward (no_sync on the earlier micro-batches);
# AGC after that clips the global gradient, identically on every rank.
# --------------------------------------------------------------------------------------------------------------

def _run_ddp(worker, world: int) -> list[dict]:  # noqa: ANN001
    """Run worker(rank, world, out_dir) in `world` gloo processes; each rank's saved dict, in rank order."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo unavailable")
    with tempfile.TemporaryDirectory() as out_dir:
        spawn_gloo(worker, (out_dir,), Path(out_dir), nprocs=world)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def _ddp_worker(rank: int, world: int, out_dir: str) -> None:
    model = nn.parallel.DistributedDataParallel(_toy())
    agc = AGC(model.module.parameters(), clip_factor=0.01)
    gen = torch.Generator().manual_seed(100 + rank)
    micro = [(torch.randn(4, 4, generator=gen), torch.randn(4, 1, generator=gen) * 3) for _ in range(2)]
    with model.no_sync():
        x, y = micro[0]
        (nn.functional.mse_loss(model(x), y) / 2).backward()
    x, y = micro[1]
    (nn.functional.mse_loss(model(x), y) / 2).backward()  # all-reduce (mean) happens here
    agc.clip_()
    torch.save({"clipped": [p.grad.clone() for p in model.parameters()], "data": micro},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.slow  # two spawned processes: ~5-20 s of interpreter start-up on a loaded machine
def test_ddp_clip_after_allreduce() -> None:
    world = 2
    results = _run_ddp(_ddp_worker, world)
    # Identical on every rank.
    for a, b in zip(results[0]["clipped"], results[1]["clipped"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Equal to clip(mean over ranks of the accumulated gradient), computed here without DDP.
    model = _toy()
    params = list(model.parameters())
    for r in range(world):
        for x, y in results[r]["data"]:
            (nn.functional.mse_loss(model(x), y) / (2 * world)).backward()
    expected = [_reference_clip(p.detach(), p.grad, 0.01).float() for p in params]
    for got, e in zip(results[0]["clipped"], expected):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# AGC computes the norms it clips with on every call: after any in-place write, through any API, at any thread
# count, the clip equals the float64 reference written in this file.
# --------------------------------------------------------------------------------------------------------------

def _ws_net() -> nn.Module:
    from ipu_norm.layers.weight_std import ScaledStdConv2d

    torch.manual_seed(3)
    return nn.Sequential(ScaledStdConv2d(3, 12, 3), nn.ReLU(), ScaledStdConv2d(12, 16, 3, stride=2), nn.ReLU(),
                         nn.Conv2d(16, 8, 1)).double()


def _ws_backward(model: nn.Module, seed: int = 0) -> None:
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (model(x) * torch.linspace(-3, 3, 8, dtype=torch.float64).view(1, 8, 1, 1)).sum().backward()


def _expected(params: list[nn.Parameter], clip: float) -> list[torch.Tensor]:
    return [_reference_clip(p.detach(), p.grad, clip) for p in params]


@pytest.mark.parametrize("change", ["none", "grad_mul", "weight_add", "accumulate", "zero_grad_keeps_tensor",
                                    "grad_replaced", "unscale_kernel", "grad_data_write_middle",
                                    "weight_data_write_middle", "unscale_with_zero_ends"])
def test_clip_after_in_place_writes_equals_reference(change: str, threads: int) -> None:  # noqa: ARG001
    model = _ws_net()
    params = list(model.parameters())
    if change == "zero_grad_keeps_tensor":
        _ws_backward(model, seed=1)
        model.zero_grad(set_to_none=False)  # .grad stays: the next backward accumulates into it in place
    _ws_backward(model)
    if change == "accumulate":
        _ws_backward(model, seed=2)  # a second micro-batch: AccumulateGrad adds it in place
    with torch.no_grad():
        if change == "grad_mul":
            model[0].weight.grad.mul_(7.0)
        elif change == "weight_add":
            model[2].weight.add_(0.5)
        elif change == "grad_replaced":
            model[0].weight.grad = model[0].weight.grad * 7.0
        elif change == "unscale_kernel":  # GradScaler.unscale_'s kernel: in place, no version bump
            grads = [p.grad for p in params]
            torch._amp_foreach_non_finite_check_and_unscale_(grads, torch.zeros(1), torch.full((1,), 0.125))
    if change == "grad_data_write_middle":  # through .data: bypasses the version counter
        g = model[0].weight.grad.data
        g[g.shape[0] // 2].mul_(16.0)
    elif change == "weight_data_write_middle":
        w = model[2].weight.data
        w[w.shape[0] // 2].mul_(0.01)
    elif change == "unscale_with_zero_ends":
        # A gradient whose first and last elements are zero, unscaled in place by GradScaler's kernel.
        for p in params:
            flat = p.grad.view(-1)
            flat[0] = 0.0
            flat[-1] = 0.0
        grads = [p.grad for p in params]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, torch.zeros(1), torch.full((1,), 1.0 / 1024))
    clip = 0.5 * min((unitwise_norm(p.grad) / unitwise_norm(p.detach())).median().item() for p in params)
    expected = _expected(params, clip)
    assert any((e != p.grad).any() for e, p in zip(expected, params))  # some units are clipped
    adaptive_clip_grad_(params, clip)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=0)


def test_grad_scaler_unscale_then_clip_over_steps_equals_reference() -> None:
    # The documented order, scaler.unscale_(opt); agc.clip_(); scaler.step(opt); scaler.update(), over several
    # steps (weights change every step), against a float64 loop written here: unscale by hand, the reference clip,
    # then SGD with momentum by hand.
    lr, mom, clip, scale = 0.05, 0.9, 0.02, 2.0**10
    model = _ws_net()
    ref = _ws_net()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mom)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    agc = AGC(model.parameters(), clip_factor=clip)
    bufs: list[torch.Tensor | None] = [None] * len(list(ref.parameters()))
    for step in range(3):
        x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        opt.zero_grad(set_to_none=True)
        scaler.scale(model(x).square().mean()).backward()
        with torch.no_grad():
            for p in model.parameters():  # zero first/last elements (the case the old recorded norms got wrong)
                p.grad.view(-1)[0] = 0.0
                p.grad.view(-1)[-1] = 0.0
        scaler.unscale_(opt)
        agc.clip_()
        scaler.step(opt)
        scaler.update()

        ref.zero_grad(set_to_none=True)
        (ref(x).square().mean() * scale).backward()
        with torch.no_grad():
            for i, p in enumerate(ref.parameters()):
                g = p.grad / scale
                g.view(-1)[0] = 0.0
                g.view(-1)[-1] = 0.0
                g = _reference_clip(p.detach(), g, clip)
                bufs[i] = g.clone() if bufs[i] is None else bufs[i] * mom + g
                p.sub_(lr * bufs[i])
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def _ddp_ws_worker(rank: int, world: int, out_dir: str) -> None:
    # One backward; DDP's all-reduce replaces the local gradient with the mean over ranks: the clip must use that.
    model = nn.parallel.DistributedDataParallel(_ws_net())
    agc = AGC(model.module.parameters(), clip_factor=0.01)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(200 + rank))
    model(x).square().mean().backward()
    agc.clip_()
    torch.save({"clipped": [p.grad.clone() for p in model.parameters()], "x": x},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.slow  # two spawned processes
def test_ddp_clip_after_allreduce_ws_net() -> None:
    world = 2
    results = _run_ddp(_ddp_ws_worker, world)
    model = _ws_net()
    params = list(model.parameters())
    for r in range(world):
        (model(results[r]["x"]).square().mean() / world).backward()
    expected = [_reference_clip(p.detach(), p.grad, 0.01) for p in params]
    for rank in range(world):
        for got, e in zip(results[rank]["clipped"], expected):
            torch.testing.assert_close(got, e, rtol=1e-10, atol=1e-14)
