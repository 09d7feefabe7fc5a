"""A signal to the whole process group (what ``timeout``, SLURM's ``scancel`` and Kubernetes send; Ctrl-C in a
terminal) stops a run with DataLoader workers cleanly: a final checkpoint, one line, exit 143 (SIGTERM) or 130
(SIGINT), no worker left behind; for each worker start method and under torchrun.

The runs are real ``run_train.py`` subprocesses in their own session (``start_new_session``); the test waits for
a "step N" line on their output before it signals, so the signal lands during training, never during start-up.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procs import ROOT, child_env, train_cmd

from ipu_norm.train.checkpoint import list_checkpoints, load_checkpoint

TINY = str(ROOT / "configs" / "tiny_resnet18_gn.yml")
# 4096 generated samples: 512 steps in the epoch, so the signal arrives mid-epoch, far from its end.
LONG_RUN = ("--num-workers", "2", "--set", "data.generated_samples=4096", "--set", "train.epochs=1")
STEP_LINE = re.compile(r"step (\d+)/")


class _Lines:
    """The merged stdout/stderr of a process, line by line, read by a thread (so waiting can time out)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self._q = proc, [], queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, pattern: re.Pattern, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                msg = f"no line matching {pattern.pattern!r} within {timeout_s} s:\n"
                raise TimeoutError(msg + self.text()) from None
            if line is None:
                raise AssertionError(f"process ended before a line matching {pattern.pattern!r}:\n" + self.text())
            self.lines.append(line)
            m = pattern.search(line)
            if m:
                return m

    def rest(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                return self.text()
            self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines)


def _start(cmd: list[str]) -> tuple[subprocess.Popen, _Lines]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env(), start_new_session=True)
    return proc, _Lines(proc)


def _group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _signal_run(cmd: list[str], sig: int, *, after_step: int = 2, timeout_s: float = 240.0) -> tuple[int, str]:
    """Start ``cmd`` in a new session, wait for its step ``after_step`` line, signal the group; (rc, output)."""
    proc, out = _start(cmd)
    try:
        while int(out.wait_for(STEP_LINE, timeout_s).group(1)) < after_step:
            pass
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=timeout_s)
        text = out.rest(30)
        assert _group_gone(proc.pid, 30), "processes of the run's group are still alive after it exited"
        return rc, text
    finally:
        _kill_group(proc.pid)


def _check_clean_stop(text: str, out: Path, after_step: int) -> int:
    assert "Traceback" not in text and "DataLoader worker" not in text, text[-3000:]
    interrupted = [line for line in text.splitlines() if line.startswith("interrupted:")]
    assert len(interrupted) == 1, text[-3000:]
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts, text[-3000:]
    step = load_checkpoint(ckpts[-1])["progress"]["global_step"]
    assert step >= after_step and f"after step {step};" in interrupted[0]
    return step


@pytest.mark.parametrize(
    ("method", "sig"),
    [
        ("fork", signal.SIGTERM),
        ("forkserver", signal.SIGINT),
        # Spawned workers import torch afresh (tens of seconds on a loaded 2-core machine): in the slow set.
        pytest.param("spawn", signal.SIGTERM, marks=pytest.mark.slow),
        pytest.param("fork", signal.SIGINT, marks=pytest.mark.slow),
    ],
)
def test_group_signal_stops_cleanly(tmp_path: Path, method: str, sig: int) -> None:
    out = tmp_path / "run"
    rc, text = _signal_run(
        train_cmd("--config", TINY, *LONG_RUN, "--worker-start-method", method, "--output-dir", str(out)), sig
    )
    assert rc == 128 + sig, text[-3000:]
    step = _check_clean_stop(text, out, 2)
    if method == "fork" and sig == signal.SIGTERM:
        # The checkpoint continues: --resume runs on from it (here capped one step later).
        res = subprocess.run(
            train_cmd("--config", TINY, *LONG_RUN, "--output-dir", str(out), "--resume", "--max-steps", str(step + 1)),
            cwd=ROOT, capture_output=True, text=True, env=child_env(), timeout=240,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"resumed from {out / 'checkpoints'}" in res.stdout
        assert re.search(rf"^  steps +{step + 1} ", res.stdout, re.M), res.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not found")
def test_group_sigterm_under_torchrun(tmp_path: Path) -> None:
    """torchrun forwards the SIGTERM it gets: each rank sees it twice and still stops after a checkpoint."""
    out = tmp_path / "run"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "run_train.py"), "--config", TINY, *LONG_RUN,
           "--output-dir", str(out)]
    rc, text = _signal_run(cmd, signal.SIGTERM)
    # torchrun itself ends with its own traceback (SignalException) and exit code 1; the ranks stop cleanly.
    assert rc != 0 and text.rstrip().endswith("got signal: 15"), text[-3000:]
    assert "ipu_norm" not in "".join(line for line in text.splitlines() if line.lstrip().startswith('File "'))
    launcher_tb = text.index("Traceback")
    step = _check_clean_stop(text[:launcher_tb], out, 2)  # one "interrupted:" line (rank 0), a checkpoint
    assert "interrupted:" not in text[launcher_tb:]
    assert step >= 2
