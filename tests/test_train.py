"""Trainer and TorchBackend: accumulation, AGC placement, precision, optimizers, schedule, IPU start-up, outputs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

import ipu_norm.optim.agc as agc_module
from ipu_norm.config import load_config
from ipu_norm.train.backend import TorchBackend, TrainSpec, _amp_settings, get_backend
from ipu_norm.train.builders import build_optimizer, build_scheduler, effective_lr
from ipu_norm.train.distributed import DistInfo
from ipu_norm.train.metrics import topk_correct
from ipu_norm.train.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyGN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6, 4)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def _plan(precision: str = "32.32") -> SimpleNamespace:
    return SimpleNamespace(precision=precision, compile=False)


def _backend(model: nn.Module, lr: float = 0.1, agc: float | None = None, precision: str = "32.32"):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    backend = TorchBackend("cpu", DistInfo())
    backend.prepare(model, opt, _plan(precision), TrainSpec(criterion=nn.CrossEntropyLoss(), agc_clip=agc))
    return backend, opt


def _relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """||after - before|| / ||before|| over every floating-point tensor of two state dicts."""
    keys = [k for k, v in before.items() if v.is_floating_point()]
    diff = sum(float((after[k].double() - before[k].double()).square().sum()) for k in keys)
    return (diff / sum(float(before[k].double().square().sum()) for k in keys)) ** 0.5


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=g), torch.randint(0, 4, (n,), generator=g)


def _sgd_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.1, momentum: float = 0.9,
    agc: float | None = None,
) -> dict[str, torch.Tensor]:
    """``steps`` full-batch steps of SGD with momentum written out (buf = g, then momentum * buf + g; p -= lr * buf),
    with timm's adaptive_clip_grad (classifier excluded) first when ``agc`` is given; returns the final state dict."""
    from timm.utils import adaptive_clip_grad

    params = list(model.parameters())
    bufs: list[torch.Tensor] | None = None
    for _ in range(steps):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if agc is not None:
            adaptive_clip_grad([p for n, p in model.named_parameters() if not n.startswith("fc.")], agc)
        with torch.no_grad():
            grads = [p.grad.clone() for p in params]
            bufs = grads if bufs is None else [momentum * b + g for b, g in zip(bufs, grads)]
            for p, b in zip(params, bufs):
                p.sub_(lr * b)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_equals_full_batch() -> None:
    """4 micro-batches of 2 == one batch of 8 for a batch-independent model (mean loss over the step), and both
    equal SGD with momentum written out in the test (so the optimizer really stepped)."""
    x, y = _batch(8)
    torch.manual_seed(0)
    m1 = TinyGN()
    torch.manual_seed(0)
    m2 = TinyGN()
    torch.manual_seed(0)
    ref_model = TinyGN()
    initial = {k: v.clone() for k, v in ref_model.state_dict().items()}
    b1, _ = _backend(m1)
    b2, _ = _backend(m2)
    for _ in range(2):
        r1 = b1.train_step([(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)])
        r2 = b2.train_step([(x, y)])
    assert r1.samples == r2.samples == 8
    assert r1.loss == pytest.approx(r2.loss, rel=1e-5)
    ref = _sgd_reference(ref_model, x, y, steps=2)
    assert _relative_change(initial, ref) > 0.005  # the reference itself moved (measured: 0.018)
    for m in (m1, m2):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_agc_runs_once_per_step_on_accumulated_grads_before_the_update(monkeypatch) -> None:
    x, y = _batch(6, seed=1)
    torch.manual_seed(0)
    model = TinyGN()
    # Independent reference: the mean-loss gradient over the whole step.
    torch.manual_seed(0)
    ref = TinyGN()
    nn.functional.cross_entropy(ref(x), y).backward()
    expected = {n: p.grad.clone() for n, p in ref.named_parameters()}
    calls = []
    original = agc_module.adaptive_clip_grad_

    def spy(params, clip_factor, eps=1e-3, use_recorded_norms=True):
        params = list(params)
        calls.append(
            {
                "ids": [id(p) for p in params],
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                "clip": clip_factor,
            }
        )
        return original(params, clip_factor, eps=eps, use_recorded_norms=use_recorded_norms)

    monkeypatch.setattr(agc_module, "adaptive_clip_grad_", spy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backend, _ = _backend(model, agc=0.02)
    backend.train_step([(x[:2], y[:2]), (x[2:4], y[2:4]), (x[4:], y[4:])])
    assert len(calls) == 1 and calls[0]["clip"] == 0.02
    for n, g in expected.items():
        torch.testing.assert_close(calls[0]["grads"][n], g, rtol=1e-5, atol=1e-6)  # fully accumulated
        assert torch.equal(calls[0]["weights"][n], before[n])  # before optimizer.step
    assert id(model.fc.weight) not in calls[0]["ids"]  # classifier excluded
    assert id(model.conv.weight) in calls[0]["ids"]


def test_bf16_autocast_on_cpu_trains() -> None:
    torch.manual_seed(0)
    model = TinyGN()
    backend, _ = _backend(model, precision="bf16")
    assert backend.autocast_dtype == torch.bfloat16 and backend.scaler is None
    r = backend.train_step([_batch(4)])
    assert torch.isfinite(torch.tensor(r.loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    logits = backend.eval_step(_batch(4)[0])
    assert logits.dtype == torch.float32 and logits.shape == (4, 4)


def test_precision_settings() -> None:
    assert _amp_settings("32.32", "cpu") == (None, False)
    assert _amp_settings("16.32", "cuda") == (torch.float16, True)
    assert _amp_settings("16.16", "cuda") == (torch.float16, True)
    assert _amp_settings("bf16", "cuda") == (torch.bfloat16, False)
    with pytest.raises(ValueError, match="CUDA GPU or an IPU"):
        _amp_settings("16.32", "cpu")


def test_ipu_without_poplar_sdk_fails_clearly(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "poptorch", None)  # import poptorch -> ImportError
    cfg = load_config(CONFIGS / "tiny_resnet18_gn.yml", flags={"execution.device": "ipu"})
    with pytest.raises(RuntimeError) as exc:
        get_backend(cfg, DistInfo())
    msg = str(exc.value)
    assert "Poplar SDK" in msg and "--device cpu" in msg and "cuda" in msg


def test_run_train_ipu_device_exits_with_message(monkeypatch, tmp_path: Path, capsys) -> None:
    import importlib.util

    monkeypatch.setitem(sys.modules, "poptorch", None)
    spec = importlib.util.spec_from_file_location("run_train", ROOT / "run_train.py")
    run_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_train)
    code = run_train.main(
        ["--config", str(CONFIGS / "tiny_resnet18_gn.yml"), "--device", "ipu", "--output-dir", str(tmp_path)]
    )
    assert code == 1
    assert "Poplar SDK" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "cls", "extra"),
    [
        ("sgd", torch.optim.SGD, {"nesterov": True}),
        ("rmsprop", torch.optim.RMSprop, {"alpha": 0.9, "eps": 0.0316}),
        ("adamw", torch.optim.AdamW, {"betas": [0.9, 0.99]}),
    ],
)
def test_build_optimizer(name: str, cls: type, extra: dict) -> None:
    cfg = load_config(
        None, flags={f"optim.{k}": v for k, v in {"name": name, "lr": 0.1, "weight_decay": 1e-4, **extra}.items()}
    )
    model = TinyGN()
    opt = build_optimizer(cfg.optim, model, global_batch_size=512)
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # 0.1 per 256 samples at batch 512
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(model.conv.weight), id(model.fc.weight)}  # no decay on biases / norm affine
    if name == "sgd":
        assert opt.defaults["nesterov"] is True
    if name == "rmsprop":
        assert opt.defaults["alpha"] == 0.9 and opt.defaults["eps"] == 0.0316


def test_effective_lr_absolute() -> None:
    cfg = load_config(None, flags={"optim.lr": 0.3, "optim.lr_reference_batch": None})
    assert effective_lr(cfg.optim, 4096) == 0.3


def test_schedule_is_per_step_with_warmup() -> None:
    cfg = load_config(
        None,
        flags={
            "optim.warmup_epochs": 1.0,
            "optim.schedule": "cosine",
            "optim.lr": 1.0,
            "optim.lr_reference_batch": None,
        },
    )
    model = TinyGN()
    opt = build_optimizer(cfg.optim, model, 8)
    sched = build_scheduler(cfg.optim, opt, steps_per_epoch=4, epochs=3)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # linear warmup over 4 steps
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 0.05  # cosine decay to 0 over 8 steps


def test_topk_correct() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    # row 0: top-1 hit; row 1: hit at rank 2; row 2: hit at rank 3 (k capped at the 3 classes for k=5)
    assert topk_correct(logits, torch.tensor([1, 1, 0]), (1, 2, 5)) == [1, 2, 3]


def test_training_run_writes_metrics_config_and_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(
        CONFIGS / "tiny_resnet18_gn.yml", flags={"train.output_dir": str(out), "train.keep_checkpoints": 1}
    )
    messages: list[str] = []
    trainer = Trainer(cfg, log=messages.append)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    initial_val_loss = trainer.evaluate()["val_loss"]  # the untrained model on the validation set
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    assert result.global_step == 16 and result.epoch == 2
    assert any("GENERATED" in m for m in messages)  # the app says it is using generated data
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["kind"] == "train"]
    val_rows = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train_rows] == list(range(1, 17))  # log_every_steps: 1
    assert all(r["img_per_s"] > 0 and r["lr"] >= 0 for r in train_rows)
    assert [r["epoch"] for r in val_rows] == [1, 2]  # validation every epoch (1-based), model and EMA
    assert all({"top1", "top5", "ema_top1", "ema_top5"} <= r.keys() for r in val_rows)
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and rows[-1]["kind"] == "val" and rows[-1]["ema_top1"] != ""
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["output_dir"] == str(out) and saved["model"]["norm"] == "gn"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["ckpt_step000000016.pt"]  # keep 1
    # Learning happened: the weights moved, and the validation loss (fixed data, deterministic evaluation, so a
    # no-op optimizer leaves it exactly where it started) fell by a margin (measured: 2.46 -> 2.28).
    final = torch.load(out / "checkpoints" / "ckpt_step000000016.pt", weights_only=True)["model"]
    assert _relative_change(initial, final) > 0.01  # measured: 0.036
    assert val_rows[-1]["val_loss"] < initial_val_loss - 0.1, (initial_val_loss, val_rows)


def test_max_steps_caps_the_run_and_keeps_the_schedule(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny_resnet18_gn.yml", flags={"train.output_dir": str(tmp_path), "train.max_steps": 3})
    trainer = Trainer(cfg, log=lambda _: None)
    assert trainer.total_steps == 16 and trainer.accum == 2 and trainer.global_batch == 8
    result = trainer.fit()
    trainer.close()
    assert result.global_step == 3
    # The LR after 3 steps is that of step 3 of the full 16-step cosine, not of a 3-step schedule.
    import math

    expected = 0.02 * 0.5 * (1 + math.cos(math.pi * 3 / 16))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_fp16_precision_on_cpu_falls_back_with_a_note(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS / "tiny_resnet18_gn.yml",
        flags={"train.output_dir": str(tmp_path), "train.max_steps": 1, "execution.precision": "16.32"},
    )
    messages: list[str] = []
    trainer = Trainer(cfg, log=messages.append)
    trainer.close()
    assert trainer.cfg.execution.precision == "32.32"
    assert any("16.32" in m and "CPU" in m for m in messages)


def test_dataset_too_small_for_global_batch(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS / "tiny_resnet18_gn.yml",
        flags={"train.output_dir": str(tmp_path), "train.global_batch_size": 128},
    )
    with pytest.raises(ValueError, match="smaller than one global batch"):
        Trainer(cfg, log=lambda _: None)


def test_effnet_proxy_recipe_smoke(tmp_path: Path) -> None:
    """The shipped EfficientNet-B0 LN+PN recipe (TF RMSprop, mixup/cutmix, checkpoint averaging) runs a few steps."""
    cfg = load_config(
        CONFIGS / "tiny_effnet_b0_proxy.yml", flags={"train.output_dir": str(tmp_path), "train.max_steps": 2}
    )
    result = train(cfg, log=lambda _: None)
    assert result.global_step == 2
    assert {"top1", "avg_top1"} <= result.final_metrics.keys()


@pytest.mark.slow
def test_nf_resnet50_agc_smoke(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS / "tiny_nf_resnet50_agc.yml", flags={"train.output_dir": str(tmp_path), "train.max_steps": 1}
    )
    assert train(cfg, log=lambda _: None).global_step == 1


class FakeIpuBackend(TorchBackend):
    """A CPU stand-in for an IPU backend with device_iterations: one call = D optimizer steps, LR fixed in a call."""

    def __init__(self, device_iterations: int) -> None:
        super().__init__("cpu", DistInfo())
        self.name = "fake-ipu"
        self.d = device_iterations
        self.calls = 0

    @property
    def micro_batches_per_step(self) -> int:
        return self.accum * self.d

    def prepare(self, model, optimizer, plan, spec) -> None:
        self.accum = plan.gradient_accumulation
        super().prepare(model, optimizer, plan, spec)

    def train_step(self, micro_batches):
        self.calls += 1
        assert len(micro_batches) == self.micro_batches_per_step
        results = [
            super(FakeIpuBackend, self).train_step(micro_batches[i * self.accum : (i + 1) * self.accum])
            for i in range(self.d)
        ]
        return type(results[0])(loss=sum(r.loss for r in results) / self.d, samples=sum(r.samples for r in results))


def test_device_iterations_backend_bookkeeping(tmp_path: Path) -> None:
    """A backend running 2 optimizer steps per call: same weights as 1 step per call (constant LR, no EMA),
    steps/checkpoints/resume positions counted in optimizer steps."""
    flags = {"optim.schedule": "constant", "train.ema_decay": None, "train.checkpoint_every_steps": 3}
    initial: dict[str, torch.Tensor] = {}
    ref = train(
        load_config(CONFIGS / "tiny_resnet18_gn.yml", flags={**flags, "train.output_dir": str(tmp_path / "a")}),
        log=lambda _: None,
        model_hook=lambda m: initial.update({k: v.clone() for k, v in m.state_dict().items()}),
    )
    cfg = load_config(
        CONFIGS / "tiny_resnet18_gn.yml",
        flags={
            **flags,
            "train.output_dir": str(tmp_path / "b"),
            "execution.device": "ipu",
            "execution.device_iterations": 2,
        },
    )
    backend = FakeIpuBackend(2)
    trainer = Trainer(cfg, log=lambda _: None, backend=backend)
    assert trainer.micro_per_call == 4 and trainer.steps_per_epoch == 8 and trainer.calls_per_epoch == 4
    result = trainer.fit()
    trainer.close()
    assert result.global_step == ref.global_step == 16 and backend.calls == 8
    # checkpoint_every_steps 3 with steps advancing by 2: saved after steps 4, 6, 10, 12, 16 (crossing multiples of 3).
    from ipu_norm.train.checkpoint import list_checkpoints, load_checkpoint

    steps = [int(p.name[9:18]) for p in list_checkpoints(tmp_path / "b" / "checkpoints")]
    assert steps == [10, 12, 16]  # the last 3 (keep_checkpoints) of 4, 6, 10, 12, 16
    a = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _relative_change(initial, a) > 0.01  # both runs trained (measured: 0.036), not just agreed


@pytest.mark.slow
def test_torch_compile_backend_matches_eager() -> None:
    """execution.compile: the compiled model takes the same step as eager (inductor needs a C++ compiler)."""
    x, y = _batch(4)
    models = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = TinyGN()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        backend = TorchBackend("cpu", DistInfo())
        plan = SimpleNamespace(precision="32.32", compile=compile_)
        backend.prepare(model, opt, plan, TrainSpec(criterion=nn.CrossEntropyLoss()))
        backend.train_step([(x[:2], y[:2]), (x[2:], y[2:])])
        models.append(model)
    torch.manual_seed(0)
    ref_model = TinyGN()
    initial = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref = _sgd_reference(ref_model, x, y, steps=1, momentum=0.0)
    assert _relative_change(initial, ref) > 1e-3
    for model in models:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_grad_scaler_path_unscales_before_agc_and_skips_overflow() -> None:
    """The fp16 path's GradScaler logic, exercised on CPU with fp32 compute: with loss scaling the AGC-clipped
    update equals the unscaled one (AGC sees unscaled gradients); an inf gradient skips the step."""
    x, y = _batch(6, seed=3)
    results = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = TinyGN()
        backend, _ = _backend(model, agc=0.01)
        if scaled:
            backend.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        r = backend.train_step([(x[:3], y[:3]), (x[3:], y[3:])])
        assert not r.skipped
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    # Independent reference: timm's AGC on the full-batch gradient, then one SGD step written out.
    torch.manual_seed(0)
    ref_model = TinyGN()
    initial = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref = _sgd_reference(ref_model, x, y, steps=1, agc=0.01)
    assert _relative_change(initial, ref) > 1e-3  # the step moved the weights (measured: 0.005)
    for result in results:
        for k in result:
            torch.testing.assert_close(result[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    # Overflow: a non-finite loss makes every gradient inf/nan; the scaler skips the step and lowers the scale.
    torch.manual_seed(0)
    model = TinyGN()
    backend, _ = _backend(model)
    backend.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    r = backend.train_step([(bad, y)])
    assert r.skipped and backend.scaler.get_scale() < 2.0**12
    for k in before:
        assert torch.equal(before[k], model.state_dict()[k]), k
    assert backend.state_dict()["scaler"]["scale"] < 2.0**12  # saved in checkpoints
