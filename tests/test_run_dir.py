"""One run per output directory, checkpoints that know their run, data flags that do what they say.

- A new run never overwrites another: it refuses with one line naming the directory and the choices, and
  ``--overwrite`` moves the old run aside (subprocesses of ``run_train.py``, as a user runs them).
- ``--resume`` refuses a checkpoint of another run or of another config unless ``--resume-any``.
- Every shipped config writes to its own directory.
- ``--data-root`` alone means imagefolder; a root on generated data is an error; a mistyped digits root creates
  nothing; a run creates nothing outside its output directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from procs import ROOT, run, train_cmd

import run_train
from ipu_norm.config import ConfigError, load_config
from ipu_norm.config.cli import parse_args
from ipu_norm.train.checkpoint import list_checkpoints, load_checkpoint
from ipu_norm.train.run_dir import RunDirError, config_differences
from ipu_norm.train.trainer import train

TINY = str(ROOT / "configs" / "tiny_resnet18_gn.yml")
QUICK = ("--config", TINY, "--max-steps", "1", "--set", "train.tensorboard=false")

pytestmark = pytest.mark.usefixtures("one_thread")


def _files(d: Path) -> dict[Path, bytes]:
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_new_run_refuses_an_existing_run_and_overwrite_moves_it_aside(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run(train_cmd(*QUICK, "--output-dir", str(out)))
    assert first.returncode == 0, first.stderr[-3000:]
    before = _files(out)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["run_id"] == run_id

    again = run(train_cmd(*QUICK, "--output-dir", str(out)))
    assert again.returncode == 1
    (line,) = _error_lines(again.stderr)
    assert str(out) in line and all(choice in line for choice in ("--resume", "--output-dir", "--overwrite")), line
    assert _files(out) == before  # nothing written, nothing lost

    over = run(train_cmd(*QUICK, "--output-dir", str(out), "--overwrite"))
    assert over.returncode == 0, over.stderr[-3000:]
    (moved,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert f"moved the previous run in {out} to {moved}" in over.stdout
    assert _files(moved) == before  # the old run, intact beside the new one
    assert json.loads((out / "run.json").read_text())["run_id"] != run_id

    # --resume with another config is refused (one line, nothing changed); --resume-any accepts it.
    before = _files(out)
    other = run(train_cmd(*QUICK, "--output-dir", str(out), "--resume", "--max-steps", "2", "--set", "optim.lr=0.5"))
    assert other.returncode == 1
    (line,) = _error_lines(other.stderr)
    assert "optim.lr: 0.02 -> 0.5" in line and "--resume-any" in line, line
    assert _files(out) == before
    anyway = run(train_cmd(*QUICK, "--output-dir", str(out), "--resume", "--resume-any", "--max-steps", "2",
                           "--set", "optim.lr=0.5"))
    assert anyway.returncode == 0, anyway.stderr[-3000:]
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["progress"]["global_step"] == 2


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    def cfg(out: Path, **flags):
        return load_config(TINY, flags={"train.output_dir": str(out), "train.max_steps": 1,
                                        "train.tensorboard": False, **flags})

    quiet = {"log": lambda _: None}
    train(cfg(tmp_path / "a"), **quiet)
    train(cfg(tmp_path / "b"), **quiet)
    ckpt_a = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    with pytest.raises(RunDirError, match=r"belongs to run .* but .*b holds run"):
        train(cfg(tmp_path / "b", **{"train.max_steps": 2}), resume=str(ckpt_a), **quiet)
    result = train(cfg(tmp_path / "b", **{"train.max_steps": 2}), resume=str(ckpt_a), resume_any=True, **quiet)
    assert result.global_step == 2
    # Into a fresh directory a checkpoint carries its run on (its id), e.g. a run directory that was moved.
    moved = train(cfg(tmp_path / "c", **{"train.max_steps": 2}), resume=str(ckpt_a), **quiet)
    assert moved.global_step == 2
    assert json.loads((tmp_path / "c" / "run.json").read_text())["run_id"] == load_checkpoint(ckpt_a)["run_id"]


def test_config_differences_ignore_what_may_change_on_resume() -> None:
    saved = {"train": {"max_steps": 3, "epochs": 2, "output_dir": "a"}, "data": {"num_workers": 0, "root": None},
             "model": {"kwargs": {"widths": [8]}}}
    current = {"train": {"max_steps": 9, "epochs": 3, "output_dir": "b"}, "data": {"num_workers": 4, "root": "/x"},
               "model": {"kwargs": {"widths": [16]}}}
    assert config_differences(saved, current) == ["model.kwargs: {'widths': [8]} -> {'widths': [16]}"]
    saved["optim"], current["optim"] = {"lr": 0.1}, {"lr": 0.2}
    assert config_differences(saved, current)[1:] == ["optim.lr: 0.1 -> 0.2"]


def test_each_shipped_config_has_its_own_output_dir() -> None:
    bases = {"base.yml", "tiny_base.yml"}
    dirs: dict[str, str] = {}
    for path in sorted((ROOT / "configs").glob("*.yml")):
        if path.name in bases:
            continue
        out = load_config(path).train.output_dir
        assert out not in dirs, f"{path.name} and {dirs.get(out)} share {out}"
        dirs[out] = path.name
    assert len(dirs) >= 10


def test_data_root_alone_means_imagefolder(tmp_path: Path) -> None:
    _, cfg, _ = parse_args(["--config", TINY, "--data-root", str(tmp_path)])
    assert cfg.data.dataset == "imagefolder" and cfg.data.root == str(tmp_path)
    digits = str(ROOT / "configs" / "tiny_digits_resnet18.yml")
    _, cfg, _ = parse_args(["--config", digits, "--data-root", str(tmp_path)])
    assert cfg.data.dataset == "digits"  # a config with real data keeps its dataset
    with pytest.raises(ConfigError, match=r"data\.root: is set .* but data\.dataset is 'generated'"):
        parse_args(["--config", TINY, "--set", f"data.root={tmp_path}"])


def test_mistyped_digits_root_creates_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    missing = tmp_path / "nonexistent" / "x"
    rc = run_train.main(["--config", TINY, "--data", "digits", "--data-root", str(missing),
                         "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert re.search(rf"{re.escape(str(missing.parent))} does not exist", line), line
    assert not (tmp_path / "nonexistent").exists()
    assert not (tmp_path / "out").exists() and list(cwd.iterdir()) == []


def test_a_run_creates_nothing_outside_its_output_dir(tmp_path: Path, capsys, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert run_train.main([*QUICK, "--set", "train.tensorboard=true", "--output-dir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "out"] and list(cwd.iterdir()) == []
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "run.json", "config.yaml", "metrics.jsonl", "metrics.csv", "checkpoints", "tb", "final_metrics.json"
    }
