"""Bad inputs get one clear error naming the culprit, and lose nothing (issue 11, item 3).

Each case runs the real entry point (``run_train.main`` in-process; a subprocess of ``run_train.py`` for
the tracebacks check) and asserts: non-zero exit code, exactly one ``error:`` / ``config error:`` line on
stderr that names the offending path / key / value, no traceback, and nothing written or lost.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run_train
from ipu_norm.config import load_config
from ipu_norm.data import IGNORE_TARGET, DatasetError, SafeImageFolder, build_eval_transform, load_rgb
from ipu_norm.train.backend import TorchBackend, TrainSpec
from ipu_norm.train.checkpoint import list_checkpoints, load_checkpoint
from ipu_norm.train.distributed import DistInfo
from ipu_norm.train.trainer import NonFiniteTrainingError, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_resnet18_gn.yml")


pytestmark = pytest.mark.usefixtures("one_thread")


def _rgb(seed: int = 0, size: int = 20) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _folder(root: Path, classes=("a", "b"), n: int = 4, splits=("train", "val")) -> Path:
    for split in splits:
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _rgb(10 * ci + i).save(root / split / c / f"{i}.png")
    return root


def _run(argv: list[str], capsys, stdout: list[str] | None = None) -> tuple[int, list[str]]:
    """run_train.main(argv) -> (exit code, stderr lines); stdout lines are appended to ``stdout`` if given."""
    rc = run_train.main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if stdout is not None:
        stdout.extend(captured.out.splitlines())
    return rc, [line for line in captured.err.splitlines() if line.strip()]


def _one_error(lines: list[str], prefix: str = "error: ") -> str:
    errors = [line for line in lines if line.startswith(prefix)]
    assert len(errors) == 1, lines
    return errors[0]


def _imagefolder_args(root: Path, out: Path) -> list[str]:
    return ["--config", TINY, "--data", "imagefolder", "--data-root", str(root), "--output-dir", str(out)]


# ------------------------------------------------------------------------------------------ data roots


def test_empty_data_root(tmp_path: Path, capsys) -> None:
    (tmp_path / "data").mkdir()
    rc, lines = _run(_imagefolder_args(tmp_path / "data", tmp_path / "run"), capsys)
    assert rc == 1
    assert f"dataset folder not found: {tmp_path / 'data' / 'train'}" in _one_error(lines)
    assert not (tmp_path / "run").exists()  # nothing written


def test_split_without_class_folders(tmp_path: Path, capsys) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    rc, lines = _run(_imagefolder_args(tmp_path / "data", tmp_path / "run"), capsys)
    assert rc == 1 and f"no class folders in {tmp_path / 'data' / 'train'}" in _one_error(lines)


def test_class_folder_without_images_is_named(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "data")
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "notes.txt").write_text("not an image")
    rc, lines = _run(_imagefolder_args(root, tmp_path / "run"), capsys)
    line = _one_error(lines)
    assert rc == 1 and f"class folder without any image file: {root / 'train' / 'c'} " in line


def test_folder_of_unreadable_files(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                (root / split / c / f"{i}.jpg").write_bytes(np.random.default_rng(i).bytes(300))
    rc, lines = _run(_imagefolder_args(root, tmp_path / "run"), capsys)
    line = _one_error(lines)
    assert rc == 1 and f"no readable image under {root / 'train'}" in line and "a/0.jpg" in line


def test_unreadable_data_root_permission(tmp_path: Path, capsys, monkeypatch) -> None:
    # Tests may run as root (permissions do not bind): raise the PermissionError os.scandir would raise.
    import torchvision.datasets.folder as tv_folder

    root = _folder(tmp_path / "data")

    def denied(directory):
        raise PermissionError(errno.EACCES, "Permission denied", str(directory))

    monkeypatch.setattr(tv_folder, "find_classes", denied)
    rc, lines = _run(_imagefolder_args(root, tmp_path / "run"), capsys)
    assert rc == 1
    assert f"cannot read the dataset folder {root / 'train'}: Permission denied" in _one_error(lines)


# ----------------------------------------------------------------------------------------- image modes


def _mode_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    base = _rgb(3)
    out = {}
    for mode, ext in [("L", "png"), ("LA", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg")]:
        out[mode] = folder / f"{mode}.{ext}"
        base.convert(mode).save(out[mode])
    out["P+transparency"] = folder / "P_transparent.png"
    base.convert("P").save(out["P+transparency"], transparency=0)
    ramp = np.linspace(0, 65535, 20 * 20).reshape(20, 20).astype(np.uint16)
    out["I;16"] = folder / "I16.png"
    Image.fromarray(ramp).save(out["I;16"])
    out["F"] = folder / "F.tif"
    Image.fromarray(ramp.astype(np.float32) / 7.0).save(out["F"])
    return out


def test_load_rgb_converts_every_mode_and_scales_16_bit(tmp_path: Path) -> None:
    files = _mode_images(tmp_path)
    with Image.open(files["I;16"]) as im:
        assert im.mode.startswith("I")  # really a 16-bit image on disk
    for mode, path in files.items():
        im = load_rgb(path)
        assert im.mode == "RGB" and im.size == (20, 20), mode
    # 16-bit: scaled by 1/257 (full range -> full range), not clipped at 255 as PIL's convert("RGB") does.
    arr = np.asarray(load_rgb(files["I;16"]))[..., 0].astype(int)
    ramp = np.linspace(0, 65535, 400).reshape(20, 20)
    assert np.abs(arr - ramp / 257).max() <= 1 and arr.min() == 0 and arr.max() == 255
    with Image.open(files["I;16"]) as im:
        assert np.asarray(im.convert("RGB"))[..., 0].mean() > 250  # what the stock loader would have fed
    # Float image: min-max to 0..255.
    f = np.asarray(load_rgb(files["F"]))[..., 0]
    assert f.min() == 0 and f.max() == 255


def test_mixed_mode_folder_trains(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            _mode_images(root / split / c)
    argv = _imagefolder_args(root, tmp_path / "run") + ["--set", "train.epochs=1", "--set", "model.num_classes=2"]
    rc, lines = _run(argv, capsys)
    assert rc == 0 and not [line for line in lines if "error" in line.lower()]
    assert list_checkpoints(tmp_path / "run" / "checkpoints")


# ------------------------------------------------------------------------------ unreadable validation file


def _truncated_jpeg(path: Path) -> None:
    tmp = path.with_suffix(".full.jpg")
    _rgb(99, size=64).save(tmp, quality=95)
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_val_jpeg_is_skipped_and_counted_out_of_the_metrics(tmp_path: Path) -> None:
    """Val policy = train policy (skip), but the stand-in is left out of the metrics and counted."""
    clean = _folder(tmp_path / "clean")
    dirty = _folder(tmp_path / "dirty")
    _truncated_jpeg(dirty / "val" / "a" / "1_truncated.jpg")
    with pytest.raises(OSError):
        load_rgb(dirty / "val" / "a" / "1_truncated.jpg")

    ds = SafeImageFolder(dirty / "val", transform=build_eval_transform(16), bad_target=IGNORE_TARGET)
    targets = [ds[i][1] for i in range(len(ds))]
    assert targets.count(IGNORE_TARGET) == 1 and ds.num_skipped == 1

    def evaluate(root: Path) -> tuple[dict[str, float], list[str]]:
        cfg = load_config(
            TINY,
            flags={"data.dataset": "imagefolder", "data.root": str(root), "model.num_classes": 2,
                   "train.output_dir": str(tmp_path / root.name / "run"), "data.val_batch_size": 2},
        )
        logs: list[str] = []
        trainer = Trainer(cfg, log=logs.append)
        try:
            return trainer.evaluate(), logs
        finally:
            trainer.close()

    want, _ = evaluate(clean)
    got, logs = evaluate(dirty)
    assert got.pop("val_unreadable") == 1
    assert got == pytest.approx(want)  # same model, same readable images: same metrics
    assert any("validation skipped 1 unreadable image" in m for m in logs)
    assert "val_unreadable" not in want


# ---------------------------------------------------------------------------------------------- config


def test_wrong_type_deep_in_execution_names_file_and_key(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "bad.yml"
    cfg.write_text(f"base: {TINY}\nexecution:\n  recompute_checkpoints: [blocks.1, 3]\n")
    rc, lines = _run(["--config", str(cfg)], capsys)
    line = _one_error(lines, "config error: ")
    assert rc == 2 and str(cfg) in line and "execution.recompute_checkpoints: expected list of string" in line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=abc", "--set optim.lr=abc: optim.lr: expected float, got 'abc'"),
        ("optim.lr=.inf", "optim.lr: expected float, got inf"),
        ("foo", "--set 'foo': expected section.key=value"),
        ("optim.foo=1", "--set optim.foo=1: unknown key 'optim.foo'"),
        ("train.epochs=[1", "--set 'train.epochs=[1': value '[1' is not valid YAML"),
        ("train.epochs.x=1", "train.epochs is not a section"),
    ],
)
def test_malformed_set_names_the_override(override: str, expected: str, tmp_path: Path, capsys) -> None:
    rc, lines = _run(["--config", TINY, "--set", override, "--output-dir", str(tmp_path / "run")], capsys)
    assert rc == 2 and expected in _one_error(lines, "config error: ")
    assert not (tmp_path / "run").exists()


def test_config_error_in_a_subprocess_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_train.py"), "--config", TINY, "--set", "optim.lr=abc"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "config error: --set optim.lr=abc: optim.lr: expected float, got 'abc' (str)"
    ]


def test_micro_batch_not_dividing_global_batch(tmp_path: Path, capsys) -> None:
    rc, lines = _run(["--config", TINY, "--micro-batch-size", "6", "--output-dir", str(tmp_path / "run")], capsys)
    line = _one_error(lines)
    assert rc == 1 and "train.global_batch_size=8 is not a multiple of micro_batch_size" in line and "6" in line
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


# ------------------------------------------------------------------------------------- non-finite losses


def test_fp32_backend_skips_non_finite_updates() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backend = TorchBackend("cpu", DistInfo())
    backend.prepare(model, opt, type("P", (), {"precision": "32.32"})(), TrainSpec(torch.nn.CrossEntropyLoss()))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    r = backend.train_step([(bad, y)])
    assert r.skipped and not np.isfinite(r.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    r = backend.train_step([(x, y)])
    assert not r.skipped and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _poison_generated(monkeypatch, bad) -> None:
    """Make generated samples NaN when ``bad(epoch, index)``."""
    from ipu_norm.data.datasets import GeneratedDataset

    original = GeneratedDataset.__getitem__

    def getitem(self, key):
        image, label = original(self, key)
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)  # the loader passes (epoch, index)
        if self.split == "train" and bad(epoch, index):
            image = torch.full_like(image, float("nan"))
        return image, label

    monkeypatch.setattr(GeneratedDataset, "__getitem__", getitem)


def test_persistent_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    _poison_generated(monkeypatch, lambda epoch, index: epoch >= 1)  # epoch 0 fine, then every sample NaN
    out = tmp_path / "run"
    argv = ["--config", TINY, "--output-dir", str(out), "--set", "train.max_nonfinite_steps=3",
            "--set", "train.ema_decay=null"]
    log: list[str] = []
    rc, lines = _run(argv, capsys, log)
    line = _one_error(lines)
    ckpts = list_checkpoints(out / "checkpoints")
    assert rc == 1 and [p.name for p in ckpts] == ["ckpt_step000000008.pt"]  # epoch 0's, nothing after
    assert "training stopped: 3 consecutive steps (9-11) had a non-finite loss" in line
    assert str(ckpts[0]) in line
    state = load_checkpoint(ckpts[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [m for m in log if "update skipped" in m] == [
        "NOTE: step 9: loss nan, update skipped",
        "NOTE: step 10: loss nan, update skipped",
    ]  # step 11 stops
    # The stop happened before any finite-loss step of epoch 1 could save: resuming restarts from step 8.
    assert state["progress"]["global_step"] == 8


def test_isolated_non_finite_steps_are_skipped_not_fatal(tmp_path: Path, capsys, monkeypatch) -> None:
    # One poisoned sample in epoch 1 (micro-batch 4 x accumulation 2: it spoils exactly one step).
    _poison_generated(monkeypatch, lambda epoch, index: epoch == 1 and index == 5)
    out = tmp_path / "run"
    log: list[str] = []
    rc, _ = _run(["--config", TINY, "--output-dir", str(out), "--set", "train.max_nonfinite_steps=2"], capsys, log)
    assert rc == 0 and sum("update skipped" in m for m in log) == 1
    final = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert final["progress"]["global_step"] == 16
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    cfg = load_config(TINY, flags={"train.output_dir": str(tmp_path)})
    trainer = Trainer(cfg, log=lambda _: None)
    try:
        first = trainer.save()
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("nan"))
        trainer.global_step = 5
        kept = f"not saving a checkpoint; the last good one is kept: {first}"
        with pytest.raises(NonFiniteTrainingError, match=kept):
            trainer.save()
        assert list_checkpoints(tmp_path / "checkpoints") == [first]
    finally:
        trainer.close()


def test_dataset_error_is_a_value_error() -> None:
    # run_train prints ValueErrors as one line: DatasetError must stay one.
    assert issubclass(DatasetError, ValueError)


# ------------------------------------------------------------------------- slow: real processes, workers


def _run_train_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_train.py"), *args], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_subprocess_diverging_run_stops_with_one_line(tmp_path: Path) -> None:
    """A learning rate of 1e30 blows the weights up: every later step is nan; the process stops cleanly."""
    out = tmp_path / "run"
    proc = _run_train_subprocess(
        ["--config", TINY, "--set", "optim.lr=1e30", "--set", "train.max_nonfinite_steps=4", "--output-dir", str(out)],
        tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "training stopped: 4 consecutive steps" in errors[0]
    assert not list_checkpoints(out / "checkpoints")  # no nan checkpoint written


@pytest.mark.slow
def test_subprocess_empty_class_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    for f in (root / "val" / "b").iterdir():
        f.unlink()
    proc = _run_train_subprocess(_imagefolder_args(root, tmp_path / "run"), tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: class folder without any image file: {root / 'val' / 'b'} "
    )


@pytest.mark.slow
def test_truncated_val_jpeg_count_is_exact_with_loader_workers(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", n=4)
    _truncated_jpeg(root / "val" / "b" / "2_truncated.jpg")
    cfg = load_config(
        TINY,
        flags={"data.dataset": "imagefolder", "data.root": str(root), "model.num_classes": 2,
               "data.num_workers": 2, "train.epochs": 1, "train.output_dir": str(tmp_path / "run")},
    )
    from ipu_norm.train.trainer import train

    result = train(cfg, log=lambda _: None)
    assert result.final_metrics["val_unreadable"] == 1  # counted in the main process, from the targets


def test_failed_restart_leaves_the_previous_run_intact(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert run_train.main(["--config", TINY, "--output-dir", str(out), "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tmp_path / "empty").mkdir()
    for argv in (
        ["--set", "optim.lr=abc"],  # config error
        ["--data", "imagefolder", "--data-root", str(tmp_path / "empty")],  # dataset error
        ["--micro-batch-size", "3"],  # batch arithmetic error
    ):
        rc, lines = _run(["--config", TINY, "--output-dir", str(out), "--resume", *argv], capsys)
        assert rc in (1, 2) and len([m for m in lines if "error: " in m]) == 1, argv
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # checkpoints, metrics and config untouched


def test_odd_micro_batch_with_mixup_is_one_line(tmp_path: Path, capsys) -> None:
    # TINY has mixup/cutmix on: each image is mixed with the reversed micro-batch, which needs an even size.
    rc, lines = _run(["--config", TINY, "--micro-batch-size", "3", "--output-dir", str(tmp_path / "run")], capsys)
    line = _one_error(lines, prefix="config error: ")
    assert rc == 2 and "train.micro_batch_size" in line and "must be even with mixup/cutmix on" in line, line
