"""Micro-batch AGC (optim.agc_scope: micro_batch): the backward clip against float64 references, its equality
with exact (step) AGC at accumulation 1, and its difference from it with accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ipu_norm.config import ConfigError, load_config
from ipu_norm.layers.weight_std import ScaledStdConv2d
from ipu_norm.ops.agc_micro import clip_unitwise, micro_batch_agc
from ipu_norm.optim.agc import adaptive_clip_grad_
from ipu_norm.optim.agc_scope import enable_micro_batch_agc

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_clip(grad: torch.Tensor, weight: torch.Tensor, clip: float, eps: float = 1e-3,
                   scale: float = 1.0) -> torch.Tensor:
    """REFERENCE.md's AGC in plain Python floats, unit by unit (rows; whole tensor for ndim <= 1)."""
    g2 = grad.double().reshape(grad.shape[0], -1) if grad.ndim > 1 else grad.double().reshape(1, -1)
    w2 = weight.double().reshape(g2.shape)
    out = []
    for g_row, w_row in zip(g2.tolist(), w2.tolist()):
        w_norm = max(math.sqrt(sum(v * v for v in w_row)), eps)
        g_norm = math.sqrt(sum(v * v for v in g_row)) / scale
        f = clip * w_norm / max(g_norm, 1e-6) if g_norm > clip * w_norm else 1.0
        out.append([v * f for v in g_row])
    return torch.tensor(out, dtype=torch.float64).reshape(grad.shape)


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 4), (7,), ()])
@pytest.mark.parametrize("scale", [1.0, 128.0, 0.25])
def test_clip_matches_float64_reference(shape: tuple[int, ...], scale: float) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(w.numel(), generator=gen, dtype=torch.float64) * torch.logspace(-4, 1, w.numel(),
                                                                                     dtype=torch.float64)
    g = g.reshape(shape) * scale
    if len(shape) > 1:
        w[0] = 1e-5  # a unit whose weight norm is below eps
    got = clip_unitwise(g, w, clip=0.05, eps=1e-3, loss_scale=scale)
    ref = reference_clip(g, w, 0.05, 1e-3, scale)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)
    assert not torch.equal(got, g) or len(shape) == 0  # something was clipped (scalars may not be)


def test_identity_forward_clipped_backward() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    x = torch.randn(8, 3, dtype=torch.float64)
    out = x @ micro_batch_agc(w, 0.01).t()
    assert torch.equal(out, x @ w.t())
    (out.pow(2).sum() * 10).backward()
    raw = torch.autograd.grad((x @ w.t()).pow(2).sum() * 10, w)[0]
    assert torch.allclose(w.grad, reference_clip(raw, w.detach(), 0.01), rtol=1e-12)
    assert torch.autograd.gradcheck(lambda t: micro_batch_agc(t, 1e9), (torch.randn(3, 2, dtype=torch.float64,
                                                                                 requires_grad=True),))


class WSNet(nn.Module):
    """Only Scaled-WS convs besides the classifier: both AGC scopes clip the same parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ScaledStdConv2d(3, 8, 3, padding=1)
        self.conv2 = ScaledStdConv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def _step(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], scope: str, clip: float) -> None:
    """One SGD step (lr 1) over micro-batches as the torch backend does it: backward of loss / n each."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    n = len(batches)
    if scope == "micro_batch":
        enable_micro_batch_agc(model, clip, 1e-3, loss_scale=1.0 / n)
    for x, y in batches:
        (nn.functional.cross_entropy(model(x), y) / n).backward()
    if scope == "step":
        params = [p for m in (model.conv1, model.conv2) for p in m.parameters()]
        adaptive_clip_grad_(params, clip, 1e-3)
    opt.step()


def _data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (4,), generator=g))
            for _ in range(n)]


def _reference_step(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], clip: float,
                    per_micro_batch: bool) -> dict[str, torch.Tensor]:
    """float64 weights after one step: clip each micro-batch's gradient (or their mean) with reference_clip."""
    clipped = {id(p) for m in (model.conv1, model.conv2) for p in m.parameters()}
    params = list(model.parameters())
    grads = [torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params) for x, y in batches]
    new = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        gs = [g[i] for g in grads]
        if id(p) in clipped and per_micro_batch:
            g = sum(reference_clip(gi, p.detach(), clip) for gi in gs) / len(gs)
        else:
            g = sum(gs) / len(gs)
            if id(p) in clipped:
                g = reference_clip(g, p.detach(), clip)
        new[name] = p.detach() - g
    return new


def test_equals_step_agc_at_accumulation_one() -> None:
    torch.manual_seed(0)
    base = WSNet().double()
    data = _data(1, 1)
    ref = _reference_step(base, data, 0.01, per_micro_batch=True)
    results = {}
    for scope in ("step", "micro_batch"):
        model = WSNet().double()
        model.load_state_dict(base.state_dict())
        _step(model, data, scope, 0.01)
        results[scope] = dict(model.named_parameters())
        for name, p in model.named_parameters():
            assert torch.allclose(p.detach(), ref[name], rtol=1e-10, atol=1e-12), (scope, name)
    for name, p in results["step"].items():
        assert torch.allclose(p, results["micro_batch"][name], rtol=1e-12, atol=1e-14)


def test_differs_from_step_agc_with_accumulation() -> None:
    torch.manual_seed(0)
    base = WSNet().double()
    data = _data(4, 2)
    out = {}
    for scope, per_mb in (("step", False), ("micro_batch", True)):
        model = WSNet().double()
        model.load_state_dict(base.state_dict())
        _step(model, data, scope, 0.01)
        ref = _reference_step(base, data, 0.01, per_micro_batch=per_mb)
        for name, p in model.named_parameters():
            assert torch.allclose(p.detach(), ref[name], rtol=1e-10, atol=1e-12), (scope, name)
        out[scope] = model.conv1.weight.detach()
    assert not torch.allclose(out["step"], out["micro_batch"], rtol=1e-6)  # clipping does not commute with sums


def test_scope_is_validated_and_needs_ws_convs() -> None:
    assert load_config(None).optim.agc_scope == "step"
    with pytest.raises(ConfigError, match="optim.agc_scope: expected one of 'step', 'micro_batch'"):
        load_config(None, flags={"optim.agc_scope": "replica"})
    with pytest.raises(ValueError, match="has none"):
        enable_micro_batch_agc(nn.Sequential(nn.Conv2d(3, 4, 3)), 0.01)
    model = WSNet()
    assert enable_micro_batch_agc(model, 0.01) == ["conv1", "conv2"]
    assert enable_micro_batch_agc(model, None) == ["conv1", "conv2"] and model.conv1.micro_batch_agc is None


def test_trainer_micro_batch_scope_runs(tmp_path) -> None:  # noqa: ANN001
    """The trainer wires the scope: the WS convs get the clip, step AGC is off, training runs."""
    from ipu_norm.train.trainer import Trainer

    cfg = load_config(
        None,
        flags={"model.name": "nf_resnet50", "model.num_classes": 4,
               "data.train_size": 16, "data.test_size": 16, "data.num_workers": 0, "data.generated_samples": 8,
               "data.generated_val_samples": 4, "optim.agc_clip": 0.02, "optim.agc_scope": "micro_batch",
               "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.max_steps": 1,
               "train.progress_bar": False, "train.output_dir": str(tmp_path), "execution.device": "cpu"},
    )
    logs: list[str] = []
    trainer = Trainer(cfg, log=logs.append)
    ws = [m for m in trainer.model.modules() if isinstance(m, ScaledStdConv2d)]
    assert ws and all(m.micro_batch_agc is not None and m.micro_batch_agc.loss_scale == 0.5 for m in ws)
    assert trainer.backend.spec.agc_clip is None
    assert any("AGC per micro-batch" in line for line in logs)
    assert trainer.fit().global_step == 1
