"""DDP: 2 CPU processes x micro-batch m give the same update as 1 process x accumulation 2 x micro-batch m."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from procs import PYTHON, ROOT, run, spawn_gloo
from torch import nn

from ipu_norm.train.backend import TorchBackend, TrainSpec
from ipu_norm.train.distributed import DistInfo

pytestmark = pytest.mark.distributed

MICRO = 3
STEPS = 3


class TinyGN(nn.Module):
    """Conv -> GroupNorm -> ReLU -> pool -> Linear: batch independent, so DDP and accumulation must agree."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 5)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def _data(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def _run(dist: DistInfo, agc: float | None, accum: int) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps on a global batch of 2 x accum micro-batches (DDP: `accum` of them per rank)."""
    torch.manual_seed(0)
    model = TinyGN()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    backend = TorchBackend("cpu", dist)
    plan = SimpleNamespace(precision="32.32", compile=False)
    backend.prepare(model, opt, plan, TrainSpec(criterion=nn.CrossEntropyLoss(), agc_clip=agc))
    for step in range(STEPS):
        x, y = _data(step, 2 * accum * MICRO)
        micro = [(x[i : i + MICRO], y[i : i + MICRO]) for i in range(0, len(x), MICRO)]
        if dist.enabled:  # this rank's share of the global batch, accumulated locally (no_sync) then all-reduced
            micro = micro[dist.rank * accum : (dist.rank + 1) * accum]
        result = backend.train_step(micro)
        assert result.samples == len(micro) * MICRO
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = [(None, 1), (0.01, 2)]  # (AGC clip, micro-batches per rank)


def _worker(rank: int, world: int, out: str) -> None:
    dist = DistInfo(enabled=True, rank=rank, world_size=world, local_rank=rank)
    for i, (agc, accum) in enumerate(CASES):
        torch.save(_run(dist, agc, accum), f"{out}.{i}.{rank}")


def test_ddp_two_processes_equal_single_process_accumulation(tmp_path: Path) -> None:
    """2 processes x `accum` micro-batches == 1 process x 2*`accum` micro-batches (SGD momentum, wd, AGC).

    Both cases run in one pair of spawned processes to keep the test short. ``spawn_gloo`` (tests/procs.py)
    gives the workers a file rendezvous, one thread each, timeouts and a teardown that waits for all ranks:
    this test used to fail now and then with "process 0 terminated with signal SIGABRT" at teardown.
    """
    out = str(tmp_path / "state")
    spawn_gloo(_worker, (out,), tmp_path)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        initial = TinyGN().state_dict()
        for i, (agc, accum) in enumerate(CASES):
            reference = _run(DistInfo(), agc, accum)
            states = [torch.load(f"{out}.{i}.{r}", weights_only=True) for r in range(2)]
            for key, ref in reference.items():
                # Both ranks hold the same weights, equal to the accumulated single-process update.
                torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)
                torch.testing.assert_close(states[0][key], ref, rtol=1e-5, atol=1e-6)
            # The steps changed every parameter (the comparison is not between untouched weights).
            assert all(not torch.allclose(reference[k], initial[k]) for k in reference)
            if agc is not None:  # AGC is active at this lambda: without it the result differs
                unclipped = _run(DistInfo(), None, accum)
                assert any(not torch.allclose(reference[k], unclipped[k]) for k in reference)
    finally:
        torch.set_num_threads(n)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_end_to_end(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 run_train.py`` trains and resumes; only rank 0 writes the run directory."""
    out = tmp_path / "run"
    # --standalone: torchrun's own rendezvous binds a free port itself (no port picked by the test).
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "run_train.py"),
        "--config",
        str(ROOT / "configs/tiny_resnet18_gn.yml"),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--set",
        "train.global_batch_size=16",
    ]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 16 = micro 4 x accum 2 x 2" in proc.stdout
    assert proc.stdout.count("run summary") == 1  # only rank 0 prints the closing table
    assert len(list((out / "checkpoints").glob("ckpt_step*.pt"))) == 1
    assert (out / "metrics.jsonl").read_text().count('"kind": "train"') == 3
    # Resume with 2 processes: each rank restores its own RNG streams; training continues to step 5.
    cmd = [c if c != "3" else "5" for c in cmd] + ["--resume"]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 3" in proc.stdout and "re-seeded" not in proc.stdout
    assert '"step": 5' in (out / "metrics.jsonl").read_text()
