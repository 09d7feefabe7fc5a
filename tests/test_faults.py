"""Faults survived end to end by the real command: ``python run_train.py`` on a tiny config, as a subprocess.

Killed with SIGKILL (at random moments and inside a checkpoint write), stopped with SIGINT/SIGTERM, or out of
disk, then continued with ``--resume``: the final weights, EMA, optimizer and RNG states and the logged metrics
equal those of an uninterrupted run bit for bit (CPU). Faults inside checkpoint writes are injected with
``tests/fault_inject.py`` (it wraps the checkpoint writer's system calls); signals come from outside or from
that wrapper. The default run has one chained test (~5 subprocesses); the thorough variants are ``slow``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from procs import PYTHON, ROOT, child_env, finish, run, spawn_gloo, start, train_cmd

from ipu_norm.train.checkpoint import list_checkpoints, load_checkpoint
from ipu_norm.train.distributed import DistInfo
from ipu_norm.train.interrupt import StopRequest
from ipu_norm.train.metrics import read_jsonl

FAULT_INJECT = str(ROOT / "tests" / "fault_inject.py")
# 2 epochs x 8 steps, mixup/cutmix + EMA + shuffling on; a checkpoint every 2 steps (also at an epoch's last
# step, where it must come after the epoch's validation).
TRAIN_ARGS = (
    "--config", str(ROOT / "configs" / "tiny_resnet18_gn.yml"),
    "--set", "train.checkpoint_every_steps=2",
    "--set", "train.keep_checkpoints=2",
)
TOTAL_STEPS = 16
VOLATILE = ("time_s", "unix_time", "img_per_s", "wall_s", "train_img_per_s", "data_wait_s",
            "data_wait_frac")  # wall-clock fields: the only ones allowed to differ


def _cmd(out: Path, *extra: str, fault: str | None = None, resume: bool = False) -> list[str]:
    args = (*TRAIN_ARGS, *extra, "--output-dir", str(out), *(["--resume"] if resume else []))
    return train_cmd(*args, python_args=[FAULT_INJECT, fault] if fault else [])


def _steps(out: Path) -> list[int]:
    return [int(p.name[len("ckpt_step"):-3]) for p in list_checkpoints(out / "checkpoints")]


def _stale(out: Path) -> list[Path]:
    return list((out / "checkpoints").glob(".ckpt_step*.tmp"))


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:"))]


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_jsonl(out / "metrics.jsonl")]


def assert_same_run(reference: Path, out: Path, epochs: int = 2) -> None:
    """``out`` ended exactly where the uninterrupted ``reference`` did: state, RNG streams and metrics."""
    a = load_checkpoint(list_checkpoints(reference / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    steps = epochs * TOTAL_STEPS // 2
    assert a["progress"] == b["progress"] and a["progress"]["global_step"] == steps

    def same(x: object, y: object, where: str) -> None:
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), where
            for k in x:
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert type(x) is type(y) and len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, f"{where}: {x!r} != {y!r}"

    for key in ("model", "ema", "optimizer", "scheduler", "rank_states"):
        same(a[key], b[key], key)
    # The sampler's start_index records where the last process began reading its epoch (0, or the resumed
    # position); the trainer resumes from "progress", and the identical weights show the data order was the same.
    same({**a["sampler"], "start_index": 0}, {**b["sampler"], "start_index": 0}, "sampler")
    ra, rb = _records(reference), _records(out)
    assert ra == rb  # every train/validation row, in order, no duplicates from the replayed steps
    assert sum(r["kind"] == "train" for r in ra) == steps and sum(r["kind"] == "val" for r in ra) == epochs
    fa, fb = (json.loads((d / "final_metrics.json").read_text()) for d in (reference, out))
    assert {k: v for k, v in fa.items() if k not in VOLATILE} == {k: v for k, v in fb.items() if k not in VOLATILE}
    # The comparison is between trained models: the weights moved away from the initialisation.
    first = load_checkpoint(list_checkpoints(reference / "checkpoints")[0])
    assert any(not torch.equal(first["model"][k], a["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of the same command (shared by the tests of this module)."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    proc = run(_cmd(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_killed_stopped_and_full_disk_run_resumes_bit_for_bit(reference: Path, tmp_path: Path) -> None:
    """One run survives SIGKILL mid-checkpoint, SIGTERM during a checkpoint write and a disk that fills up."""
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"

    # 1. SIGKILL inside the 2nd checkpoint write (step 4): its temporary file is complete but not renamed.
    proc = run(_cmd(out, fault="kill-fsync:2"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _steps(out) == [2] and len(_stale(out)) == 1

    # 2. Resume; SIGTERM arrives while the checkpoint of step 6 is written (the 2nd write of this process): the
    #    write completes, training stops at the next step boundary with a final checkpoint, exit code 143.
    proc = run(_cmd(out, fault="sigterm:2", resume=True))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "ckpt_step000000002.pt" in proc.stdout
    (line,) = _error_lines(proc.stderr)
    assert line == (
        f"interrupted: stopped by SIGTERM after step 7; checkpoint {ckpt_dir / 'ckpt_step000000007.pt'}; "
        "continue with --resume"
    )
    assert _steps(out) == [6, 7] and not _stale(out)  # the killed write's leftover is gone
    assert not (out / "final_metrics.json").exists()

    # 3. Resume; the disk fills up during the first checkpoint write (step 8): one error line naming the file,
    #    exit code 1, the last good checkpoint untouched, no temporary file left.
    kept = ckpt_dir / "ckpt_step000000007.pt"
    before = kept.read_bytes()
    proc = run(_cmd(out, fault="enospc:1", resume=True))
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    assert line == (
        f"error: cannot write checkpoint {ckpt_dir / 'ckpt_step000000008.pt'}: No space left on device (ENOSPC); "
        f"the last good checkpoint {kept} is kept"
    )
    assert _steps(out) == [6, 7] and kept.read_bytes() == before and not _stale(out)

    # 4. Resume with space again: the run finishes exactly like the uninterrupted one.
    proc = run(_cmd(out, resume=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 7" in proc.stdout
    assert_same_run(reference, out)


def _stop_worker(rank: int, world: int, out: str) -> None:
    """Rank 1 alone gets SIGTERM at step 3; every rank records the step at which should_stop says yes."""
    req = StopRequest()
    req.install()
    dist = DistInfo(enabled=True, rank=rank, world_size=world, local_rank=rank)
    try:
        for step in range(1, 10):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            if req.should_stop(dist):
                break
    finally:
        req.uninstall()
    torch.save({"step": step, "signum": int(req.signum or 0)}, f"{out}.{rank}")


@pytest.mark.distributed
def test_ranks_agree_on_the_stop_step(tmp_path: Path) -> None:
    """A signal that reaches one rank stops every rank after the same step (no rank left in a collective)."""
    out = str(tmp_path / "stop")
    spawn_gloo(_stop_worker, (out,), tmp_path)
    got = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert got == [{"step": 3, "signum": signal.SIGTERM}] * 2


# ----------------------------------------------------------------------------------------------------- slow


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout_s: float = 300.0) -> None:
    """Block until ``proc`` logged a training row of ``step`` or later (fail if the run ends first).

    Rows of an earlier (killed) process in the same run directory are ignored: only rows written after ``proc``
    started count.
    """
    path, started, deadline = out / "metrics.jsonl", time.time(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run ended (code {proc.returncode}) before step {step}"
        lines = path.read_text().splitlines() if path.exists() else []
        rows = [json.loads(line) for line in lines if line.endswith("}")]  # skip a line being written
        if any(r["kind"] == "train" and r["step"] >= step and r["unix_time"] >= started for r in rows):
            return
        time.sleep(0.01)
    raise TimeoutError(f"no training row of step {step} within {timeout_s} s")


@pytest.mark.slow
def test_random_sigkills_then_resume_bit_for_bit(tmp_path: Path) -> None:
    """Eight SIGKILLs at seeded random moments (and inside checkpoint writes), each followed by --resume.

    4 epochs (32 steps) here: each attempt advances the run by at most a few steps, so all eight kill a run that
    is still training, on a fast or a loaded machine.
    """
    longer = ("--epochs", "4")
    reference = tmp_path / "reference"
    proc = run(_cmd(reference, *longer))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rng = random.Random(20261202)
    out = tmp_path / "run"
    for attempt in range(8):
        resume = attempt > 0
        if attempt % 2:  # a random moment of training, seen from outside: 0-0.1 s after a random step
            proc = start(_cmd(out, *longer, resume=resume))
            _wait_for_step(out, proc, max(_steps(out), default=0) + rng.randint(1, 2))
            time.sleep(rng.uniform(0.0, 0.1))
            proc.send_signal(signal.SIGKILL)
            code, _, stderr = finish(proc)
        else:  # inside this process's first checkpoint write: truncated / complete temp file, or just renamed
            kind = rng.choice(["kill-write", "kill-fsync", "kill-replace"])
            proc = run(_cmd(out, *longer, fault=f"{kind}:1", resume=resume))
            code, stderr = proc.returncode, proc.stderr
        assert code == -signal.SIGKILL, f"attempt {attempt}: exit code {code}\n{stderr[-3000:]}"
    assert max(_steps(out), default=0) < 32  # (on a loaded machine every kill may precede a checkpoint)
    proc = run(_cmd(out, *longer, resume=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not _stale(out)
    assert_same_run(reference, out, epochs=4)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_from_outside_writes_final_checkpoint_and_resumes(reference: Path, tmp_path: Path, sig: int) -> None:
    """``kill -INT`` / ``kill -TERM`` mid-training: checkpoint at the next step, exit 128+N, then --resume."""
    out = tmp_path / "run"
    proc = start(_cmd(out))
    _wait_for_step(out, proc, 3)
    proc.send_signal(sig)
    code, stdout, stderr = finish(proc)
    assert code == 128 + sig, stderr[-3000:]
    (line,) = _error_lines(stderr)
    step = _steps(out)[-1]
    assert 3 <= step < TOTAL_STEPS
    assert line.startswith(f"interrupted: stopped by {signal.Signals(sig).name} after step {step}; checkpoint ")
    proc = run(_cmd(out, resume=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference, out)


@pytest.mark.slow
def test_read_only_checkpoint_dir_fails_in_one_line_and_keeps_last_good(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run(_cmd(out, fault="erofs:3"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    ckpt_dir = out / "checkpoints"
    assert line == (
        f"error: cannot write checkpoint {ckpt_dir / 'ckpt_step000000006.pt'}: Read-only file system (EROFS); "
        f"the last good checkpoint {ckpt_dir / 'ckpt_step000000004.pt'} is kept"
    )
    assert _steps(out) == [2, 4] and not _stale(out)
    proc = run(_cmd(out, resume=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference, out)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_sigterm_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path: Path) -> None:
    """Under torchrun a SIGTERM that reaches only rank 1 stops both ranks after the same step, with a checkpoint."""
    out = tmp_path / "run"
    base = [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "run_train.py"),
        *TRAIN_ARGS, "--output-dir", str(out), "--set", "train.global_batch_size=16",
    ]
    proc = subprocess.Popen([PYTHON, *base], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, proc, 2)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    rank1 = next(pid for pid in workers if "LOCAL_RANK=1" in _environ(pid))
    subprocess.run(["kill", "-TERM", str(rank1)], check=True)
    code, stdout, stderr = finish(proc)
    assert code != 0  # torchrun reports the workers' exit code 143 as a failure
    assert stderr.count("stopped by SIGTERM after step") == 1, stderr[-3000:]  # only rank 0 prints
    step = _steps(out)[-1]
    assert f"stopped by SIGTERM after step {step};" in stderr and step < 8
    proc = run([PYTHON, *base, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and f"step {step}," in proc.stdout and "re-seeded" not in proc.stdout
    assert _steps(out)[-1] == 8  # 4 steps/epoch x 2 epochs at global batch 16


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_text().replace("\0", " ")
