"""``run_train.py --dry-run`` (ipu_norm/ipu/dry_run.py): every shipped IPU config, without and with (stand-in) SDK."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from poptorch_standin import StandIn, standin_with_executors

import run_train
from ipu_norm.config.loader import load_config
from ipu_norm.ipu.dry_run import dry_run

ROOT = Path(__file__).resolve().parents[1]
IPU_CONFIGS = sorted((ROOT / "configs").glob("ipu_*.yml"))
NO_MEMORY = ["--set", 'execution.memory_check="off"']  # the estimate's forward passes take seconds per config


@pytest.fixture
def no_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "poptorch", None)  # import poptorch -> ImportError, as without the SDK


def _option_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("opts.")]


@pytest.mark.parametrize("path", IPU_CONFIGS, ids=[p.name for p in IPU_CONFIGS])
def test_dry_run_every_ipu_config_without_sdk(path: Path, no_sdk: None, capsys: pytest.CaptureFixture) -> None:
    rc = run_train.main(["--config", str(path), "--device", "ipu", "--dry-run", *NO_MEMORY])
    out = capsys.readouterr().out
    assert rc == 0, out
    cfg = load_config(path)
    t, ex = cfg.train, cfg.execution
    accum = t.global_batch_size // (t.micro_batch_size * ex.replicas)  # independent of the plan code
    lines = _option_lines(out)
    assert f"opts.replicationFactor({ex.replicas})" in lines
    assert f"opts.Training.gradientAccumulation({accum})" in lines
    assert f"opts.deviceIterations({ex.device_iterations})" in lines
    stages = len(ex.pipeline_splits) + 1
    amps = ex.available_memory_proportion
    amps = amps if isinstance(amps, list) else [amps] * stages  # one value applies to every IPU
    amp = ", ".join(f"'IPU{i}': {p}" for i, p in enumerate(amps))
    assert f"opts.setAvailableMemoryProportion({{{amp}}})" in lines
    assert len(re.findall(r"^  stage \d on IPU\d", out, re.M)) == stages
    assert out.count("poptorch.BeginBlock(") == (stages if stages > 1 else 0)
    cls = {"sgd": "SGD", "rmsprop": "RMSprop", "adamw": "AdamW", "rmsprop_tf": "RMSprop"}[cfg.optim.name]
    assert f"optimizer: poptorch.optim.{cls}(" in out
    assert ("use_tf_variant=True" in out) == (cfg.optim.name == "rmsprop_tf")
    scaling = "automatic" if ex.loss_scaling == "auto" else f"static {ex.loss_scaling:g}"
    assert "loss_scaling=" in out and f"loss scaling: {scaling}" in out
    samples = t.micro_batch_size * accum * ex.replicas * ex.device_iterations
    assert (f"batch: micro {t.micro_batch_size} x accumulation {accum} x replicas {ex.replicas} x device iterations "
            f"{ex.device_iterations} = {samples} samples per host call") in out
    assert f"global batch (per optimizer step) = {t.micro_batch_size} x {accum} x {ex.replicas} = " \
           f"{t.global_batch_size}" in out
    # Throughput shape (issue 21): async loader, device iterations > 1, 8-bit input, sums out, no weight copies.
    assert ex.device_iterations > 1
    assert (f"poptorch.DataLoader(opts, dataset, batch_size={t.micro_batch_size}, " in out
            and "mode=poptorch.DataLoaderMode.AsyncRebatched" in out)
    assert f"each batch is one host call of {samples} samples" in out
    assert "opts.outputMode(poptorch.OutputMode.Sum)" in lines
    size = cfg.data.train_size or {"nfnet_f0": 192}.get(cfg.model.name, 224)  # NFNet-F0 trains at 192 px
    mb = t.global_batch_size * 3 * size * size / 2**20  # uint8 images of one optimizer step, all replicas
    assert f"images {t.global_batch_size} x 3 x {size} x {size} uint8 = {mb:,.1f} MB (8-bit input" in out
    assert "weights copied to host per optimizer step: 0 MB" in out
    assert cfg.train.ema_decay is None
    # The printed option lines are real code: run them on the SDK 3.4 table stand-in (refuses unknown calls).
    s = StandIn()
    exec("\n".join(lines), {"opts": s.poptorch.Options(), "poptorch": s.poptorch, "torch": torch})  # noqa: S102
    assert len(s.log) >= len(lines)


def test_dry_run_prints_memory_estimate_per_stage(no_sdk: None, capsys: pytest.CaptureFixture) -> None:
    """A tiny model split over two IPUs (the shipped configs' estimates take seconds each: slow test below)."""
    path = ROOT / "configs" / "tiny_resnet18_gn.yml"
    args = ["--device", "ipu", "--set", "execution.pipeline_splits=[blocks.2]", "--global-batch-size", "12",
            "--set", "train.ema_decay=null"]
    assert run_train.main(["--config", str(path), "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    est = re.findall(r"^  stage (\d) on IPU\d: .*\| est\. ([\d,]+) MiB of ([\d,]+) MiB", out, re.M)
    assert [s for s, _, _ in est] == ["0", "1"]
    assert all(0 < int(a.replace(",", "")) < int(b.replace(",", "")) for _, a, b in est)
    assert "memory estimate: fits" in out


def test_dry_run_refusals(no_sdk: None, capsys: pytest.CaptureFixture) -> None:
    """A CPU config is not described (exit 2); what the IPU run would refuse exits 1 with the reason."""
    tiny = str(ROOT / "configs" / "tiny_resnet18_gn.yml")
    assert run_train.main(["--config", tiny, "--dry-run"]) == 2
    assert "--dry-run describes the IPU path" in capsys.readouterr().err
    huge = ["--micro-batch-size", "100000", "--global-batch-size", "100000"]
    assert run_train.main(["--config", tiny, "--device", "ipu", "--dry-run", *huge]) == 1
    err = capsys.readouterr().err
    assert "would be refused" in err and "budget" in err
    ema = ["--set", "execution.pipeline_splits=[blocks.2]", "--global-batch-size", "12", *NO_MEMORY]
    assert run_train.main(["--config", tiny, "--device", "ipu", "--dry-run", *ema]) == 1  # ema_decay: 0.9
    err = capsys.readouterr().err
    assert "train.ema_decay=0.9 (a per-step EMA) is not available on IPUs" in err and err.count("\n") == 1
    agc = str(ROOT / "configs" / "tiny_nf_resnet50_agc.yml")
    assert run_train.main(["--config", agc, "--device", "ipu", "--dry-run", *NO_MEMORY]) == 1
    assert "optim.agc_scope: step (exact AGC on the accumulated, all-reduced gradient) is not available on IPUs" \
        in capsys.readouterr().err
    micro = ["--set", "optim.agc_scope=micro_batch", "--set", "execution.precision=16.32"]
    assert run_train.main(["--config", agc, "--device", "ipu", "--dry-run", *NO_MEMORY, *micro]) == 1
    assert "needs a static loss scale" in capsys.readouterr().err  # 'auto' is dynamic loss scaling in fp16
    static = ["--set", "execution.loss_scaling=128"]
    assert run_train.main(["--config", agc, "--device", "ipu", "--dry-run", *NO_MEMORY, *micro, *static]) == 0
    assert "AGC: per micro-batch in the backward pass (PopART op ipu_norm.MicroBatchAGC" in capsys.readouterr().out
    bad = ["--set", "execution.pipeline_splits=[blocks.1]", "--global-batch-size", "8", "--micro-batch-size", "8"]
    assert run_train.main(["--config", tiny, "--device", "ipu", "--dry-run", *bad]) == 1
    assert "gradient accumulation" in capsys.readouterr().err


def test_dry_run_with_sdk_compiles_and_does_not_train(capsys: pytest.CaptureFixture) -> None:
    """With poptorch present (here the table stand-in, CPU executor) the backend is prepared as for training and
    the executable compiled with example inputs of one host call; no step runs."""
    cfg = load_config(ROOT / "configs" / "tiny_resnet18_gn.yml", overrides=[
        "execution.device=ipu", "execution.pipeline_splits=[blocks.2]", "execution.replicas=1",
        "train.global_batch_size=12", 'execution.memory_check="off"', "train.ema_decay=null"])
    s = standin_with_executors()
    assert dry_run(cfg, poptorch=s.poptorch) == 0
    out = capsys.readouterr().out
    (compile_call,) = s.calls("poptorch.PoplarExecutor.compile")
    images, targets = compile_call.args
    assert tuple(images.shape) == (12, 3, 16, 16) and targets.shape == (12, cfg.model.num_classes)  # mixup: soft
    assert not s.calls("PoplarExecutor.__call__") and not s.calls("setOptimizer")  # nothing trained
    assert {"poptorch.trainingModel", "poptorch.BeginBlock"} <= set(s.names())
    assert "compiled in" in out and "exiting before training" in out


@pytest.mark.slow
@pytest.mark.parametrize("path", IPU_CONFIGS, ids=[p.name for p in IPU_CONFIGS])
def test_dry_run_cli_subprocess_with_memory_estimate(path: Path) -> None:
    """The documented command line, in a fresh interpreter (no SDK here), memory estimate included."""
    proc = subprocess.run([sys.executable, "run_train.py", "--config", str(path.relative_to(ROOT)), "--device", "ipu",
                           "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "memory estimate: fits" in proc.stdout and "opts.Training.gradientAccumulation(" in proc.stdout


def test_dry_run_under_poprun(no_sdk: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Under poprun the options come from popdist (no replicationFactor) and each instance gets its share."""
    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    path = ROOT / "configs" / "ipu_effnet_b0_proxy_pod16.yml"
    assert run_train.main(["--config", str(path), "--dry-run", *NO_MEMORY]) == 0
    out = capsys.readouterr().out
    assert "opts = popdist.poptorch.Options(ipus_per_replica=2)" in out and "replicationFactor" not in out
    assert "3072 samples per host call over all 2 instances (this one: 1536)" in out
