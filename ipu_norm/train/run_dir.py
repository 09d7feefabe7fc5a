"""One run per output directory: refuse to start a new run on top of another, and to resume someone else's run.

A run directory (``train.output_dir``) holds ``run.json`` (the run id), ``config.yaml``, ``metrics.jsonl/csv``,
``checkpoints/``, ``tb/`` and ``final_metrics.json``. Rules:

- A new run (no ``--resume``) in a directory that already holds a run stops with one line naming it and the
  choices: ``--resume`` (continue it), another ``--output-dir``, or ``--overwrite`` (the old run is renamed to
  ``<dir>.old-<date>-<time>`` beside it, nothing is deleted).
- Every checkpoint carries the run id. ``--resume`` refuses a checkpoint of another run than the one in the output
  directory, and a checkpoint whose run had a different config (apart from the keys in :data:`RESUME_MAY_CHANGE`:
  epochs, step cap, logging, workers, paths), unless ``--resume-any`` is given.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_INFO = "run.json"
# Files and folders whose presence means "this directory holds a run".
RUN_MARKERS = (RUN_INFO, "config.yaml", "metrics.jsonl", "final_metrics.json", "checkpoints")

# Config keys (dotted; a trailing '.' = the whole section) that may differ between a checkpoint's run and the run
# that resumes it: they change how the run is watched, capped, stored or fed, not what it computes - and
# train.epochs, so that a finished run can be extended (its schedule then spans the new length).
RESUME_MAY_CHANGE = (
    "train.max_steps",
    "train.epochs",
    "train.output_dir",
    "train.progress_bar",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.max_nonfinite_steps",
    "train.val_every_epochs",
    "train.tensorboard",
    "train.wandb",
    "train.wandb_project",
    "data.root",
    "data.num_workers",
    "data.worker_start_method",
    "data.val_batch_size",
    "execution.executable_cache_dir",
    "execution.memory_check",
    "execution.compile",
    "finetune.",
)


class RunDirError(ValueError):
    """The output directory or the checkpoint does not fit the requested start (new run / resume)."""


def existing_run(run_dir: str | Path) -> str | None:
    """The first sign that ``run_dir`` holds a run (a file or folder name), or None (absent or no run in it)."""
    run_dir = Path(run_dir)
    for name in RUN_MARKERS:
        p = run_dir / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            return name
    return None


def check_new_run(run_dir: str | Path, *, overwrite: bool) -> bool:
    """For a run started without ``--resume``: True when an old run must be moved aside, error when it may not."""
    found = existing_run(run_dir)
    if found is None:
        return False
    if not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run ({found}); continue it with --resume, start a new run with another "
            "--output-dir, or pass --overwrite to move the old run aside"
        )
    return True


def move_aside(run_dir: str | Path) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.old-<YYYYmmdd-HHMMSS>`` (a free name) and return the new path."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    os.replace(run_dir, dest)
    return dest


def new_run_id() -> str:
    """A fresh run id: start time and a random suffix (unique across machines)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def read_run_id(run_dir: str | Path) -> str | None:
    """The run id recorded in ``run_dir/run.json`` (None when absent or unreadable)."""
    try:
        return json.loads((Path(run_dir) / RUN_INFO).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def write_run_info(run_dir: str | Path, run_id: str) -> None:
    """Record the run id in ``run_dir/run.json`` (kept when it already names this run)."""
    path = Path(run_dir) / RUN_INFO
    if read_run_id(run_dir) == run_id:
        return
    path.write_text(json.dumps({"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and "." not in prefix:  # sections only (model.kwargs stays whole)
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _may_change(dotted: str) -> bool:
    return any(dotted == k or (k.endswith(".") and dotted.startswith(k)) for k in RESUME_MAY_CHANGE)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: saved -> current`` for each config key (present in both) that differs and may not change on resume."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k] and not _may_change(k)]


def check_resume(
    state: Mapping[str, Any],
    path: str | Path,
    *,
    run_dir: str | Path,
    config: Mapping[str, Any],
    resume_any: bool,
) -> str:
    """Check that checkpoint ``state`` (from ``path``) continues the run of ``run_dir`` with ``config``; its run id.

    Raises :class:`RunDirError` for a checkpoint of another run or another config unless ``resume_any``.
    """
    ckpt_run, dir_run = state.get("run_id"), read_run_id(run_dir)
    if not resume_any:
        if ckpt_run and dir_run and ckpt_run != dir_run:
            raise RunDirError(
                f"--resume {path}: the checkpoint belongs to run {ckpt_run} but {run_dir} holds run {dir_run}; "
                "use that run's directory as --output-dir, or pass --resume-any to continue it here anyway"
            )
        diffs = config_differences(state.get("config") or {}, config)
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; ... ({len(diffs)} keys)" if len(diffs) > 4 else "")
            raise RunDirError(
                f"--resume {path}: the checkpoint's run had another config ({shown}); resume with the run's config "
                f"({Path(run_dir) / 'config.yaml'}), or pass --resume-any to continue with this one"
            )
    return dir_run or ckpt_run or new_run_id()
