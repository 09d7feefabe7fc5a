"""execution.recompute on CPU/GPU: the IPU plan's recomputation points run as torch.utils.checkpoint segments.

Recomputation must not change the numbers (same final weights as a run without it) and must reduce what
autograd saves for backward.
"""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from ipu_norm.config.loader import load_config
from ipu_norm.core.plan import build_plan
from ipu_norm.parallel.stages import build_local_model
from ipu_norm.train.builders import build_model
from ipu_norm.train.trainer import train


def _final_weights(tmp_path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    cfg = load_config("configs/tiny_resnet18_gn.yml", overrides=[
        f"train.output_dir={tmp_path / name}", "train.epochs=1", "train.ema_decay=null", *overrides,
    ])
    result = train(cfg, log=lambda msg: None)
    return torch.load(result.last_checkpoint, weights_only=True)["model"]


@pytest.mark.parametrize(("norm", "threads"), [("gn", None), ("gn", 1), ("gn+pn", 1)])
def test_recompute_gives_the_same_weights_as_plain_training(tmp_path, norm: str, threads: int | None) -> None:
    # One thread: the fused CPU norm kernels (and for gn+pn the batched proxy statistics) run inside the
    # recomputed segments; with torch's default threads, ATen's kernels.
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        plain = _final_weights(tmp_path, "plain", f"model.norm={norm}")
        recomputed = _final_weights(tmp_path, "recompute", f"model.norm={norm}", "execution.recompute=auto")
    finally:
        torch.set_num_threads(previous)
    assert plain.keys() == recomputed.keys()
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-5, atol=1e-6)


def test_recompute_saves_fewer_activations() -> None:
    cfg = load_config("configs/tiny_resnet18_gn.yml", overrides=["execution.recompute=auto"])
    model = build_model(cfg.model)
    plan = build_plan(cfg.execution, model, cfg.train)
    local = build_local_model(model, plan, autocast=False).train()
    x = torch.randn(4, 3, 32, 32)

    def saved_bytes(module: torch.nn.Module) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            module(x).sum()
        return sum(storages.values())

    assert saved_bytes(local) < 0.5 * saved_bytes(model)
    torch.testing.assert_close(local(x), model(x))
