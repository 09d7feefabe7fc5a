"""What a person watching a run sees, and the trackers: progress bars, 1-based epochs, the summary table, elapsed
times in the metrics, TensorBoard event files (read back with TensorBoard's own reader), W&B offline, and one
clear line for an impossible batch under torchrun and for a data folder with fewer classes than the model."""

from __future__ import annotations

import csv
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from procs import ROOT, child_env, run, train_cmd

import run_train
from ipu_norm.config import load_config
from ipu_norm.core.plan import PlanError, build_plan
from ipu_norm.train.builders import build_model
from ipu_norm.train.metrics import read_jsonl
from ipu_norm.train.trainer import train

TINY = str(ROOT / "configs" / "tiny_resnet18_gn.yml")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_progress_bar_summary_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run(train_cmd("--config", TINY, "--max-steps", "9", "--set", "train.progress_bar=true",
                        "--set", "train.tensorboard=false", "--output-dir", str(out)))
    assert res.returncode == 0, res.stderr[-3000:]
    # One bar for the run (9 steps over 2 epochs; epochs 1-based), a transient validation bar.
    assert re.search(r"train epoch 2/2: 100%\|.*\| 9/9 ", res.stderr), res.stderr[-2000:]
    assert "train epoch 1/2" in res.stderr and "validate:" in res.stderr
    assert "step/s" in res.stderr or "s/step" in res.stderr  # the run's rate (and ETA) come with the bar
    lines = res.stdout.splitlines()
    assert not any(line.startswith("plan:") for line in lines)  # the IPU plan only on IPUs
    assert any(line.startswith("device: cpu") for line in lines)
    assert "validation after epoch 1 (step 8)" in res.stdout and "validation in epoch 2 (step 9)" in res.stdout
    assert "{" not in res.stdout.split("run summary")[1]  # a table, not a raw dict
    for row in ("steps", "top-1 (final)", "top-1 EMA weights", "top-1 (best)", "training throughput", "wall time",
                "run dir", "checkpoint", "metrics"):
        assert re.search(rf"^  {re.escape(row)} +\S", res.stdout, re.M), (row, res.stdout[-2000:])
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [int(r["epoch"]) for r in train_rows] == [1] * 8 + [2]
    assert [int(r["epoch"]) for r in rows if r["kind"] == "val"] == [1, 2]
    times = [float(r["time_s"]) for r in rows]
    assert 0 < times[0] and times == sorted(times) and times[-1] < 3600  # seconds since the start, not Unix time


def test_log_lines_are_1_based_without_a_bar(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = load_config(TINY, flags={"train.output_dir": str(tmp_path), "train.max_steps": 2,
                                   "train.tensorboard": False})
    train(cfg, log=lines.append)
    assert [line.split(" loss")[0] for line in lines if " step " in line and "loss" in line][:2] == [
        "epoch 1/2 step 1/2", "epoch 1/2 step 2/2"]


def test_tensorboard_event_file_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(TINY, flags={"train.output_dir": str(tmp_path), "train.max_steps": 3,
                                   "train.tensorboard": True})
    train(cfg, log=lambda _: None)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/img_per_s", "val/top1", "val/top5", "val/ema_top1"} <= tags
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train_recs = [r for r in records if r["kind"] == "train"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train_recs] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in train_recs], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/lr")], [r["lr"] for r in train_recs], rtol=1e-6)
    (val,) = [r for r in records if r["kind"] == "val"]
    (top1,) = acc.Scalars("val/top1")
    assert top1.step == 3 and top1.value == pytest.approx(val["top1"], rel=1e-6)



def test_agc_clip_fraction_reaches_metrics_and_tensorboard(tmp_path: Path) -> None:
    """The fraction of units AGC clipped per step is logged (metrics.jsonl and TensorBoard) for AGC runs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(str(ROOT / "configs" / "tiny_nf_resnet50_agc.yml"),
                      flags={"train.output_dir": str(tmp_path), "train.max_steps": 2, "train.tensorboard": True,
                             "finetune.enabled": False})
    train(cfg, log=lambda _: None)
    train_recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    fractions = [r["agc_clip_fraction"] for r in train_recs]
    assert len(fractions) == 2 and all(0.0 <= f <= 1.0 for f in fractions)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/agc_clip_fraction")], fractions, rtol=1e-6)

def _wandb_history(path: Path) -> list[dict[str, str]]:
    """The history rows of a W&B run file: a LevelDB-style log (7-byte file header; 32 KiB blocks of records with a
    7-byte header: crc32 4, length 2, type 1 = full / 2 first / 3 middle / 4 last) of protobuf ``Record``s."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, pending, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item})
    return rows


def test_wandb_offline(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")  # optional: not in requirements.txt
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    out = tmp_path / "run"
    cfg = load_config(TINY, flags={"train.output_dir": str(out), "train.max_steps": 2, "train.tensorboard": False,
                                   "train.wandb": True})
    train(cfg, log=lambda _: None)
    import wandb

    wandb.teardown()  # waits for W&B's service process to write everything (as at the exit of run_train.py)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (data,) = runs[0].glob("*.wandb")
    history = [h for h in _wandb_history(data) if "train/loss" in h]
    losses = [float(h["train/loss"]) for h in history if "train/loss" in h]
    expected = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)


def test_impossible_batch_names_the_valid_choices() -> None:
    cfg = load_config(TINY, flags={"train.micro_batch_size": 32, "train.global_batch_size": 32,
                                   "execution.replicas": 2})
    model = build_model(cfg.model)
    with pytest.raises(PlanError, match=r"use global_batch_size 64, or change") as info:
        build_plan(cfg.execution, model, cfg.train)
    assert "64 or 64" not in str(info.value)
    cfg = load_config(TINY, flags={"train.micro_batch_size": 8, "train.global_batch_size": 20})
    with pytest.raises(PlanError, match=r"use global_batch_size 16 or 24, or change"):
        build_plan(cfg.execution, model, cfg.train)


@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists() and shutil.which("torchrun") is None,
                    reason="torchrun not found")
def test_torchrun_impossible_batch_says_it_once(tmp_path: Path) -> None:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    res = run([torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "run_train.py"), "--config", TINY,
               "--micro-batch-size", "4", "--global-batch-size", "4", "--output-dir", str(tmp_path / "run")],
              env=child_env())
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "use global_batch_size 8, or change" in errors[0], res.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_fewer_classes_than_num_classes_is_one_note(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(np.full((20, 20, 3), 30 * i, np.uint8)).save(root / split / c / f"{i}.png")
    rc = run_train.main(["--config", TINY, "--data-root", str(root), "--max-steps", "1", "--output-dir",
                         str(tmp_path / "run"), "--set", "data.val_batch_size=4", "--set", "train.tensorboard=false"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "Warning" not in captured.err
    notes = [line for line in captured.out.splitlines() if "fewer than num_classes" in line]
    assert len(notes) == 1 and notes[0].startswith("NOTE: ") and str(root / "train") in notes[0], captured.out


def test_readme_quick_look_is_small() -> None:
    """The README's quick look trains the flagship recipe on a few small batches (it must finish in under a
    minute on a 2-core CPU: about 20 s measured, so it must not grow back to full global batches)."""
    import shlex

    from ipu_norm.config.cli import parse_args

    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick look", 1)[1].split("\n## ", 1)[0]
    command = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    words = [w for w in shlex.split(command) if "=" not in w or w.startswith("--") or "." in w.split("=")[0]]
    assert words[:2] == ["python", "run_train.py"], words
    _, cfg, _ = parse_args(words[2:])
    assert cfg.model.name == "efficientnet_b0" and cfg.model.norm == "ln+pn"
    assert cfg.train.max_steps * cfg.train.global_batch_size <= 64
    assert cfg.data.generated_val_samples <= 32 and cfg.data.dataset == "generated"
