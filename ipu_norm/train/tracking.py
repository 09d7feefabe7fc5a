"""Experiment tracking: TensorBoard event files in the run directory (default) and, optionally, Weights & Biases.

Every metrics record the trainer logs (``kind`` train or val) goes to ``metrics.jsonl/csv`` and also here: each
numeric value except the bookkeeping keys (epoch, step, samples, time) becomes a scalar ``<kind>/<key>`` at the
record's optimizer step, e.g. ``train/loss``, ``train/lr``, ``train/img_per_s``, ``train/loss_scale``,
``val/top1``, ``val/ema_top5``. TensorBoard: ``tensorboard --logdir <run dir>/tb``. W&B (``train.wandb`` /
``--wandb``) needs the ``wandb`` package (not a requirement of this project); its files go to ``<run dir>/wandb``,
and ``WANDB_MODE=offline`` keeps them local. Both are created at the first record, so a run refused at start-up
leaves no files; only rank 0 writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

TB_SUBDIR = "tb"
_NOT_SCALARS = frozenset({"kind", "epoch", "step", "samples", "time_s", "unix_time"})


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The ``<kind>/<key>`` scalars of one metrics record (finite numbers only)."""
    kind = record.get("kind", "train")
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


class Tracker:
    """Sends metrics records to TensorBoard and/or W&B (no-op when ``enabled`` is False or both are off)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "ipu_norm",
        run_id: str | None = None,
        config: Mapping[str, Any] | None = None,
        purge_step: int | None = None,
        enabled: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.use_tb, self.use_wandb = enabled and tensorboard, enabled and wandb
        self.wandb_project, self.run_id, self.config = wandb_project, run_id, dict(config or {})
        self.purge_step = purge_step  # resumed: TensorBoard hides the earlier events after this step
        self._log = log
        self._tb: Any = None
        self._wandb_run: Any = None

    @property
    def tb_dir(self) -> Path:
        """Where the TensorBoard event files go."""
        return self.run_dir / TB_SUBDIR

    def _open(self) -> None:
        if self.use_tb and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._log("NOTE: the tensorboard package is not installed: no TensorBoard logs (pip install it)")
                self.use_tb = False
            else:
                # Written by its own thread, flushed every 10 s and at close (not per record: the step loop
                # does not wait for the disk).
                self._tb = SummaryWriter(log_dir=str(self.tb_dir), purge_step=self.purge_step, flush_secs=10)
        if self.use_wandb and self._wandb_run is None:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("train.wandb / --wandb needs the wandb package: pip install wandb") from None
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._wandb_run = wandb.init(
                project=self.wandb_project,
                id=self.run_id,
                name=self.run_dir.name,
                resume="allow",
                dir=str(self.run_dir),
                config=self.config,
            )

    def log(self, record: Mapping[str, Any]) -> None:
        """Send one metrics record (at its ``step``)."""
        if not (self.use_tb or self.use_wandb):
            return
        self._open()
        step = int(record.get("step", 0))
        values = scalars_of(record)
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        """Flush and close the writers."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
