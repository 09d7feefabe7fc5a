"""Starting processes from tests without flakes: gloo worker pairs and ``run_train.py`` subprocesses.

Every test that starts processes goes through these helpers, which apply the same rules:

- Rendezvous through a file in the test's own temporary directory (``FileStore``), never a TCP port picked by
  binding port 0 and closing it again (another process may take the port before the workers bind it; several
  test sessions share this machine).
- One intra-op and one inter-op thread per process, and ``OMP_NUM_THREADS=1`` for subprocesses: on a 2-core
  machine two workers with the default thread pools oversubscribe the cores many times over.
- Timeouts everywhere (process-group operations, joining the workers, subprocesses), so a hang becomes a failure
  with a message instead of a stuck test run.
- Deterministic teardown: after ``fn`` a worker waits until *every* rank has finished all its collectives (a
  handshake through the store, not through gloo), destroys the process group and leaves with ``os._exit(0)``
  without finalizing the interpreter. Once DDP has used it, a gloo process group outlives
  ``destroy_process_group`` (its threads run until the process ends), and a normal interpreter shutdown
  racing those threads occasionally killed a worker with "terminate called without an active exception"
  (SIGABRT: the flake of ``test_distributed.py``, reproduced 4 times in 60 runs on a loaded 2-core machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
RUN_TRAIN = ROOT / "run_train.py"
PYTHON = sys.executable
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _gloo_entry(rank: int, fn: Callable[..., None], world: int, rdzv: str, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    timeout = timedelta(seconds=timeout_s)
    store = dist.FileStore(rdzv, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        fn(rank, world, *args)
        # Everyone is past its last collective before anyone closes its gloo connections.
        if store.add("finished", 1) == world:
            store.set("all_finished", "1")
        store.wait(["all_finished"], timeout)
    finally:
        dist.destroy_process_group()
    # After DDP has used it, the gloo process group outlives destroy_process_group (its worker and I/O threads
    # keep running until the process ends). A normal interpreter shutdown then races those threads: one that
    # still needs the GIL while the interpreter finalizes is torn down inside C++ code, and the process dies
    # with "terminate called without an active exception" (SIGABRT). The work is done and its files are
    # closed, so leave without finalizing the interpreter.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(fn: Callable[..., None], args: Sequence[Any], tmp_dir: Path, nprocs: int = 2,
               timeout_s: float = 240.0) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` spawned processes with a gloo process group.

    ``fn`` must be a module-level function (it is pickled). ``tmp_dir`` must be a fresh directory of the calling
    test (``tmp_path``): the rendezvous file lives there. Raises if a worker fails or the job exceeds
    ``timeout_s`` (the workers are then terminated).
    """
    rdzv = Path(tmp_dir) / "gloo_rendezvous"
    if rdzv.exists():
        raise FileExistsError(f"{rdzv}: use a fresh directory per spawn_gloo call")
    saved = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update(THREAD_ENV)  # inherited by the spawned interpreters (numpy/OpenMP read it at import)
    try:
        ctx = mp.start_processes(_gloo_entry, args=(fn, nprocs, str(rdzv), timeout_s, tuple(args)),
                                 nprocs=nprocs, join=False, start_method="spawn")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + timeout_s + 60.0  # the workers' own timeouts fire first
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"spawned gloo workers did not finish within {timeout_s + 60:.0f} s")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess: this one's, single-threaded, plus ``extra``."""
    return {**os.environ, **THREAD_ENV, **extra}


def train_cmd(*args: str, python_args: Sequence[str] = ()) -> list[str]:
    """``[python, *python_args, run_train.py, *args]``."""
    return [PYTHON, *python_args, str(RUN_TRAIN), *args]


def run(cmd: Sequence[str], timeout_s: float = 300.0, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` with captured text output, the single-threaded environment and a timeout."""
    kwargs.setdefault("env", child_env())
    return subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, **kwargs)


def start(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` with the single-threaded environment; stdout/stderr captured as text."""
    kwargs.setdefault("env", child_env())
    return subprocess.Popen(list(cmd), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def finish(proc: subprocess.Popen, timeout_s: float = 300.0) -> tuple[int, str, str]:
    """Wait for ``proc`` (killing it on timeout) and return (returncode, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        raise TimeoutError(f"{proc.args} did not finish within {timeout_s} s\n{err[-3000:]}") from None
    return proc.returncode, out, err
