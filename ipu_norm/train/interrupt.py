"""Graceful stop on SIGINT / SIGTERM: finish the current optimizer step, write a checkpoint, exit.

``StopRequest`` turns the first SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler's pre-emption) into a flag that
the training loop reads at each step boundary; the loop then writes a checkpoint and raises ``TrainingInterrupted``,
which ``run_train.py`` reports in one line and turns into the exit code ``128 + signal`` (130 for SIGINT, 143 for
SIGTERM: what a shell reports for a process stopped by that signal, so wrappers and schedulers see "did not
finish"). ``--resume`` then continues bit for bit on CPU. A second signal of the same kind gets the default
behaviour (KeyboardInterrupt / termination) for a user who does not want to wait.

Under torchrun every rank calls ``should_stop`` at every step boundary; the flag is all-reduced, so all ranks stop
after the same step and write the checkpoint together even if only one of them got the signal. torchrun forwards the
signal it gets to its workers, so a signal to the process group reaches each rank twice: under a launcher
(``TORCHELASTIC_RUN_ID`` set) a repeated signal does not escalate (the launcher itself kills its workers after its
shutdown timeout).

A signal to the whole process group (``timeout``, SLURM's ``scancel``, Kubernetes, Ctrl-C in a terminal) also reaches
the DataLoader's worker processes. They must not die of it (the main process would fail with "DataLoader worker is
killed by signal"): the trainer starts them inside :func:`starting_workers` and gives them
:func:`worker_ignores_stop_signals` as ``worker_init_fn`` (:func:`shield_loader_workers`), for the fork, spawn and
forkserver start methods alike. They end when the main process shuts them down (or exits).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from ipu_norm.train.distributed import DistInfo, all_reduce_sum

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing ``checkpoint`` at optimizer step ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, is_main: bool = True) -> None:
        self.signum, self.step, self.checkpoint, self.is_main = signum, step, checkpoint, is_main
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "checkpoint written by rank 0"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; {where}; continue with --resume"
        )

    @property
    def exit_code(self) -> int:
        """The shell convention for "terminated by signal N": 128 + N."""
        return 128 + self.signum


class StopRequest:
    """Records the first SIGINT/SIGTERM between ``install()`` and ``uninstall()`` (main thread only)."""

    def __init__(self, escalate: bool | None = None) -> None:
        """``escalate``: a second signal of the same kind gets the default behaviour; default: not under torchrun."""
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self.escalate = launched_by_agent() is False if escalate is None else escalate

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if self.escalate:
            # A second signal of the same kind acts as if we were not there (Ctrl-C twice = KeyboardInterrupt now).
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)

    def install(self) -> None:
        """Handle SIGINT/SIGTERM from now on (until ``uninstall``); a no-op outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; keep the default behaviour
        for s in HANDLED_SIGNALS:
            self._previous.setdefault(s, signal.getsignal(s))
            signal.signal(s, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers that were active before ``install``."""
        while self._previous:
            s, handler = self._previous.popitem()
            if handler is not None:  # None: a handler not installed from Python, which cannot be restored
                signal.signal(s, handler)

    def should_stop(self, dist: DistInfo) -> bool:
        """True when this process (or, under torchrun, any rank) got a signal. Collective when distributed."""
        if not dist.enabled:
            return self.signum is not None
        # Agree on the step: every rank stops after the same step, and learns the signal for the exit code.
        got_int, got_term = all_reduce_sum(
            [float(self.signum == signal.SIGINT), float(self.signum == signal.SIGTERM)], dist
        )
        if self.signum is None and (got_int or got_term):
            self.signum = int(signal.SIGTERM if got_term else signal.SIGINT)
        # Decide on the reduced values only: a signal that lands on this rank after it contributed its flag is
        # counted at the next step, by every rank alike (deciding on self.signum here could split the ranks).
        return bool(got_int or got_term)


def launched_by_agent() -> bool:
    """Whether torchrun (torch.distributed.elastic) started this process: it forwards the signals it gets."""
    return "TORCHELASTIC_RUN_ID" in os.environ


@contextlib.contextmanager
def starting_workers() -> Iterator[None]:
    """Start DataLoader worker processes inside this block: they will not die of a signal to the process group.

    For the block, SIGINT/SIGTERM are blocked and ignored in the main thread. Children inherit both through
    ``fork`` (the blocked mask and the ignored disposition), ``exec`` (the ignored disposition: spawn) and the
    forkserver (started in the block on first use, it passes both on). The workers then keep ignoring them:
    :func:`worker_ignores_stop_signals` is their ``worker_init_fn`` (PyTorch's worker loop installs its own SIGTERM
    handler before calling it). Afterwards the main process's handlers and mask are restored; a signal that arrived
    meanwhile stays pending (Linux never discards a blocked signal) and is delivered then. A no-op outside the main
    thread and where ``signal.pthread_sigmask`` does not exist (Windows).
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    previous = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    try:
        for s in HANDLED_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def worker_ignores_stop_signals(worker_id: int, then: Callable[[int], None] | None = None) -> None:
    """A DataLoader ``worker_init_fn``: ignore SIGINT/SIGTERM (the main process decides), then call ``then``."""
    for s in HANDLED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def shield_loader_workers(loader: Any) -> None:
    """Make ``loader``'s workers ignore SIGINT/SIGTERM (wraps its ``worker_init_fn``; picklable for spawn)."""
    init = loader.worker_init_fn
    if not (isinstance(init, functools.partial) and init.func is worker_ignores_stop_signals):
        loader.worker_init_fn = functools.partial(worker_ignores_stop_signals, then=init)
