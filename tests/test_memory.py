"""Tests for ipu_norm.memory: measurement vs hand counts, estimate scaling, planner, budget check (tiny models)."""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import combinations

import pytest
import torch
from torch import nn

from ipu_norm.memory.estimate import (
    IPUPlan,
    MemoryBudgetError,
    check_fits_ipu,
    estimate_plan,
    in_flight,
    max_micro_batch,
    memory_balanced_splits,
    plan_fits,
    read_popvision,
    stage_estimate,
    unit_memory_costs,
)
from ipu_norm.memory.measure import (
    ActivationProfile,
    BlockScaling,
    LiveStorageTracker,
    fit_activation_scaling,
    measure_activations,
    measure_peak,
    measure_step,
    tensor_bytes,
)

# ---------------------------------------------------------------------------------------------------------------
# Tiny models


class TinyBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + identity, ReLU (a basic residual block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class TinyResNet(nn.Module):
    """Follows the model contract: stem, blocks (flat Sequential), head; default_cfg."""

    def __init__(self, c: int = 8, n_blocks: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[TinyBlock(c) for _ in range(n_blocks)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
        self.default_cfg = {"train_size": 16, "num_classes": num_classes, "norm": "bn"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# ---------------------------------------------------------------------------------------------------------------
# Measurement against hand counts


def test_conv_relu_saved_bytes_match_hand_count() -> None:
    # Conv2d saves its input for the weight gradient (the weight itself is a parameter: not an activation);
    # ReLU saves its output; the loss out.square().mean() saves `out` again, which is the ReLU output's storage
    # (counted once). Bias gradients need nothing saved.
    n, c_in, c_out, h, w = 2, 3, 5, 6, 7
    model = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())
    m = measure_activations(model, n, 0, input_shape=(c_in, h, w))
    conv, relu = m.blocks
    assert conv.saved_float_elems == n * c_in * h * w
    assert relu.saved_float_elems == n * c_out * h * w
    assert m.extra_float_elems == 0
    assert m.total_bytes(4) == 4 * n * (c_in + c_out) * h * w
    assert m.total_bytes(2) == 2 * n * (c_in + c_out) * h * w  # re-priced at fp16
    assert conv.input_elems == n * c_in * h * w and conv.output_elems == n * c_out * h * w
    assert conv.param_elems == c_out * c_in * 9 + c_out


def test_batchnorm_saved_bytes_affine_in_micro_batch() -> None:
    # Training-mode BatchNorm saves its input (N*C*H*W) and the per-channel batch mean and inverse std (2*C):
    # the constant 2*C is why activations are affine (a + b*mb), not linear, in the micro-batch.
    c, h, w = 4, 5, 5
    model = nn.Sequential(nn.BatchNorm2d(c))
    prof = fit_activation_scaling(model, 0, fit_sizes=(2, 3), verify_sizes=(5,), input_shape=(c, h, w))
    (bn,) = prof.blocks
    assert bn.float_per_sample == pytest.approx(c * h * w)
    assert bn.float_const == pytest.approx(2 * c)
    assert prof.max_rel_error == pytest.approx(0.0, abs=1e-12)


def test_fit_extrapolates_and_verifies() -> None:
    model = TinyResNet()
    prof = fit_activation_scaling(model, 8, fit_sizes=(1, 2), verify_sizes=(5,))
    assert prof.max_rel_error is not None and prof.max_rel_error < 1e-9
    measured = measure_activations(model, 7, 8).total_bytes()
    assert prof.total_bytes(7) == pytest.approx(measured, rel=1e-9)
    assert [b.name for b in prof.blocks] == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]


def test_recompute_saves_only_block_inputs() -> None:
    # Without recomputation a conv -> BN -> ReLU block saves the conv input (block 0 only: later blocks' conv
    # input is the previous ReLU output, counted once), the BN input, BN's batch mean and inverse std (2C) and
    # the ReLU output. With torch.utils.checkpoint around every block the forward saves exactly each block's
    # input (the stash); the loss then saves the model output, which no block saved.
    n, c, h = 2, 4, 6
    model = nn.Sequential(*[
        nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()) for _ in range(2)
    ])
    plain = measure_activations(model, n, 0, input_shape=(c, h, h))
    rc = measure_activations(model, n, 0, input_shape=(c, h, h), recompute=True)
    per = n * c * h * h
    assert [b.saved_float_elems for b in plain.blocks] == [3 * per + 2 * c, 2 * per + 2 * c]
    assert plain.extra_float_elems == 0
    assert [b.saved_float_elems for b in rc.blocks] == [per, per]
    assert rc.extra_float_elems == per
    assert rc.total_bytes() < plain.total_bytes()


def test_optimizer_state_measured_by_optimizer() -> None:
    model = TinyResNet(c=4, n_blocks=1)
    params = list(model.parameters())
    weights = tensor_bytes(params)
    x_shape = (3, 8, 8)
    # Per-parameter 'step' counters are 1-element fp32 tensors for Adam and RMSprop.
    steps = 4 * len(params)
    expect = {
        "sgd": 0,
        "sgd_momentum": weights,
        "adam": 2 * weights + steps,
        "rmsprop": weights + steps,
        "rmsprop_momentum": 2 * weights + steps,
    }
    for name, state in expect.items():
        pk = measure_peak(model, 2, 0, optimizer=name, input_shape=x_shape)
        assert pk.optimizer_state_bytes == state, name
        assert pk.grad_bytes == weights
        assert pk.peak_step >= weights + pk.grad_bytes + state
    assert all(p.grad is None for p in model.parameters())  # measured on a copy


def test_live_storage_tracker_counts_and_releases() -> None:
    with LiveStorageTracker() as tr:
        a = torch.ones(1000)  # 4000 B
        b = torch.ones(2000)  # 8000 B
        v = b[10:]  # a view: no new storage
        b.add_(1)  # in place: no new storage
        assert tr.live == 12000 and tr.peak == 12000
        del a
        c = torch.ones(500)
        assert tr.live == 10000 and tr.peak == 12000
    del b, v, c


def test_measured_peak_covers_weights_and_activations() -> None:
    model = TinyResNet()
    s = measure_step(model, 4, 8, optimizer="sgd_momentum")
    assert s.weight_bytes == s.grad_bytes == s.optimizer_state_bytes
    # At the end of the forward, weights and every saved activation are live at once.
    assert s.peak_bytes >= s.weight_bytes + s.activation_bytes
    assert s.peak_step_bytes >= s.weight_bytes + s.grad_bytes + s.optimizer_state_bytes
    rc = measure_step(model, 4, 8, optimizer="sgd_momentum", recompute=True)
    assert rc.activation_bytes < s.activation_bytes


# ---------------------------------------------------------------------------------------------------------------
# IPU estimate


def synthetic_profile() -> ActivationProfile:
    """Six blocks with hand-picked sizes (elements): activation-heavy early, parameter-heavy late.

    Consistent like a real network: every block saves at least its input (its first op needs it).
    """
    blocks = [
        BlockScaling("stem", 60_000, 100, 0, 0, 3_000, 16_000, 1_000),
        BlockScaling("blocks.0", 40_000, 50, 0, 0, 16_000, 8_000, 20_000),
        BlockScaling("blocks.1", 30_000, 50, 1_000, 0, 8_000, 8_000, 40_000),
        BlockScaling("blocks.2", 15_000, 50, 0, 0, 8_000, 4_000, 80_000),
        BlockScaling("blocks.3", 8_000, 50, 0, 0, 4_000, 2_000, 160_000),
        BlockScaling("head", 2_100, 0, 0, 0, 2_000, 10, 50_000),
    ]
    return ActivationProfile(resolution=32, blocks=blocks)


def test_stage_estimate_matches_hand_computation() -> None:
    prof = synthetic_profile()
    b = prof.blocks[1]
    plan = IPUPlan(micro_batch_size=4, num_stages=3, precision="16.32", optimizer="adam", gradient_accumulation=3,
                   ipu_memory_bytes=10**7, overhead_fraction=0.1, available_memory_proportion=0.5)
    st = stage_estimate([b], 1, plan)
    p = 20_000
    assert st.in_flight == 2 * (3 - 1) - 1 == 3
    assert st.weights == 2 * p and st.master_weights == 4 * p
    assert st.optimizer_state == 2 * 4 * p  # Adam: 2 fp32 slots
    assert st.gradients == 2 * p + 4 * p  # fp16 gradient + fp32 accumulator
    assert st.activations == 3 * (40_000 * 4 + 50) * 2  # 3 micro-batches in flight, fp16
    assert st.temporary == 3 * 16_000 * 4 * 2  # 3 x largest boundary tensor (input) of one micro-batch
    assert st.overhead == 10**6
    assert st.total == pytest.approx(
        st.weights + st.master_weights + st.optimizer_state + st.gradients + st.activations + st.temporary + 10**6
    )
    # Temporary memory is capped by available_memory_proportion.
    assert stage_estimate([b], 1, replace(plan, available_memory_proportion=0.01)).temporary == 0.01 * 10**7


def test_in_flight_rule() -> None:
    assert [in_flight(k, 4) for k in range(4)] == [7, 5, 3, 1]
    assert in_flight(0, 1) == 1


def test_estimate_scales_linearly_in_micro_batch() -> None:
    prof = synthetic_profile()
    for rc in ("none", "checkpoints", "stage"):
        acts = [estimate_plan(prof, IPUPlan(micro_batch_size=m, recompute=rc), []).stages[0].activations
                for m in (1, 2, 4, 8)]
        # affine: equal increments per added sample
        assert acts[1] - acts[0] == pytest.approx((acts[2] - acts[1]) / 2)
        assert acts[3] - acts[2] == pytest.approx(2 * (acts[2] - acts[1]))


def test_recompute_reduces_activation_estimate() -> None:
    prof = synthetic_profile()
    for n in (1, 2, 3):
        for mb in (1, 8):
            base = IPUPlan(micro_batch_size=mb, num_stages=n, splits=[1, 3][: n - 1], gradient_accumulation=n)
            plain = estimate_plan(prof, base)
            rc = estimate_plan(prof, replace(base, recompute="checkpoints"))
            for a, b in zip(plain.stages, rc.stages):
                assert b.activations <= a.activations
            assert sum(s.activations for s in rc.stages) < sum(s.activations for s in plain.stages)


def test_checkpoint_names_set_segments() -> None:
    prof = synthetic_profile()
    plan = IPUPlan(micro_batch_size=2, recompute="checkpoints", checkpoints=["blocks.1"], precision="32.32")
    st = estimate_plan(prof, plan, []).stages[0]
    mb, fb = 2, 4
    seg1 = ["stem", "blocks.0", "blocks.1"]
    by = {b.name: b for b in prof.blocks}
    stash = (by["stem"].input_per_sample + by["blocks.2"].input_per_sample) * mb * fb
    # the rebuilt segment's input is part of the stash already
    rebuilt = max(sum(by[n].saved_bytes(mb, fb) for n in seg1) - by["stem"].input_per_sample * mb * fb,
                  sum(by[n].saved_bytes(mb, fb) for n in ("blocks.2", "blocks.3", "head"))
                  - by["blocks.2"].input_per_sample * mb * fb)
    assert st.activations == pytest.approx(stash + rebuilt)


def _brute_min_max(prof: ActivationProfile, plan: IPUPlan) -> float:
    """Smallest achievable largest-stage estimate over every contiguous split (exhaustive)."""
    n = len(prof.blocks)
    return min(
        estimate_plan(prof, plan, list(cuts)).max_total for cuts in combinations(range(1, n), plan.num_stages - 1)
    )


def test_planner_choices_fit_and_rejections_are_over_budget() -> None:
    prof = synthetic_profile()
    base = IPUPlan(micro_batch_size=1, ipu_memory_bytes=3 * 10**6, overhead_fraction=0.1, optimizer="sgd_momentum")
    results = plan_fits(prof, [1, 2, 4, 8, 16], base, ipu_counts=(1, 2, 4))
    statuses = {f.status for f in results}
    assert {"fits", "no"} <= statuses  # the budget makes the grid non-trivial
    for f in results:
        for est in (f.estimate, f.estimate_recompute):
            # every stage the planner reports as fitting is under the budget (recomputed independently)
            if est.fits:
                for s in est.stages:
                    assert s.total <= base.ipu_memory_bytes
            # a reported "does not fit" means no contiguous split of that many stages fits
            else:
                assert _brute_min_max(prof, est.plan) > base.ipu_memory_bytes
            # the planner's split is memory-optimal
            assert est.max_total == pytest.approx(_brute_min_max(prof, est.plan))


def test_max_micro_batch_is_the_boundary() -> None:
    prof = synthetic_profile()
    base = IPUPlan(micro_batch_size=1, ipu_memory_bytes=6 * 10**6, overhead_fraction=0.1)
    found = []
    for n in (1, 2, 3):
        mb = max_micro_batch(prof, base, n)

        def best(m: int, n: int = n) -> float:
            p = replace(base, micro_batch_size=m, num_stages=n, gradient_accumulation=2 * n - 1)
            return _brute_min_max(prof, p) if n > 1 else estimate_plan(prof, p, []).max_total

        if mb == 0:  # nothing fits on n stages
            assert best(1) > base.ipu_memory_bytes
        else:
            assert best(mb) <= base.ipu_memory_bytes < best(mb + 1)
        found.append(mb)
    assert max(found) > 1


# ---------------------------------------------------------------------------------------------------------------
# Budget check for the trainer


def test_check_fits_ipu_raises_naming_stage_and_fix() -> None:
    model = TinyResNet()
    prof = fit_activation_scaling(model, 16, verify_sizes=())
    small = 3 * 10**6
    cfg = {"execution": {"pipeline_splits": ["blocks.2"], "precision": "16.32"}, "train": {"micro_batch_size": 64},
           "optim": {"name": "sgd", "momentum": 0.9}}
    with pytest.raises(MemoryBudgetError) as err:
        check_fits_ipu(model, cfg, profile=prof, ipu_memory_bytes=small)
    msg = str(err.value)
    assert "stage 0 (stem..blocks.1, IPU0)" in msg
    assert "> 3 MB budget" in msg
    assert "micro_batch_size <=" in msg
    est = err.value.estimate
    assert est is not None and not est.fits and est.worst.total > small
    # The suggested micro-batch really fits.
    mb = int(msg.split("micro_batch_size <= ")[1].split(",")[0].split(" ")[0])
    ok = check_fits_ipu(model, cfg, profile=prof, ipu_memory_bytes=small, micro_batch_size=mb)
    assert ok.fits and ok.splits == [3]  # 'blocks.2' is unit 3 of stem, blocks.0.., head


def test_check_fits_ipu_measures_the_model_and_accepts_execution_plan() -> None:
    plan_mod = pytest.importorskip("ipu_norm.ipu.plan")
    model = TinyResNet()
    plan = plan_mod.build_plan(
        {"device": "ipu", "ipus_per_replica": 2, "pipeline_splits": ["blocks.1"], "precision": "16.32"},
        # PopTorch trains N=2 pipeline stages only with gradient accumulation >= 2N-1 = 3 (ExecutionPlan checks it).
        model, {"micro_batch_size": 4, "global_batch_size": 12},
    )
    est = check_fits_ipu(model, plan, resolution=16)
    assert est.fits and est.splits == [2] and len(est.stages) == 2
    assert est.plan.gradient_accumulation == 3 and est.plan.precision == "16.32"
    with pytest.raises(MemoryBudgetError, match=r"stage \d \("):
        check_fits_ipu(model, plan, resolution=16, ipu_memory_bytes=2 * 10**5, overhead_fraction=0.0)


def test_check_fits_ipu_reads_the_app_config() -> None:
    schema = pytest.importorskip("ipu_norm.config.schema")
    cfg = schema.Config()
    cfg.train.micro_batch_size = 4
    cfg.execution.precision = "16.16"
    cfg.execution.pipeline_splits = ["blocks.2"]
    cfg.optim.name = "rmsprop"
    cfg.optim.momentum = 0.0
    plan = IPUPlan.from_any(cfg)
    assert (plan.micro_batch_size, plan.num_stages, plan.precision, plan.optimizer) == (4, 2, "16.16", "rmsprop")
    model = TinyResNet()
    est = check_fits_ipu(model, cfg)  # resolution from model.default_cfg (cfg.data.train_size is null)
    assert est.fits and est.splits == [3]
    # RMSprop without momentum: one fp16 (16.16) state slot per parameter of the stage
    prof = fit_activation_scaling(model, model.default_cfg["train_size"], verify_sizes=())
    stage_params = sum(b.param_elems for b in prof.blocks if b.name in est.stages[0].blocks)
    assert est.stages[0].optimizer_state == 2 * stage_params


def test_memory_balanced_splits_and_cost_vector_for_the_splitter() -> None:
    model = TinyResNet(n_blocks=6)
    prof = fit_activation_scaling(model, 16, verify_sizes=())
    plan = IPUPlan(micro_batch_size=8, num_stages=3, gradient_accumulation=3)
    names = memory_balanced_splits(model, plan, profile=prof)
    idx = [prof.names.index(n) for n in names]
    assert len(names) == 2 and all(n.startswith("blocks.") or n == "head" for n in names)
    assert estimate_plan(prof, plan, idx).max_total == pytest.approx(_brute_min_max(prof, plan))
    costs = unit_memory_costs(prof, plan)
    assert len(costs) == len(prof.blocks) and all(c > 0 for c in costs)
    splitter = pytest.importorskip("ipu_norm.ipu.splitter")
    assert len(splitter.plan_pipeline(model, 3, cost=costs)) == 2


def test_read_popvision_without_libpva_returns_none(tmp_path) -> None:  # noqa: ANN001
    try:
        import pva  # noqa: F401
    except ImportError:
        assert read_popvision(str(tmp_path)) is None


@pytest.mark.ipu
def test_read_popvision_report(tmp_path) -> None:  # noqa: ANN001
    """With the Poplar SDK: compile a tiny model with autoReport and read per-IPU memory from the report."""
    import os

    import poptorch

    os.environ["POPLAR_ENGINE_OPTIONS"] = (
        '{"autoReport.all":"true","autoReport.directory":"%s"}' % tmp_path  # noqa: UP031
    )
    model = TinyResNet()
    opts = poptorch.Options()
    pm = poptorch.inferenceModel(model.eval(), opts)
    pm(torch.randn(1, 3, 16, 16))
    pv = read_popvision(str(tmp_path))
    assert pv is not None and pv["num_ipus"] >= 1 and all(b > 0 for b in pv["bytes_per_ipu"])


def test_nan_free_totals() -> None:
    prof = synthetic_profile()
    e = estimate_plan(prof, IPUPlan(micro_batch_size=3, num_stages=2, gradient_accumulation=2))
    assert all(math.isfinite(s.total) and s.total > 0 for s in e.stages)


@pytest.mark.slow  # ~5 s idle, ~20 s on the shared 2-core machine (model builds, real steps, matplotlib)
def test_compare_cli_writes_tables_and_plot(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("matplotlib")
    from ipu_norm.memory.compare import main

    # Smallest useful run: ResNet-18 at 32 px (micro-batch >= 2 keeps BN valid on the 1x1 final map).
    rc = main(["--models", "resnet18", "--norms", "bn", "gn+pn", "nf", "--micro-batch", "2", "4", "32",
               "--resolution", "32", "--fit-sizes", "2", "4", "--verify-sizes", "3", "--peak-micro-batch", "2",
               "--peak-norms", "bn", "--ipus", "1", "2", "--out", str(tmp_path)])
    assert rc == 0
    md = (tmp_path / "memory_compare.md").read_text()
    assert "## resnet18" in md and "| nf | n/a |" in md  # no NF ResNet-18: reported as n/a
    assert "BN at micro-batch 32 vs GN+PN at micro-batch 2 x 16 accumulation" in md
    assert "act@32" in md and "32*" not in md.split("act@32")[0]
    assert (tmp_path / "memory_compare.png").stat().st_size > 1000
