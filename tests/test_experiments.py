"""Experiments: batch dependence (digits) and signal propagation at init, smoke + quantitative checks."""

from __future__ import annotations

import json

import pytest
import torch

from ipu_norm.experiments import batch_dependence as bd
from ipu_norm.experiments import signal_prop as sp


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tiny models run several times faster on one thread than on two busy ones.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ---------------------------------------------------------------- signal propagation


def test_channel_stats_by_hand() -> None:
    # Channel 0 constant 2 (mean 2, var 0); channel 1 values -1/+1 (mean 0, var 1).
    x = torch.zeros(2, 2, 1, 2)
    x[:, 0] = 2.0
    x[0, 1] = torch.tensor([[-1.0, 1.0]])
    x[1, 1] = torch.tensor([[1.0, -1.0]])
    sq_mean, var = sp.channel_stats(x)
    assert sq_mean == pytest.approx((4.0 + 0.0) / 2)
    assert var == pytest.approx((0.0 + 1.0) / 2)


@pytest.fixture(scope="module")
def small_signal_prop() -> dict:
    torch.manual_seed(0)
    # 128 px keeps the last stage at 4x4, where the 3x3 convs' zero padding does not dominate.
    return sp.run(arch="resnet18", norms=("bn", "ln", "ln+pn"), include_nf=True, batch=4, resolution=128)


def test_signal_prop_bn_branch_is_normalised(small_signal_prop: dict) -> None:
    # BN in training mode: the last norm of every branch outputs exactly zero-mean, unit-variance channels.
    for r in small_signal_prop["models"]["bn"]:
        assert r["branch_sq_mean"] < 1e-10
        assert r["branch_var"] == pytest.approx(1.0, rel=1e-3)


def test_signal_prop_pn_removes_channel_mean_shift(small_signal_prop: dict) -> None:
    m = small_signal_prop["models"]
    last = len(m["ln"]) - 1
    # PN centres every post-activation channel, so the next conv (and the branch) has smaller channel means.
    assert m["ln+pn"][last]["branch_sq_mean"] < 0.8 * m["ln"][last]["branch_sq_mean"]
    assert m["ln+pn"][last]["stream_sq_mean"] < m["ln"][last]["stream_sq_mean"]


def test_signal_prop_nf_variance_law(small_signal_prop: dict) -> None:
    law = small_signal_prop["nf_law"]
    assert law is not None and len(law) == 8
    for r in law:
        # Relative to the stage's reset value the second moment follows 1 + k alpha^2 (the transition blocks
        # sit a little above: their strided branch keeps the variance the shortcut's 2x2 average pool loses).
        assert r["relative_second_moment"] == pytest.approx(r["law"], rel=0.15)
    # Away from the stem (whose max-pool output is far from zero-mean), each branch adds ~alpha^2.
    gains = [r["branch_gain"] for r in law[1:]]
    assert all(0.5 * 0.04 < g < 1.5 * 0.04 for g in gains)


def test_nf_branch_init_default_is_zero_branch() -> None:
    model = sp.build_model("nf", "resnet18", nf_branch_init="default")
    stats = sp.measure(model, torch.randn(2, 3, 64, 64))
    assert all(s.branch_var == 0.0 for s in stats)


def test_signal_prop_cli_writes_outputs(tmp_path) -> None:  # noqa: ANN001
    sp.main(["--arch", "resnet18", "--norms", "gn", "gn+pn", "--batch", "2", "--resolution", "32",
             "--out", str(tmp_path)])
    assert (tmp_path / "signal_prop.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "signal_prop.json").read_text())
    assert set(saved["models"]) == {"gn", "gn+pn", "nf_resnet18"}
    assert "gn+pn" in (tmp_path / "signal_prop.md").read_text()


# ---------------------------------------------------------------- batch dependence


@pytest.fixture(scope="module")
def tiny_digits() -> bd.Digits:
    return bd.load_digits(image_size=16, limit_per_class=6)


def test_digits_tensors(tiny_digits: bd.Digits) -> None:
    d = tiny_digits
    assert d.x_train.shape[1:] == (3, 16, 16) and len(d.x_train) + len(d.x_val) == 60
    assert set(d.y_train.tolist()) == set(range(10))


def test_batch_order_is_deterministic_and_epoch_complete() -> None:
    a = bd.batch_order(100, steps=6, global_batch=32, seed=3)
    assert torch.equal(a, bd.batch_order(100, steps=6, global_batch=32, seed=3))
    assert a.shape == (6, 32)
    assert len(set(a[:3].flatten().tolist())) == 96  # one epoch: no repeats


def test_lr_schedule() -> None:
    assert bd.lr_at(0, 100, 0.1, 10) == pytest.approx(0.01)
    assert bd.lr_at(10, 100, 0.1, 10) == pytest.approx(0.1)
    assert bd.lr_at(100, 100, 0.1, 10) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("norm", ["gn+pn", "nf"])
def test_batch_independent_norms_do_not_depend_on_micro_batch(norm: str, tiny_digits: bd.Digits) -> None:
    # Same seed, same global batches: accumulation over micro-batches of 4 or one batch of 32 gives the same
    # gradient (up to float summation order), so the same training trajectory. NF includes AGC, applied to
    # the accumulated gradient.
    r1 = bd.train_one(norm, 4, tiny_digits, steps=2)
    r32 = bd.train_one(norm, 32, tiny_digits, steps=2)
    assert r1["train_loss_end"] == pytest.approx(r32["train_loss_end"], rel=1e-4)
    assert r1["val_loss"] == pytest.approx(r32["val_loss"], rel=1e-4)


def test_micro_batch_agc_equals_step_agc_without_accumulation(tiny_digits: bd.Digits) -> None:
    # At micro-batch 32 (no accumulation) clipping each micro-batch is clipping the step's gradient; at
    # micro-batch 4 the sum of clipped gradients is another update (clipping is not linear).
    step32, micro32 = (bd.train_one(n, 32, tiny_digits, steps=4) for n in ("nf", "nf_micro"))
    assert micro32["val_loss"] == pytest.approx(step32["val_loss"], rel=1e-5)
    step4, micro4 = (bd.train_one(n, 4, tiny_digits, steps=4) for n in ("nf", "nf_micro"))
    assert step4["val_loss"] == pytest.approx(step32["val_loss"], rel=1e-4)
    assert abs(micro4["val_loss"] - step4["val_loss"]) > 1e-3


def test_batchnorm_depends_on_micro_batch(tiny_digits: bd.Digits) -> None:
    r1 = bd.train_one("bn", 4, tiny_digits, steps=2)
    r32 = bd.train_one("bn", 32, tiny_digits, steps=2)
    assert abs(r1["train_loss_end"] - r32["train_loss_end"]) > 1e-3


def test_batch_dependence_cli_smoke(tmp_path) -> None:  # noqa: ANN001
    result = bd.main(["--steps", "2", "--limit-per-class", "6", "--micro-batches", "8", "32", "--norms", "bn",
                      "ln+pn", "--workers", "1", "--out", str(tmp_path)])
    assert (tmp_path / "batch_dependence.png").stat().st_size > 10_000
    assert len(result["runs"]) == 4 and all(r["steps"] == 2 for r in result["runs"])
    table = (tmp_path / "batch_dependence.md").read_text()
    assert "LN+PN" in table and "micro-batch 8 (x4)" in table
