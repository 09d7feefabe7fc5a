"""Checkpoint weight averaging (Graphcore's weight_avg_strategy) against float64 references over saved checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ipu_norm.config import ConfigError, load_config
from ipu_norm.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ipu_norm.train.weight_avg import average_checkpoints, average_state_dicts, find_averaged

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _save_series(directory: Path, n: int, keep: int) -> list[dict[str, torch.Tensor]]:
    """n checkpoints of a model whose weights and BN statistics change between saves; returns their states."""
    torch.manual_seed(0)
    model = _model()
    states = []
    for step in range(1, n + 1):
        with torch.no_grad():
            for t in list(model.parameters()) + [model[1].running_mean, model[1].running_var]:
                t.add_(torch.randn_like(t))
            model[1].num_batches_tracked += 1
        state = {k: v.clone() for k, v in model.state_dict().items()}
        states.append(state)
        entry = {"model": state, "optimizer": {}, "progress": {"global_step": step * 10}, "ema": None}
        save_checkpoint(entry, directory, step * 10, keep)
    return states


def _reference(states: list[dict[str, torch.Tensor]], strategy: str, decay: float) -> dict[str, list[float]]:
    """float64 in plain Python: exponential = first, then d*avg + (1-d)*x; mean = sum / n."""
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            continue
        cols = [s[key].double().flatten().tolist() for s in states]
        if strategy == "mean":
            out[key] = [sum(vals) / len(vals) for vals in zip(*cols)]
        else:
            avg = list(cols[0])
            for col in cols[1:]:
                avg = [decay * a + (1.0 - decay) * x for a, x in zip(avg, col)]
            out[key] = avg
    return out


@pytest.mark.parametrize(("strategy", "last_n"), [("exponential", None), ("mean", None), ("exponential", 3),
                                                  ("mean", 2), ("mean", 9)])
def test_average_of_saved_checkpoints_matches_float64(tmp_path: Path, strategy: str, last_n: int | None) -> None:
    states = _save_series(tmp_path, 5, keep=5)
    weights, path, record = average_checkpoints(tmp_path, strategy, decay=0.97, last_n=last_n)
    used = states[-last_n:] if last_n is not None and last_n <= 5 else states  # Graphcore: N > count means all
    ref = _reference(used, strategy, 0.97)
    for key, values in ref.items():
        got = weights[key]
        assert got.dtype == states[0][key].dtype
        assert torch.allclose(got.double().flatten(), torch.tensor(values, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert torch.equal(weights["1.num_batches_tracked"], states[-1]["1.num_batches_tracked"])  # newest, not averaged
    assert record["steps"] == [10 * (i + 1) for i in range(5)][-len(used):]
    # Saved as a loadable checkpoint that is neither resumed from nor pruned, and carries what was averaged.
    saved = load_checkpoint(path)
    assert path.name == "averaged_step000000050.pt" and path not in list_checkpoints(tmp_path)
    assert saved["weight_avg"]["strategy"] == strategy and saved["ema"] is None
    assert all(torch.equal(saved["model"][k], weights[k]) for k in weights)
    assert find_averaged(list_checkpoints(tmp_path)[-1]) == path


def test_exponential_weights_the_newest_most() -> None:
    """Closed form for scalars 0, 1, 2 with decay 0.5: ((0*.5 + 1*.5)*.5 + 2*.5) = 1.25."""
    states = [{"w": torch.tensor([float(v)])} for v in (0, 1, 2)]
    assert average_state_dicts(states, "exponential", 0.5)["w"].item() == pytest.approx(1.25)
    assert average_state_dicts(states, "mean")["w"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'mean' or 'exponential'"):
        average_state_dicts(states, "none")


def test_config_validation() -> None:
    cfg = load_config(None, flags={"train.weight_avg_strategy": "exponential", "train.weight_avg_N": 3})
    assert cfg.train.weight_avg_exp_decay == 0.97 and cfg.train.keep_checkpoints == 3
    with pytest.raises(ConfigError, match="train.weight_avg_N: averages the last 4 saved checkpoints"):
        load_config(None, flags={"train.weight_avg_strategy": "mean", "train.weight_avg_N": 4})
    with pytest.raises(ConfigError, match="train.weight_avg_exp_decay: must be in"):
        load_config(None, flags={"train.weight_avg_exp_decay": 1.0})
    with pytest.raises(ConfigError, match="train.weight_avg_strategy: expected one of"):
        load_config(None, flags={"train.weight_avg_strategy": "ema"})


@pytest.mark.usefixtures("one_thread")
def test_trainer_averages_after_training_and_validates(tmp_path: Path) -> None:
    from ipu_norm.train.finetune import find_source_checkpoint
    from ipu_norm.train.trainer import train

    cfg = load_config(
        CONFIGS / "tiny_resnet18_gn.yml",
        [f"train.output_dir={tmp_path}", "train.epochs=3", "train.ema_decay=null",
         "train.weight_avg_strategy=exponential", "train.weight_avg_exp_decay=0.9"],
    )
    result = train(cfg, log=lambda _msg: None)
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert len(ckpts) == 3
    states = [load_checkpoint(p)["model"] for p in ckpts]
    averaged = tmp_path / "checkpoints" / f"averaged_step{result.global_step:09d}.pt"
    saved = load_checkpoint(averaged)["model"]
    for key, values in _reference(states, "exponential", 0.9).items():
        assert torch.allclose(saved[key].double().flatten(), torch.tensor(values, dtype=torch.float64), atol=1e-6)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (avg_record,) = [r for r in records if r["kind"] == "val_avg"]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["avg_top1"] == avg_record["top1"] and "top1" in final
    # The averaged model's validation is its own: recompute top-1 with the saved weights.
    from ipu_norm.train.trainer import Trainer

    cfg.train.output_dir = str(tmp_path / "recheck")  # a new run directory: the finished run's is taken
    trainer = Trainer(cfg, log=lambda _msg: None)
    trainer.model.load_state_dict(saved)
    assert trainer.evaluate()["top1"] == pytest.approx(avg_record["top1"])
    trainer.close()
    # The fine-tuning stage starts from the averaged weights, as Graphcore's does.
    path, _ = find_source_checkpoint(tmp_path, report=lambda _msg: None)
    assert path == averaged
