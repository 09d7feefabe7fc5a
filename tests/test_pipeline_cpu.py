"""The plan on CPU: stage modules, recomputation and autocast in-process; pipelining and replication across gloo
processes give the same loss and gradients as one process accumulating the same micro-batches."""

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
from procs import spawn_gloo
from torch import nn

from ipu_norm.core.plan import build_plan
from ipu_norm.parallel import ParallelLayout, build_local_model, build_stage_modules
from ipu_norm.parallel.stages import CheckpointedSegment


class TinyGN(nn.Module):
    """MODEL CONTRACT model with GroupNorm (batch-independent, so micro-batching does not change the maths)."""

    def __init__(self, num_blocks: int = 4, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU())
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU())
            for _ in range(num_blocks)
        ])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))
        self.default_cfg = {"train_size": 8, "test_size": 8, "num_classes": 5, "norm": "gn", "family": "tiny"}

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


MICRO, ACCUM_TOTAL = 2, 4


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(ACCUM_TOTAL * MICRO, 3, 8, 8, generator=g)
    ys = torch.randint(0, 5, (ACCUM_TOTAL * MICRO,), generator=g)
    return [(xs[i * MICRO:(i + 1) * MICRO], ys[i * MICRO:(i + 1) * MICRO]) for i in range(ACCUM_TOTAL)]


def reference(model: nn.Module, micro_batches) -> tuple[float, dict[str, torch.Tensor]]:
    """Plain single-process gradient accumulation: mean of the micro-batch losses."""
    model.zero_grad()
    total = 0.0
    for x, y in micro_batches:
        loss = nn.functional.cross_entropy(model(x), y)
        (loss / len(micro_batches)).backward()
        total += loss.item()
    return total / len(micro_batches), {n: p.grad.clone() for n, p in model.named_parameters()}


def make_plan(execution: dict, replicas: int = 1):
    ex = {"device": "cpu", "replicas": replicas, **execution}
    return build_plan(ex, TinyGN(), {"micro_batch_size": MICRO, "global_batch_size": MICRO * ACCUM_TOTAL})


def test_stage_modules_chain_to_the_model() -> None:
    model = TinyGN()
    plan = make_plan({"pipeline_splits": ["blocks.1", "blocks.3"], "recompute": "checkpoints",
                      "recompute_checkpoints": ["stem", "blocks.2"]})
    stages = build_stage_modules(model, plan)
    assert len(stages) == 3
    x = torch.randn(2, 3, 8, 8)
    y = x
    for s in stages:
        y = s(y)
    torch.testing.assert_close(y, model(x))
    # Parameters are shared, not copied.
    ids = {id(p) for s in stages for p in s.parameters()}
    assert ids == {id(p) for p in model.parameters()}
    # Stage 0 = stem, blocks.0: a checkpointed run ending at 'stem' then the rest of the stage.
    ckpts = [m for m in stages[0].modules() if isinstance(m, CheckpointedSegment)]
    assert len(ckpts) == 2


def test_recompute_same_gradients_and_fewer_saved_tensors() -> None:
    model = TinyGN()
    mbs = data()
    ref_loss, ref_grads = reference(model, mbs)
    plan = make_plan({"recompute": "auto"})
    local = build_local_model(model, plan)
    model.zero_grad()
    for x, y in mbs:
        (nn.functional.cross_entropy(local(x), y) / len(mbs)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n])

    def saved_bytes(m: nn.Module) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(torch.randn(2, 3, 8, 8)).sum()
        return total

    # Checkpointing keeps only segment inputs: strictly fewer saved bytes than the plain model.
    assert saved_bytes(local) < saved_bytes(model)
    assert ref_loss > 0


def test_bf16_autocast_stage() -> None:
    model = TinyGN()
    plan = make_plan({"precision": "bf16"})
    local = build_local_model(model, plan)
    x = torch.randn(2, 3, 8, 8)
    out = local(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x), atol=5e-2, rtol=5e-2)


def test_layout() -> None:
    plan = make_plan({"pipeline_splits": ["blocks.2"]}, replicas=2)
    lay = ParallelLayout.for_plan(plan, rank=3, world_size=4)
    assert (lay.stage, lay.replica) == (1, 1)
    assert lay.pipeline_ranks(1) == [2, 3] and lay.replica_ranks(0) == [0, 2]
    with pytest.raises(ValueError, match="= 4 processes but the job has 2"):
        ParallelLayout.for_plan(plan, rank=0, world_size=2)


# ------------------------------------------------------------------------------------------------ multi-process


def _worker(rank: int, world: int, mode: str, out_dir: str) -> None:
    """One rank's results; the process group is set up and torn down by spawn_gloo (tests/procs.py)."""
    from ipu_norm.parallel import ParallelRunner

    results = {}
    for variant in (["gpipe", "1f1b"] if mode == "pipeline" else ["ddp"]):
        torch.manual_seed(0)
        model = TinyGN()
        mbs = data()
        if mode == "pipeline":
            # gpipe also recomputes every block, so checkpointing is exercised across processes.
            ex = {"pipeline_splits": ["blocks.2"], "pipeline_schedule": variant,
                  "recompute": "auto" if variant == "gpipe" else "none"}
            plan = make_plan(ex)
            mine = mbs
        else:
            plan = make_plan({}, replicas=2)
            mine = mbs[rank * 2:(rank + 1) * 2]  # each replica gets its own half of the global batch
        runner = ParallelRunner(model, plan, nn.functional.cross_entropy)
        loss = runner.forward_backward(mine)
        names = {id(p): n for n, p in model.named_parameters()}
        grads = {names[id(p)]: p.grad.clone() for p in runner.parameters()}
        results[variant] = (loss, grads)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(mode: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        spawn_gloo(_worker, (mode, d), Path(d))
        return {r: torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)}


@pytest.mark.distributed
def test_two_stage_pipeline_matches_single_process() -> None:
    torch.manual_seed(0)
    ref_loss, ref_grads = reference(TinyGN(), data())
    res = _run("pipeline")
    for variant in ("gpipe", "1f1b"):
        seen = {}
        for r in range(2):
            loss, grads = res[r][variant]
            assert loss == pytest.approx(ref_loss, rel=1e-5)
            seen.update(grads)
        assert set(seen) == set(ref_grads)  # the two stages own all parameters between them
        for n, g in seen.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
def test_two_replicas_match_single_process() -> None:
    torch.manual_seed(0)
    ref_loss, ref_grads = reference(TinyGN(), data())
    res = _run("replicas")
    for r in range(2):
        loss, grads = res[r]["ddp"]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert set(grads) == set(ref_grads)
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6)


def test_reference_is_not_trivially_equal() -> None:
    # Guard against a vacuous comparison: a different micro-batch split of different data changes the gradients.
    torch.manual_seed(0)
    m = TinyGN()
    _, g1 = reference(copy.deepcopy(m), data(1))
    _, g2 = reference(copy.deepcopy(m), data(2))
    assert any(not torch.allclose(g1[n], g2[n]) for n in g1)
