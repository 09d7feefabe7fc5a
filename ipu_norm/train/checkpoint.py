"""Checkpoints: atomic writes, keep-last-K, finding the latest good one, and RNG state capture/restore.

A checkpoint holds only tensors and primitive containers so that it loads with
``torch.load(weights_only=True)`` (no arbitrary code runs when a checkpoint is read):
model / optimizer / scheduler / EMA / backend (GradScaler) state dicts, every rank's RNG states (python,
numpy, torch, cuda), the data position (epoch, micro-batches consumed in the epoch, optimizer step) and the
resolved config as a plain dict.

Writes are atomic: the file is written to a temporary name in the same directory, flushed and fsync'ed,
then ``os.replace``'d onto its final name (and the directory fsync'ed), so a crash leaves either the old
set of checkpoints or the new one, never a half-written file under a checkpoint name. The temporary file of a
write that was killed (SIGKILL, power loss) is removed by the next successful write.

A write that fails (disk full, read-only or missing directory) raises one ``CheckpointError`` naming the path
and the OS error; the temporary file is removed and the checkpoints already there stay as they were (older
ones are only pruned after the new one is in place).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipu_norm.data.seeding import numpy_state_from_dict, numpy_state_to_dict

# 2: Mixup/CutMix state is timm's Mixup's private NumPy RNG (format 1: a torch.Generator of the former mixer).
CHECKPOINT_FORMAT = 2
_NAME_RE = re.compile(r"^ckpt_step(\d+)\.pt$")
REQUIRED_KEYS = ("format", "model", "optimizer", "progress")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, lacks required entries, or cannot be written."""


class CheckpointFormatError(CheckpointError):
    """A sound checkpoint of a format this version cannot resume (never skipped as if it were corrupt)."""


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint written after optimizer step ``step``."""
    return f"ckpt_step{step:09d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest (lowest step) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not all platforms allow opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: torch.save reports a failed ``write()`` as a RuntimeError whose context it is."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(err: OSError) -> str:
    code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    return f"{err.strerror or err}" + (f" ({code})" if code else "")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then ``os.replace`` onto ``path``.

    Raises ``CheckpointError`` (one line: the path and the OS error) when the file cannot be written; ``path``
    itself is then untouched.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        err = _os_error(exc) if isinstance(exc, Exception) else None
        if err is None:
            raise
        raise CheckpointError(f"cannot write checkpoint {path}: {_describe(err)}") from exc
    _fsync_dir(path.parent)
    return path


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step`` and delete all but the newest ``keep``.

    On a write error the ``CheckpointError`` also names the newest checkpoint already in ``directory`` (kept).
    """
    state = {"format": CHECKPOINT_FORMAT, **state}
    directory = Path(directory)
    try:
        path = atomic_torch_save(state, directory / checkpoint_name(step))
    except CheckpointError as exc:
        previous = list_checkpoints(directory)
        kept = f"the last good checkpoint {previous[-1]} is kept" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"{exc}; {kept}") from exc.__cause__
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    for stale in directory.glob(".ckpt_step*.pt.*.tmp"):  # left by a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    return path


def _upgrade(path: Path, state: dict[str, Any], resume: bool) -> dict[str, Any]:
    """Read an older format as the current one, or raise one line saying why it cannot be resumed."""
    if state["format"] == 1:
        has_mixup = any(r.get("mixup") is not None for r in state.get("rank_states") or [] if isinstance(r, dict))
        if resume and has_mixup:
            raise CheckpointFormatError(
                f"{path}: checkpoint format 1 holds the Mixup/CutMix RNG of the former mixer, which this version "
                f"(format {CHECKPOINT_FORMAT}, timm's Mixup) cannot continue: resume it with the version that "
                "wrote it, or fine-tune from it (its weights load)"
            )
        return {**state, "format": CHECKPOINT_FORMAT}  # otherwise format 1 and 2 hold the same entries
    raise CheckpointFormatError(
        f"{path}: checkpoint format {state['format']} (this version reads {CHECKPOINT_FORMAT})"
    )


def load_checkpoint(path: str | Path, *, resume: bool = True) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` on CPU; raises ``CheckpointError`` if unreadable/incomplete.

    ``resume=False`` (fine-tuning, evaluation: only the weights are used) also reads older formats whose training
    state this version cannot continue.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # truncated zip, bad pickle, disallowed global ...: all mean "not usable"
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (top level is {type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    if state["format"] != CHECKPOINT_FORMAT:
        state = _upgrade(path, state, resume)
    return state


def load_latest_good(
    directory: str | Path, report: Callable[[str], None] = print, *, resume: bool = True
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads (``resume`` as in :func:`load_checkpoint`); corrupt or
    truncated ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, resume=resume)
        except CheckpointFormatError:
            raise  # a sound checkpoint: falling back to an older one (or to none) would silently lose progress
        except CheckpointError as exc:
            report(f"WARNING: skipping bad checkpoint: {exc}; trying the previous one")
    return None


# ----------------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA RNG states as tensors / primitive containers."""
    version, py_state, gauss = random.getstate()
    return {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": numpy_state_to_dict(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state(numpy_state_from_dict(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
