"""Checkpoint weight averaging after training: Graphcore's ``weight_avg_strategy`` (their EfficientNet recipe).

Graphcore's application (graphcore/examples ``vision/cnns/pytorch/train/weight_avg.py``, called at the end of
training by ``train/train.py:528-532``) does not keep a per-step EMA. After training it averages the model weights
of the checkpoints it saved (one per epoch, all kept):

- which checkpoints: every saved one, oldest first (sorted by the number in the file name, ``weight_avg.py:27-39``);
  with ``--weight-avg-N N`` and ``0 < N <= count`` only the last N (``weight_avg.py:42-43``), otherwise all;
- init: the first selected checkpoint (``AveragedModel(model)`` of it, ``weight_avg.py:46-47``; the loop then
  visits every selected checkpoint, the first one included, and ``AveragedModel.update_parameters`` copies on its
  first call, so the first one counts once);
- ``exponential``: ``avg = decay * avg + (1 - decay) * ckpt`` for each later checkpoint (``weight_avg.py:78-84``);
  ``mean``: the arithmetic mean (``AveragedModel``'s default running mean);
- arithmetic in float64 (``model.double()``, ``weight_avg.py:22``);
- saved as a new checkpoint next to the others (``<model>_<data>_<epoch>_averaged.pt``), which the fine-tuning
  stage of the half-resolution recipe starts from (``train.py:452-457``).

Here: the checkpoints are this run's ``ckpt_step*.pt`` files (``train.checkpoint_every_steps`` decides how often,
default every epoch as Graphcore; only ``train.keep_checkpoints`` of them stay on disk, so "all" means all kept);
the average is written as ``averaged_step<step>.pt`` (the last checkpoint with its model weights replaced, the
EMA removed, and a ``weight_avg`` record of what was averaged) and evaluated once (metrics ``avg_top1`` ...).
One deliberate difference: floating-point buffers (BatchNorm running statistics) are averaged like the
parameters; Graphcore's ``AveragedModel`` (``use_buffers=False``) keeps the first checkpoint's buffers, which
for a BatchNorm model would pair averaged weights with statistics of the oldest ones. Integer buffers
(``num_batches_tracked``) come from the newest checkpoint. Averaged tensors are cast back to their saved dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ipu_norm.train.checkpoint import CheckpointError, atomic_torch_save, list_checkpoints, load_checkpoint

STRATEGIES = ("none", "mean", "exponential")


def select_checkpoints(directory: str | Path, last_n: int | None) -> list[Path]:
    """The checkpoints to average, oldest first: the last ``last_n`` of ``directory`` (all when None or more)."""
    found = list_checkpoints(directory)
    if last_n is not None and 0 < last_n <= len(found):
        found = found[-last_n:]
    return found


def average_state_dicts(
    states: Sequence[dict[str, torch.Tensor]], strategy: str, decay: float = 0.97
) -> dict[str, torch.Tensor]:
    """Average model state dicts given oldest first (module docstring: init, rules, buffers, dtypes).

    Args:
        states: model state dicts with the same keys, oldest first.
        strategy: 'mean' or 'exponential'.
        decay: exponential only: ``avg = decay * avg + (1 - decay) * state`` for each state after the first.
    """
    if strategy not in ("mean", "exponential"):
        raise ValueError(f"weight averaging strategy must be 'mean' or 'exponential', got {strategy!r}")
    if not states:
        raise ValueError("weight averaging needs at least one checkpoint")
    if strategy == "exponential" and not 0.0 < decay < 1.0:
        raise ValueError(f"weight averaging decay must be in (0, 1), got {decay}")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys:
            diff = sorted(set(s) ^ set(keys))
            raise ValueError(f"checkpoint {i} has other model entries than the first ({diff[:3]} ...)")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][key]
        if not first.is_floating_point():
            out[key] = states[-1][key].clone()
            continue
        avg = first.detach().to(torch.float64).clone()
        for n, s in enumerate(states[1:], 1):
            x = s[key].detach().to(torch.float64)
            if strategy == "exponential":
                avg.mul_(decay).add_(x, alpha=1.0 - decay)
            else:  # running mean over n + 1 states, as AveragedModel's default
                avg.add_(x - avg, alpha=1.0 / (n + 1))
        out[key] = avg.to(first.dtype)
    return out


def averaged_checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the average ending at checkpoint ``step`` is saved (not a ``ckpt_step*`` name: never resumed/pruned)."""
    return Path(directory) / f"averaged_step{step:09d}.pt"


def average_checkpoints(
    directory: str | Path,
    strategy: str,
    *,
    decay: float = 0.97,
    last_n: int | None = None,
    save: bool = True,
) -> tuple[dict[str, torch.Tensor], Path, dict[str, Any]]:
    """Average the model weights of the checkpoints in ``directory``; returns (weights, path, record).

    ``path`` is where the averaged checkpoint is (or would be) written; ``record`` says what was averaged.
    With ``save`` the averaged checkpoint is written atomically (call it on one process only).
    """
    paths = select_checkpoints(directory, last_n)
    if not paths:
        raise CheckpointError(f"weight averaging: no checkpoint in {directory}")
    loaded = [load_checkpoint(p) for p in paths]
    weights = average_state_dicts([s["model"] for s in loaded], strategy, decay)
    last = loaded[-1]
    record = {
        "strategy": strategy,
        "decay": decay if strategy == "exponential" else None,
        "checkpoints": [p.name for p in paths],
        "steps": [int(s["progress"]["global_step"]) for s in loaded],
    }
    path = averaged_checkpoint_path(directory, record["steps"][-1])
    if save:
        atomic_torch_save({**last, "model": weights, "ema": None, "weight_avg": record}, path)
    return weights, path, record


def find_averaged(checkpoint: str | Path) -> Path | None:
    """The averaged checkpoint written from the run whose newest checkpoint is ``checkpoint``, if there is one."""
    ckpt = Path(checkpoint)
    step = ckpt.name.removeprefix("ckpt_step").removesuffix(".pt")
    if not step.isdigit():
        return None
    avg = averaged_checkpoint_path(ckpt.parent, int(step))
    return avg if avg.is_file() else None


def describe(record: dict[str, Any], report: Callable[[str], None]) -> None:
    """One log line about an averaging ``record``."""
    rule = f"exponential, decay {record['decay']}" if record["strategy"] == "exponential" else "mean"
    steps = record["steps"]
    report(f"weight averaging ({rule}) over {len(steps)} checkpoint(s), steps {steps[0]}..{steps[-1]}")
