"""Config system: every shipped config validates; inheritance, overrides and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipu_norm.config import Config, ConfigError, deep_merge, load_config, load_config_with_sources
from ipu_norm.config.cli import parse_args

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yml"))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_config_dir_is_not_empty() -> None:
    names = {p.name for p in ALL_CONFIGS}
    for required in (
        "effnet_b0_proxy.yml",
        "effnet_b0_bn.yml",
        "effnet_b0_g16_gn_proxy.yml",
        "resnet50_bn.yml",
        "resnet50_gn_proxy.yml",
        "nfnet_f0_agc.yml",
        "nf_resnet50_agc.yml",
        "base.yml",
    ):
        assert required in names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[p.name for p in ALL_CONFIGS])
def test_every_shipped_config_validates(path: Path) -> None:
    """Schema validation, then the model builds with the config's options (on the meta device: shapes only)
    and the execution plan (batch arithmetic, pipeline splits) is consistent."""
    import torch

    from ipu_norm.core.plan import build_plan
    from ipu_norm.train.builders import build_model

    cfg = load_config(path)
    assert isinstance(cfg, Config)
    if path.name.startswith("tiny_"):
        assert cfg.execution.device == "cpu" and cfg.data.num_workers == 0
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert model.get_classifier().out_features == cfg.model.num_classes
    plan = build_plan(cfg.execution, model, cfg.train)
    if cfg.train.global_batch_size is not None:
        assert plan.global_batch_size == cfg.train.global_batch_size


def test_effnet_b0_proxy_recipe() -> None:
    cfg = load_config(CONFIG_DIR / "effnet_b0_proxy.yml")
    assert (cfg.model.name, cfg.model.norm) == ("efficientnet_b0", "ln+pn")
    assert cfg.optim.name == "rmsprop_tf" and cfg.train.label_smoothing == 0.1 and cfg.train.ema_decay is None
    # Graphcore's published values (graphcore/examples vision/cnns/pytorch/train/configs.yml, EfficientNet base)
    assert (cfg.optim.alpha, cfg.optim.eps, cfg.optim.momentum, cfg.optim.weight_decay) == (0.953125, 1e-3, 0.9, 1e-5)
    assert (cfg.train.weight_avg_strategy, cfg.train.weight_avg_exp_decay) == ("exponential", 0.97)
    assert cfg.execution.loss_scaling == 128 and cfg.optim.decay_epochs == pytest.approx(1 / 0.424, rel=1e-4)
    assert (cfg.data.train_size, cfg.data.test_size) == (160, 224)
    assert cfg.train.micro_batch_size == 24 and cfg.train.global_batch_size == 768
    assert cfg.train.mixup_alpha > 0 and cfg.train.cutmix_alpha > 0
    assert cfg.data.dataset == "generated"
    assert cfg.execution.precision == "16.32"


def test_inheritance_deep_merge_relative_base(tmp_path: Path) -> None:
    _write(tmp_path, "shared/base.yml", "optim: {lr: 0.5, momentum: 0.8}\ntrain: {epochs: 3}\n")
    child = _write(tmp_path, "exp/child.yml", "base: ../shared/base.yml\noptim: {lr: 0.25}\n")
    cfg, sources = load_config_with_sources(child)
    assert cfg.optim.lr == 0.25 and cfg.optim.momentum == 0.8 and cfg.train.epochs == 3
    assert sources["optim.lr"].endswith("child.yml") and sources["optim.momentum"].endswith("base.yml")


def test_multiple_bases_merge_in_order(tmp_path: Path) -> None:
    _write(tmp_path, "a.yml", "train: {epochs: 1, seed: 1}\n")
    _write(tmp_path, "b.yml", "train: {epochs: 2}\n")
    c = _write(tmp_path, "c.yml", "base: [a.yml, b.yml]\n")
    cfg = load_config(c)
    assert cfg.train.epochs == 2 and cfg.train.seed == 1


def test_deep_merge_replaces_lists_and_scalars() -> None:
    assert deep_merge({"a": {"x": [1, 2], "y": 1}}, {"a": {"x": [3]}}) == {"a": {"x": [3], "y": 1}}


def test_inheritance_cycle_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "a.yml", "base: b.yml\n")
    _write(tmp_path, "b.yml", "base: a.yml\n")
    with pytest.raises(ConfigError, match="cyclic"):
        load_config(tmp_path / "a.yml")


def test_missing_base_is_an_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "a.yml", "base: nope.yml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(p)


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path: Path) -> None:
    _write(tmp_path, "base.yml", "optim: {lr: 0.1}\n")
    child = _write(tmp_path, "child.yml", "base: base.yml\noptim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    msg = str(exc.value)
    assert "child.yml" in msg and "optim.learning_rate" in msg and "allowed keys" in msg and "momentum" in msg


def test_unknown_section(tmp_path: Path) -> None:
    p = _write(tmp_path, "a.yml", "optimizer: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="unknown key 'optimizer'.*execution"):
        load_config(p)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("train: {epochs: three}\n", "train.epochs", "expected int"),
        ("train: {epochs: 2.5}\n", "train.epochs", "expected int"),
        ("train: {epochs: true}\n", "train.epochs", "expected int"),  # bool is not an int here
        ("train: {deterministic: 1}\n", "train.deterministic", "expected bool"),
        ("optim: {lr: fast}\n", "optim.lr", "expected float"),
        ("optim: {name: lamb}\n", "optim.name", "one of 'sgd', 'rmsprop', 'adamw'"),
        ("execution: {precision: '8.8'}\n", "execution.precision", "one of"),
        ("execution: {pipeline_splits: blocks.3}\n", "execution.pipeline_splits", "list of string"),
        ("model: {kwargs: [1]}\n", "model.kwargs", "mapping"),
        ("model: 3\n", "model", "expected a mapping"),
    ],
)
def test_wrong_types_name_file_key_and_type(tmp_path: Path, text: str, key: str, expected: str) -> None:
    p = _write(tmp_path, "bad.yml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "bad.yml" in msg and key in msg and expected in msg


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("model: {norm: bn+pn}\n", "model.norm"),
        ("model: {name: resnet51}\n", "model.name"),
        ("optim: {lr: -1}\n", "optim.lr"),
        ("train: {micro_batch_size: 0}\n", "train.micro_batch_size"),
        ("train: {ema_decay: 1.5}\n", "train.ema_decay"),
        ("execution: {loss_scaling: lots}\n", "execution.loss_scaling"),
        ("execution: {available_memory_proportion: [0.5, 1.5]}\n", "execution.available_memory_proportion"),
        ("data: {dataset: imagefolder}\n", "data.root"),
        ("optim: {name: adamw, nesterov: true}\n", "optim.nesterov"),
    ],
)
def test_value_checks_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    p = _write(tmp_path, "bad.yml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "bad.yml" in str(exc.value) and key in str(exc.value)


def test_unknown_model_suggests_close_names(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad.yml", "model: {name: resnet51}\n")
    with pytest.raises(ConfigError, match="did you mean.*resnet50"):
        load_config(p)


def test_norm_is_normalised_and_yaml_quirks_accepted(tmp_path: Path) -> None:
    # PyYAML reads 16.32 as a float and 1e-3 (no dot) as a string: both are accepted for their fields.
    p = _write(
        tmp_path, "a.yml", "model: {norm: ' LN+PN'}\nexecution: {precision: 16.32}\noptim: {weight_decay: 1e-3}\n"
    )
    cfg = load_config(p)
    assert cfg.model.norm == "ln+pn" and cfg.execution.precision == "16.32" and cfg.optim.weight_decay == 1e-3
    p2 = _write(tmp_path, "b.yml", "execution: {precision: 32.32, loss_scaling: 128}\n")
    cfg2 = load_config(p2)
    assert cfg2.execution.precision == "32.32" and cfg2.execution.loss_scaling == 128.0



def test_yaml_1_1_words_are_strings_not_booleans(tmp_path: Path) -> None:
    # YAML 1.1 reads off/on/yes/no as booleans; the enum value `off` must reach its field as the string it is,
    # from a file and from --set, while true/false stay booleans.
    p = _write(tmp_path, "a.yml", "execution: {memory_check: off, compile: true}\n")
    cfg = load_config(p)
    assert cfg.execution.memory_check == "off" and cfg.execution.compile is True
    _, cfg2, _ = parse_args(["--config", str(p), "--set", "execution.memory_check=warn", "--set",
                             "execution.compile=False"])
    assert cfg2.execution.memory_check == "warn" and cfg2.execution.compile is False
    _, cfg3, _ = parse_args(["--config", str(p), "--set", "execution.memory_check=off"])
    assert cfg3.execution.memory_check == "off"
    with pytest.raises(ConfigError, match="execution.compile"):
        load_config(_write(tmp_path, "b.yml", "execution: {compile: yes}\n"))

def test_cli_set_and_flags_override_yaml(tmp_path: Path) -> None:
    p = _write(tmp_path, "a.yml", "optim: {lr: 0.5}\ntrain: {epochs: 3, max_steps: 7}\nmodel: {norm: bn}\n")
    args, cfg, sources = parse_args(
        [
            "--config",
            str(p),
            "--set",
            "optim.lr=0.1",
            "--set",
            "model.norm=gn+pn",
            "--set",
            "optim.agc_clip=null",
            "--set",
            "execution.pipeline_splits=[blocks.3, blocks.9]",
            "--set",
            "train.epochs=4",
            "--epochs",
            "9",  # dedicated flags win over --set and YAML
            "--max-steps",
            "20",
            "--micro-batch-size",
            "6",
            "--device",
            "cpu",
            "--output-dir",
            str(tmp_path / "out"),
            "--data",
            "digits",
            "--data-root",
            str(tmp_path / "digits"),
            "--resume",
        ]
    )
    assert cfg.optim.lr == 0.1 and cfg.model.norm == "gn+pn" and cfg.optim.agc_clip is None
    assert cfg.execution.pipeline_splits == ["blocks.3", "blocks.9"]
    assert cfg.train.epochs == 9 and cfg.train.max_steps == 20 and cfg.train.micro_batch_size == 6
    assert cfg.execution.device == "cpu" and cfg.train.output_dir == str(tmp_path / "out")
    assert cfg.data.dataset == "digits" and cfg.data.root == str(tmp_path / "digits")
    assert args.resume == "latest"
    assert sources["train.epochs"] == "--epochs" and sources["optim.lr"].startswith("--set")


def test_cli_resume_with_path_and_bad_override(tmp_path: Path) -> None:
    p = _write(tmp_path, "a.yml", "train: {epochs: 1}\n")
    args, _, _ = parse_args(["--config", str(p), "--resume", "x/ckpt.pt"])
    assert args.resume == "x/ckpt.pt"
    args, _, _ = parse_args(["--config", str(p)])
    assert args.resume is None
    with pytest.raises(ConfigError, match="--set optim.lrr=1.*optim.lrr"):
        parse_args(["--config", str(p), "--set", "optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_args(["--config", str(p), "--set", "optim.lr"])
    with pytest.raises(ConfigError, match="--set train.epochs=x.*expected int"):
        parse_args(["--config", str(p), "--set", "train.epochs=x"])
