"""What a person watching a run sees: the start lines, a run-level progress bar, validation progress, the summary.

- Training: one ``tqdm`` bar over the whole run (all epochs, or up to ``train.max_steps``), so its ETA is the
  run's; postfix: epoch (1-based), loss, learning rate, images/s. With ``train.progress_bar: false`` (logs, CI)
  the trainer prints a line every ``train.log_every_steps`` steps instead.
- Validation: a second bar over the validation batches (removed when done), or without bars a line every
  :data:`VAL_LINE_EVERY_S` seconds.
- The end: :func:`summary_table`, a small table of the accuracies, throughput, wall time and files.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
VAL_LINE_EVERY_S = 30.0


class RunBar:
    """A tqdm bar over the run's optimizer steps (None-safe wrapper: ``enabled=False`` shows nothing)."""

    def __init__(self, total_steps: int, initial: int, epochs: int, enabled: bool) -> None:
        self.epochs = epochs
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=initial,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    @property
    def enabled(self) -> bool:
        """Whether a bar is shown."""
        return self._bar is not None

    def update(self, steps: int, *, epoch: int, loss: float, lr: float, img_s: float, data_wait: float = 0.0) -> None:
        """Advance by ``steps``; ``epoch`` is 1-based; ``data_wait`` is the fraction of time spent waiting for input."""
        if self._bar is None:
            return
        self._bar.set_description(f"train epoch {epoch}/{self.epochs}", refresh=False)
        self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{img_s:.1f}",
                              data_wait=f"{data_wait:.0%}", refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        """Remove nothing, stop updating."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def validation_progress(
    batches: Iterable[T], total: int, *, bar: bool, log: Callable[[str], None], label: str = "validate"
) -> Iterator[T]:
    """Yield ``batches`` while showing progress: a transient bar, or a line every ``VAL_LINE_EVERY_S`` seconds."""
    if bar:
        from tqdm import tqdm

        yield from tqdm(batches, total=total, desc=label, unit="batch", leave=False, dynamic_ncols=True,
                        file=sys.stderr)
        return
    t0 = last = time.perf_counter()
    for i, item in enumerate(batches):
        now = time.perf_counter()
        if now - last >= VAL_LINE_EVERY_S:
            log(f"{label}: batch {i}/{total} ({now - t0:.0f} s)")
            last = now
        yield item


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` / ``4.5 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def best_val_top1(records: Iterable[Mapping[str, Any]]) -> tuple[float, int] | None:
    """(best top-1, its step) over validation records, or None without any."""
    vals = [(float(r["top1"]), int(r["step"])) for r in records if r.get("kind") == "val" and "top1" in r]
    return max(vals, key=lambda v: v[0]) if vals else None


_ACCURACY_ROWS = (("top1", "top-1 (final)"), ("ema_top1", "top-1 EMA weights"), ("avg_top1", "top-1 averaged weights"))


def summary_table(
    final: Mapping[str, Any],
    *,
    run_dir: str | Path,
    checkpoint: str | Path | None,
    records: Iterable[Mapping[str, Any]] = (),
    tensorboard: bool = False,
) -> str:
    """The closing table of a run from its ``final_metrics.json`` content and its metrics records."""
    run_dir = Path(run_dir)
    rows: list[tuple[str, str]] = []
    steps, epochs = final.get("global_step"), final.get("epochs_completed")
    if steps is not None:
        rows.append(("steps", f"{steps} ({epochs} epochs completed)" if epochs is not None else str(steps)))
    for key, label in _ACCURACY_ROWS:
        if key in final:
            top5 = final.get(key.replace("top1", "top5"))
            rows.append((label, f"{final[key]:.2f} %" + (f"   top-5 {top5:.2f} %" if top5 is not None else "")))
    best = best_val_top1(records)
    if best is not None:
        rows.append(("top-1 (best)", f"{best[0]:.2f} % at step {best[1]}"))
    if final.get("train_img_per_s"):
        rows.append(("training throughput", f"{final['train_img_per_s']:.1f} img/s"))
    if final.get("wall_s") is not None:
        rows.append(("wall time", format_duration(float(final["wall_s"]))))
    rows.append(("run dir", str(run_dir)))
    if checkpoint is not None:
        rows.append(("checkpoint", str(checkpoint)))
    rows.append(("metrics", f"{run_dir / 'metrics.csv'} (and .jsonl), {run_dir / 'final_metrics.json'}"))
    if tensorboard:
        rows.append(("TensorBoard", f"tensorboard --logdir {run_dir / 'tb'}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["run summary"] + [f"  {k.ljust(width)}  {v}" for k, v in rows])
