"""The fine-tuning stage at test resolution (issue 11, item 4): tiny runs on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import run_train
from ipu_norm.config import ConfigError, load_config
from ipu_norm.train.builders import build_model
from ipu_norm.train.checkpoint import list_checkpoints, load_checkpoint
from ipu_norm.train.finetune import finetune_config, freeze_before, prepare_model, train_and_finetune
from ipu_norm.train.metrics import read_jsonl
from ipu_norm.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_resnet18_gn.yml"
# Tiny ResNet-18 with BatchNorm (frozen BNs must keep their statistics) trained at 16 px, tested at 24 px:
# the shape of a half-resolution run. 64 samples, global batch 8: 8 steps per epoch.
OVERRIDES = [
    "model.norm=bn",
    "data.test_size=24",
    "train.epochs=1",
    "finetune.enabled=true",
    "finetune.epochs=1",
    "finetune.first_trainable=blocks.2",
    "finetune.lr=0.05",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path: Path, *extra: str):
    return load_config(TINY, [*OVERRIDES, *extra], {"train.output_dir": str(tmp_path / "run")})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One main run + its fine-tuning (train_and_finetune, as run_train.py does)."""
    tmp = tmp_path_factory.mktemp("ft")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _cfg(tmp)
        result = train_and_finetune(cfg, log=lambda _: None)
    finally:
        torch.set_num_threads(n)
    return cfg, tmp / "run", result


def test_finetune_writes_its_own_metrics_checkpoints_and_config(finished) -> None:
    _, run, result = finished
    ft = run / "finetune"
    assert result.run_dir == ft and result.global_step == 8 and result.epoch == 1
    assert {"top1", "top5", "val_loss"} <= result.final_metrics.keys()
    assert "ema_top1" not in result.final_metrics  # no EMA during fine-tuning
    records = read_jsonl(ft / "metrics.jsonl")
    assert [r["kind"] for r in records].count("val") == 1 and records[-1]["kind"] == "val"
    assert (ft / "final_metrics.json").is_file() and (ft / "metrics.csv").is_file()
    assert [p.name for p in list_checkpoints(ft / "checkpoints")] == ["ckpt_step000000008.pt"]
    # The main run's files are untouched by the stage.
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt_step000000008.pt"]
    assert len([r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "val"]) == 1
    saved = yaml.safe_load((ft / "config.yaml").read_text())
    assert saved["data"]["train_size"] == saved["data"]["test_size"] == 24  # the test resolution
    assert saved["data"]["train_augment"] is False
    assert saved["optim"].items() >= {"name": "sgd", "lr": 0.05, "momentum": 0.0, "schedule": "cosine"}.items()
    assert saved["optim"]["warmup_epochs"] == 0
    assert saved["train"]["mixup_alpha"] == saved["train"]["cutmix_alpha"] == 0
    assert saved["train"]["ema_decay"] is None and saved["finetune"]["enabled"] is False


def test_frozen_layers_are_unchanged_and_the_rest_is_trained(finished) -> None:
    cfg, run, _ = finished
    src = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    start = src["ema"]  # the tiny config has an EMA: fine-tuning starts from it (finetune.from_ema)
    end = load_checkpoint(list_checkpoints(run / "finetune" / "checkpoints")[-1])["model"]
    frozen = [k for k in start if k.startswith(("stem.", "blocks.0.", "blocks.1."))]
    trained = [k for k in start if k.startswith(("blocks.2.", "blocks.7.", "head.")) and k.endswith("weight")]
    assert frozen and trained
    for k in frozen:  # weights and BatchNorm running statistics
        assert torch.equal(start[k], end[k]), k
    assert any("running_mean" in k for k in frozen)
    for k in trained:
        assert not torch.equal(start[k], end[k]), k
    # Later BatchNorms did train: their running statistics moved.
    assert not torch.equal(start["blocks.7.norm2.running_mean"], end["blocks.7.norm2.running_mean"])


def test_stage_trainer_uses_test_resolution_eval_transform_and_frozen_optimizer(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    ft_cfg = finetune_config(cfg, tmp_path / "run")
    model = build_model(cfg.model)
    state = {"model": model.state_dict(), "ema": None, "progress": {"global_step": 0}}
    trainer = Trainer(ft_cfg, log=lambda _: None, model_hook=prepare_model(state, Path("src.pt"), ft_cfg, print))
    try:
        assert trainer.train_size == trainer.test_size == 24
        image, _ = trainer.train_set[0]
        assert image.shape == (3, 24, 24)  # generated data: no transform (image folders: the next test)
        opt = trainer.optimizer
        assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.0
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        for name, p in trainer.model.named_parameters():
            assert p.requires_grad == name.startswith(("blocks.2.", "blocks.3.", "blocks.4.", "blocks.5.",
                                                        "blocks.6.", "blocks.7.", "head.")), name
            assert (id(p) in in_opt) == p.requires_grad, name
        trainer.model.train()  # what every training step does: frozen BN/dropout stay in eval mode
        assert not trainer.model.stem.norm.training and not trainer.model.blocks[1].norm2.training
        assert trainer.model.blocks[2].norm1.training and trainer.model.head.training
    finally:
        trainer.close()


def test_imagefolder_train_split_gets_the_eval_transform(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from ipu_norm.data import build_dataset

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
            tmp_path / split / "a" / "0.png"
        )
    kw = dict(root=tmp_path, image_size=24, test_size=16, num_classes=1, generated_samples=1, seed=0)
    plain = build_dataset("imagefolder", "train", train_augment=False, **kw)
    ref = build_dataset("imagefolder", "val", **{**kw, "test_size": 24})
    x, _ = plain[0]
    assert x.shape == (3, 24, 24) and torch.equal(x, ref[0][0])  # deterministic: resize + centre crop
    plain.set_epoch(3)
    assert torch.equal(plain[0][0], x)


def test_freeze_before_follows_registration_order_and_names_bad_modules() -> None:
    cfg = load_config(TINY, ["model.norm=bn"])
    model = build_model(cfg.model)
    frozen = freeze_before(model, "blocks.2.drop_path")  # a module without parameters: everything before it
    assert "blocks.2.conv2.weight" in frozen and "blocks.2.downsample.conv.weight" in frozen
    assert not any(k.startswith(("blocks.3", "head")) for k in frozen)
    assert freeze_before(build_model(cfg.model), None) == []
    with pytest.raises(ValueError, match=r"finetune.first_trainable: ResNet has no module 'block.2' \(did you mean"):
        freeze_before(model, "block.2")


def test_finetune_from_cli_resumes_an_interrupted_stage(finished, tmp_path: Path, capsys) -> None:
    _, run, _ = finished
    args = ["--config", str(TINY), *[a for o in OVERRIDES for a in ("--set", o)], "--set", "finetune.enabled=false"]
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    src = list_checkpoints(run / "checkpoints")[-1]
    (copy / "checkpoints" / src.name).write_bytes(src.read_bytes())
    # Interrupted after 3 of 8 steps (max_steps), then resumed to the end.
    assert run_train.main([*args, "--set", "finetune.max_steps=3", "--finetune-from", str(copy)]) == 0
    assert [p.name for p in list_checkpoints(copy / "finetune" / "checkpoints")] == ["ckpt_step000000003.pt"]
    assert run_train.main([*args, "--finetune-from", str(copy), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 3" in out
    ckpts = list_checkpoints(copy / "finetune" / "checkpoints")
    assert ckpts[-1].name == "ckpt_step000000008.pt"
    # Same end point as the uninterrupted stage (CPU, same seeds).
    ref = load_checkpoint(list_checkpoints(run / "finetune" / "checkpoints")[-1])["model"]
    got = load_checkpoint(ckpts[-1])["model"]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_run_capped_by_max_steps_skips_the_stage(tmp_path: Path) -> None:
    logs: list[str] = []
    result = train_and_finetune(_cfg(tmp_path, "train.max_steps=2"), log=logs.append)
    assert result.run_dir == tmp_path / "run" and result.global_step == 2
    assert not (tmp_path / "run" / "finetune").exists()
    assert any("skipping the fine-tuning stage" in m and "--finetune-from" in m for m in logs)


def test_finetune_errors_are_one_line(tmp_path: Path, capsys) -> None:
    base = ["--config", str(TINY), "--output-dir", str(tmp_path / "run")]
    # A bad module name fails before the main training starts.
    assert run_train.main([*base, "--set", "finetune.enabled=true", "--set", "finetune.first_trainable=nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: finetune.first_trainable: ResNet has no module 'nope'")
    assert not (tmp_path / "run").exists()
    # Nothing to fine-tune from.
    (tmp_path / "empty").mkdir()
    assert run_train.main([*base, "--finetune-from", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --finetune-from {tmp_path / 'empty'}: no usable checkpoint in {tmp_path / 'empty'}"]


def test_finetune_from_a_run_of_another_model_is_a_clear_error(finished, tmp_path: Path, capsys) -> None:
    _, run, _ = finished
    # --overwrite: the finished run already has a fine-tuning stage (a new one would be refused first); the old
    # stage is only moved aside once the new one has started, so the weights error leaves it in place.
    argv = ["--config", str(ROOT / "configs" / "tiny_nf_resnet50_agc.yml"), "--finetune-from", str(run), "--overwrite"]
    before = sorted(p.name for p in (run / "finetune").iterdir())
    assert run_train.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its weights do not fit model 'nf_resnet50'" in err[0]
    assert not (run / "finetune" / "checkpoints" / "ckpt_step000000000.pt").exists()
    assert sorted(p.name for p in (run / "finetune").iterdir()) == before
    assert not list(run.glob("finetune.old-*"))


def test_finetune_section_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"finetune.lr: must be > 0"):
        load_config(TINY, ["finetune.lr=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'finetune.frozen'"):
        load_config(TINY, ["finetune.frozen=3"])
    with pytest.raises(ConfigError, match=r"finetune.optimizer: expected one of 'sgd', 'rmsprop', 'adamw'"):
        load_config(TINY, ["finetune.optimizer=lamb"])


def test_shipped_half_resolution_recipe_has_the_stage() -> None:
    cfg = load_config(ROOT / "configs" / "effnet_b0_proxy.yml")
    f = cfg.finetune
    assert f.enabled and f.epochs == 2 and f.optimizer == "sgd" and f.momentum == 0.0
    assert f.first_trainable == "blocks.14" and cfg.data.test_size == 224 and f.image_size is None
    model = build_model(cfg.model)
    frozen = freeze_before(model, f.first_trainable)
    assert frozen[0].startswith("stem.")
    assert not any(k.startswith(("blocks.14.", "blocks.15.", "head.")) for k in frozen)
    assert not load_config(ROOT / "configs" / "effnet_b0_bn.yml").finetune.enabled  # full resolution already


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning with frozen layers for every norm, and every shipped tiny config run to its end.


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "gn+pn", "ln+pn"])
def test_finetune_with_frozen_layers_every_norm(norm: str, tmp_path: Path) -> None:
    """Main run + fine-tuning stage with the first blocks frozen: frozen tensors bitwise unchanged, later ones
    trained (the former cached Proxy Norm statistics crashed here with frozen PN layers)."""
    cfg = _cfg(tmp_path, f"model.norm={norm}", "data.generated_samples=16", "data.generated_val_samples=8",
               "train.global_batch_size=8", "data.test_size=16")
    result = train_and_finetune(cfg, log=lambda _: None)
    run = tmp_path / "run"
    assert result.run_dir == run / "finetune" and result.global_step == 2
    start = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["ema"]
    end = load_checkpoint(list_checkpoints(run / "finetune" / "checkpoints")[-1])["model"]
    frozen = [k for k in start if k.startswith(("stem.", "blocks.0.", "blocks.1."))]
    trained = [k for k in start if k.startswith(("blocks.2.", "head.")) and k.endswith("weight")]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(start[k], end[k]), k
    assert any(not torch.equal(start[k], end[k]) for k in trained)
    if norm.endswith("+pn"):
        assert any("proxy_weight" in k for k in frozen) and any("proxy_weight" in k for k in trained)


def test_finetune_nf_resnet_with_agc_and_frozen_layers(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny_nf_resnet50_agc.yml",
                      ["finetune.enabled=true", "finetune.epochs=1", "finetune.first_trainable=blocks.2",
                       "finetune.micro_batch_size=2", "data.test_size=32"],
                      {"train.output_dir": str(tmp_path / "run")})
    result = train_and_finetune(cfg, log=lambda _: None)
    run = tmp_path / "run"
    assert result.run_dir == run / "finetune"
    start = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["model"]
    end = load_checkpoint(list_checkpoints(run / "finetune" / "checkpoints")[-1])["model"]
    frozen = [k for k in start if k.startswith(("stem.", "blocks.0.", "blocks.1."))]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("blocks.2."))


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("tiny_*.yml")
                                          if p.name != "tiny_base.yml"))
def test_every_tiny_config_runs_to_the_end(config: str, tmp_path: Path, capsys) -> None:
    """run_train.py's entry in-process, as a user runs it: exit code 0 and its final line (fine-tuning included)."""
    rc = run_train.main(["--config", str(ROOT / "configs" / config), "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0, out[-2000:]
    assert "run summary" in out and "top-1 (final)" in out  # the closing table of a finished run
    cfg = load_config(ROOT / "configs" / config)
    if cfg.finetune.enabled:
        assert (tmp_path / "run" / "finetune" / "final_metrics.json").is_file()
