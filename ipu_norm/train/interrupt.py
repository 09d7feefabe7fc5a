"""Graceful stop on SIGINT / SIGTERM: finish the current optimizer step, write a checkpoint, exit.

``StopRequest`` turns the first SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler's pre-emption) into a flag that
the training loop reads at each step boundary; the loop then writes a checkpoint and raises ``TrainingInterrupted``,
which ``run_train.py`` reports in one line and turns into the exit code ``128 + signal`` (130 for SIGINT, 143 for
SIGTERM: what a shell reports for a process stopped by that signal, so wrappers and schedulers see "did not
finish"). ``--resume`` then continues bit for bit on CPU. A second signal of the same kind gets the default
behaviour (KeyboardInterrupt / termination) for a user who does not want to wait.

Under torchrun every rank calls ``should_stop`` at every step boundary; the flag is all-reduced, so all ranks stop
after the same step and write the checkpoint together even if only one of them got the signal.
"""

from __future__ import annotations

import signal
import threading
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

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
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
