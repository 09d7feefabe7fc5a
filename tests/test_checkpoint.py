"""Checkpoints: atomic writes, keep-last-K, corrupt-file fallback, RNG round trip, and bitwise resume."""

from __future__ import annotations

import errno
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ipu_norm.config import load_config
from ipu_norm.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    load_latest_good,
    restore_rng_state,
    save_checkpoint,
)
from ipu_norm.train.distributed import DistInfo
from ipu_norm.train.interrupt import StopRequest, TrainingInterrupted
from ipu_norm.train.metrics import read_jsonl
from ipu_norm.train.trainer import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "progress": {"global_step": step}}


def test_save_is_atomic_and_keeps_last_k(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(_state(step), tmp_path, step, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt_step000000004.pt", "ckpt_step000000005.pt"]
    # No temporary files are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    state = load_checkpoint(tmp_path / names[-1])
    assert torch.equal(state["model"]["w"], torch.full((3,), 5.0))


def test_truncated_latest_falls_back_to_previous(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(_state(step), tmp_path, step, keep=5)
    newest = list_checkpoints(tmp_path)[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # simulate a crash mid-write of a non-atomic copy
    reports: list[str] = []
    found = load_latest_good(tmp_path, report=reports.append)
    assert found is not None
    path, state = found
    assert path.name == "ckpt_step000000002.pt" and state["progress"]["global_step"] == 2
    assert len(reports) == 1 and newest.name in reports[0]
    with pytest.raises(CheckpointError):
        load_checkpoint(newest)


def test_incomplete_checkpoint_is_rejected(tmp_path: Path) -> None:
    torch.save({"format": 1, "model": {}}, tmp_path / "ckpt_step000000001.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "ckpt_step000000001.pt")
    assert load_latest_good(tmp_path, report=lambda _: None) is None


def test_rng_state_round_trip_through_weights_only_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint({**_state(1), "rng": capture_rng_state()}, tmp_path, 1, keep=1)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(list_checkpoints(tmp_path)[0])["rng"])  # weights_only=True load
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[0] == got[0] and expected[1] == got[1] and torch.equal(expected[2], got[2])


def _tiny_cfg(out: Path, **flags):
    # Tiny ResNet-18 (GN) on generated data; mixup + cutmix + label smoothing + EMA on, shuffling on,
    # 2 epochs x 8 steps, gradient accumulation 2.
    return load_config(
        CONFIGS / "tiny_resnet18_gn.yml",
        flags={"train.output_dir": str(out), **flags},
    )


def _final_state(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


def test_resume_mid_epoch_is_bitwise_identical(tmp_path: Path) -> None:
    """A run stopped after k steps and resumed equals an uninterrupted run (weights, EMA, optimizer)."""
    full = train(_tiny_cfg(tmp_path / "full"), log=lambda _: None)
    assert full.global_step == 16
    part_dir = tmp_path / "part"
    first = train(_tiny_cfg(part_dir, **{"train.max_steps": 5}), log=lambda _: None)  # mid-epoch 0
    assert first.global_step == 5
    resumed = train(_tiny_cfg(part_dir), resume="latest", log=lambda _: None)
    assert resumed.global_step == 16
    a, b = _final_state(tmp_path / "full"), _final_state(part_dir)
    assert a["progress"] == b["progress"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])
    # The training actually moved the weights (the comparison is not between two initial models).
    init = train(_tiny_cfg(tmp_path / "init", **{"train.max_steps": 1}), log=lambda _: None)
    assert init.global_step == 1
    c = _final_state(tmp_path / "init")
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_resume_at_epoch_boundary_and_from_explicit_path(tmp_path: Path) -> None:
    full = train(_tiny_cfg(tmp_path / "full", **{"train.epochs": 2}), log=lambda _: None)
    part_dir = tmp_path / "part"
    train(_tiny_cfg(part_dir, **{"train.max_steps": 8}), log=lambda _: None)  # exactly one epoch
    ckpt = list_checkpoints(part_dir / "checkpoints")[-1]
    assert load_checkpoint(ckpt)["progress"] == {
        "global_step": 8,
        "epoch": 1,
        "batch_in_epoch": 0,
        "samples_seen": 64,
    }
    train(_tiny_cfg(part_dir), resume=str(ckpt), log=lambda _: None)
    a, b = _final_state(full.run_dir), _final_state(part_dir)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # A run directory works too (its newest good checkpoint), written into a new output dir.
    messages: list[str] = []
    other = train(_tiny_cfg(tmp_path / "other", **{"train.epochs": 3}), resume=str(part_dir), log=messages.append)
    assert any("resumed from" in m and "ckpt_step000000016" in m for m in messages) and other.global_step == 24
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        train(_tiny_cfg(tmp_path / "x"), resume=str(tmp_path / "empty"), log=lambda _: None)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train(_tiny_cfg(tmp_path / "x"), resume=str(tmp_path / "missing.pt"), log=lambda _: None)


def test_resume_latest_skips_truncated_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = _tiny_cfg(run, **{"train.max_steps": 6, "train.checkpoint_every_steps": 3, "train.epochs": 1})
    train(cfg, log=lambda _: None)
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["ckpt_step000000003.pt", "ckpt_step000000006.pt"]
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[:1000])
    messages: list[str] = []
    result = train(_tiny_cfg(run, **{"train.epochs": 1}), resume="latest", log=messages.append)
    assert any("skipping bad checkpoint" in m and "ckpt_step000000006" in m for m in messages)
    assert any("resumed from" in m and "ckpt_step000000003" in m for m in messages)
    assert result.global_step == 8


# ------------------------------------------------------------------------------------- write errors, signals


def _faulty_fdopen(real, err: int):  # noqa: ANN001, ANN202
    """os.fdopen whose files fail every write with OSError(err), as a full disk does."""

    class Faulty:
        def __init__(self, f) -> None:  # noqa: ANN001
            self._f = f

        def write(self, data) -> int:  # noqa: ANN001
            raise OSError(err, os.strerror(err))

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self._f, name)

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc) -> None:  # noqa: ANN002
            self._f.close()

    return lambda fd, *a, **k: Faulty(real(fd, *a, **k))


@pytest.mark.parametrize("where", ["mkstemp", "write", "fsync", "replace"])
def test_write_error_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch, where: str) -> None:
    for step in (1, 2):
        save_checkpoint(_state(step), tmp_path, step, keep=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    err = {"mkstemp": errno.EROFS, "write": errno.ENOSPC, "fsync": errno.EIO, "replace": errno.EROFS}[where]

    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(err, os.strerror(err))

    if where == "mkstemp":
        monkeypatch.setattr(tempfile, "mkstemp", fail)
    elif where == "write":
        monkeypatch.setattr(os, "fdopen", _faulty_fdopen(os.fdopen, err))
    else:
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(_state(3), tmp_path, 3, keep=2)
    monkeypatch.undo()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (
        f"cannot write checkpoint {tmp_path / 'ckpt_step000000003.pt'}: {os.strerror(err)} "
        f"({errno.errorcode[err]}); the last good checkpoint {tmp_path / 'ckpt_step000000002.pt'} is kept"
    )
    # Nothing changed on disk: both checkpoints byte for byte, no temporary file.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_latest_good(tmp_path)[1]["progress"]["global_step"] == 2


def test_unwritable_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    """A real OS error (no monkeypatching): the checkpoint directory's parent is a regular file."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*file/ckpt/ckpt_step000000001\.pt: Not a "
                       r"directory \(ENOTDIR\); no earlier checkpoint exists"):
        save_checkpoint(_state(1), tmp_path / "file" / "ckpt", 1, keep=2)


def test_stale_temporary_files_are_removed_by_the_next_write(tmp_path: Path) -> None:
    save_checkpoint(_state(1), tmp_path, 1, keep=2)
    stale = tmp_path / ".ckpt_step000000002.pt.abc123.tmp"  # what a writer killed mid-write leaves
    stale.write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_step000000001.pt"]
    save_checkpoint(_state(2), tmp_path, 2, keep=2)
    assert not stale.exists()


def test_stop_request_turns_signals_into_a_flag() -> None:
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    req = StopRequest()
    req.install()
    try:
        assert not req.should_stop(DistInfo())
        os.kill(os.getpid(), signal.SIGTERM)  # the process is not terminated: the handler records it
        assert req.should_stop(DistInfo()) and req.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # after the first SIGINT a second one interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert req.signum == signal.SIGINT
    finally:
        req.uninstall()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous


def test_sigterm_at_an_epoch_end_validates_checkpoints_and_resumes_bitwise(tmp_path: Path) -> None:
    """Stopped by SIGTERM at the epoch's last step: the epoch's validation runs before the checkpoint, so the
    resumed run's metrics and weights equal the uninterrupted run's."""
    full = train(_tiny_cfg(tmp_path / "full"), log=lambda _: None)

    def log(msg: str) -> None:
        if msg.startswith("epoch 1/2 step 8/"):
            os.kill(os.getpid(), signal.SIGTERM)

    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted) as info:
        train(_tiny_cfg(part), log=log)
    assert (info.value.step, info.value.exit_code) == (8, 143)
    assert info.value.checkpoint == part / "checkpoints" / "ckpt_step000000008.pt"
    assert not (part / "final_metrics.json").exists()
    train(_tiny_cfg(part), resume="latest", log=lambda _: None)
    a, b = _final_state(full.run_dir), _final_state(part)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key

    def rows(run: Path) -> list[dict]:
        volatile = ("time_s", "unix_time", "img_per_s", "data_wait_s", "data_wait_frac")
        return [{k: v for k, v in r.items() if k not in volatile} for r in read_jsonl(run / "metrics.jsonl")]

    assert rows(full.run_dir) == rows(part) and sum(r["kind"] == "val" for r in rows(part)) == 2


def test_resuming_a_finished_run_logs_nothing_new(tmp_path: Path) -> None:
    """A process killed after its final checkpoint: --resume has nothing to train and must not validate again."""
    run = tmp_path / "run"
    cfg = _tiny_cfg(run, **{"train.epochs": 1})
    first = train(cfg, log=lambda _: None)
    rows = (run / "metrics.jsonl").read_text()
    again = train(cfg, resume="latest", log=lambda _: None)
    assert (run / "metrics.jsonl").read_text() == rows  # no second validation row of the last step
    assert again.global_step == first.global_step == 8 and again.final_metrics == first.final_metrics


def _format1(tmp_path: Path, mixup_state: dict | None) -> Path:
    path = tmp_path / "ckpt_step000000003.pt"
    state = {"format": 1, "model": {"w": torch.ones(2)}, "optimizer": {}, "progress": {"global_step": 3},
             "rank_states": [{"rng": None, "mixup": mixup_state}]}
    torch.save(state, path)
    return path


def test_format1_with_old_mixup_state_refuses_to_resume_in_one_line_but_loads_for_finetuning(tmp_path: Path) -> None:
    from ipu_norm.train.checkpoint import CheckpointFormatError

    path = _format1(tmp_path, {"generator": torch.zeros(5, dtype=torch.uint8)})
    with pytest.raises(CheckpointFormatError, match=r"format 1 holds the Mixup/CutMix RNG") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointFormatError):  # not skipped as if corrupt: that would silently restart the run
        load_latest_good(tmp_path, report=lambda _: None)
    state = load_checkpoint(path, resume=False)
    assert state["format"] == CHECKPOINT_FORMAT == 2 and torch.equal(state["model"]["w"], torch.ones(2))


def test_format1_without_mixup_state_is_read_as_the_current_format(tmp_path: Path) -> None:
    state = load_checkpoint(_format1(tmp_path, None))
    assert state["format"] == CHECKPOINT_FORMAT and state["progress"]["global_step"] == 3
