"""Training metrics: top-k accuracy and a logger writing JSON lines and CSV into the run directory."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# Fixed CSV columns (train and validation rows share one file; missing values stay empty).
CSV_FIELDS = (
    "kind",
    "epoch",
    "step",
    "loss",
    "lr",
    "img_per_s",
    "top1",
    "top5",
    "ema_top1",
    "ema_top5",
    "val_loss",
    "samples",
    "time_s",
    "data_wait_s",  # seconds per optimizer step blocked on the data loader (train rows)
    "data_wait_frac",  # that time as a fraction of the logging window's wall time: input-bound when large
)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of samples whose target class is among the top-k logits, for each k (k capped at #classes)."""
    if targets.ndim > 1:  # soft targets: the argmax is the class
        targets = targets.argmax(dim=1)
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hit = top.eq(targets.view(-1, 1))
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and ``metrics.csv`` (in ``run_dir``); no-op when disabled.

    Appending (not truncating) keeps the history of a run that was resumed.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.csv_path = self.run_dir / "metrics.csv"
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._csv_header()

    def _csv_header(self) -> None:
        if not self.csv_path.exists() or self.csv_path.stat().st_size == 0:
            with self.csv_path.open("w", newline="") as f:
                csv.writer(f).writerow(CSV_FIELDS)

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one record (a flat mapping; keys outside CSV_FIELDS go to the JSON line only)."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        with self.csv_path.open("a", newline="") as f:
            csv.writer(f).writerow(["" if clean.get(k) is None else clean[k] for k in CSV_FIELDS])

    def offsets(self) -> dict[str, int]:
        """Current sizes of the two files (stored in a checkpoint: what had been logged when it was written)."""
        if not self.enabled:
            return {}
        return {p.name: p.stat().st_size if p.exists() else 0 for p in (self.jsonl_path, self.csv_path)}

    def truncate(self, offsets: Mapping[str, int]) -> None:
        """Drop what was logged after ``offsets`` (a resumed run logs those steps again; no duplicate rows).

        Also removes a half-written last line of a process that was killed while logging.
        """
        if not self.enabled:
            return
        for p in (self.jsonl_path, self.csv_path):
            size = offsets.get(p.name)
            if size is not None and p.exists() and p.stat().st_size > size:
                os.truncate(p, size)
        self._csv_header()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
