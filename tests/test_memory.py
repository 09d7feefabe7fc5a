"""Tests for ipu_norm.memory: measurement vs hand counts, estimate scaling, planner, budget check (tiny models)."""

from __future__ import annotations

import dataclasses
import math
from itertools import combinations

import pytest
import torch
from torch import nn

from ipu_norm.core.plan import PrecisionSpec, build_plan
from ipu_norm.core.splitter import plan_pipeline
from ipu_norm.memory.estimate import (
    MemoryBudgetError,
    MemorySpec,
    check_fits_ipu,
    decreasing_intervals,
    estimate_plan,
    in_flight,
    max_micro_batch,
    memory_balanced_splits,
    plan_fits,
    plan_for_profile,
    read_popvision,
    standard_recompute_bytes,
    unit_memory_costs,
    with_splits,
)
from ipu_norm.memory.measure import (
    ActivationProfile,
    BlockScaling,
    LiveStorageTracker,
    OpScaling,
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
    plan = with_splits(plan_for_profile(prof, micro_batch_size=4, precision="16.32", num_stages=3,
                                        available_memory_proportion=0.5), [1, 2])
    spec = MemorySpec(optimizer="adamw", ipu_memory_bytes=10**7, overhead_fraction=0.1)
    st = estimate_plan(prof, plan, spec).stages[1]  # blocks.0 alone, stage 1 of 3
    p = 20_000
    # PopART: a stash of 2(S-k)-1 = 3 entries next to the live tensor (pipeline.cpp:72-79) -> 4 copies.
    assert st.in_flight == 4
    assert st.weights == 2 * p  # model.half() on the IPU: fp16 weights, no fp32 master copy
    assert st.optimizer_state == 2 * 4 * p  # AdamW: 2 fp32 slots
    assert st.gradients == 2 * p + 4 * p  # fp16 gradient + fp32 accumulator
    assert st.activations == 4 * (40_000 * 4 + 50) * 2  # 4 copies, fp16
    assert st.temporary == 3 * 16_000 * 4 * 2  # 3 x largest boundary tensor (input) of one micro-batch
    assert st.overhead == 10**6
    assert st.total == pytest.approx(
        st.weights + st.optimizer_state + st.gradients + st.activations + st.temporary + 10**6
    )
    # 32.32: fp32 weights and gradients; 16.16: fp16 optimizer state.
    p32 = dataclasses.replace(plan, precision=PrecisionSpec.parse("32.32"))
    assert estimate_plan(prof, p32, spec).stages[1].weights == 4 * p
    p16 = dataclasses.replace(plan, precision=PrecisionSpec.parse("16.16"))
    assert estimate_plan(prof, p16, spec).stages[1].optimizer_state == 2 * 2 * p
    # Temporary memory is capped by available_memory_proportion.
    capped = dataclasses.replace(plan, available_memory_proportion=[0.01] * 3)
    assert estimate_plan(prof, capped, spec).stages[1].temporary == 0.01 * 10**7


def test_in_flight_rule() -> None:
    # stash 2(S-k)-1 (getStashSize = numIndependentStages between the forward stage k and the backward stage
    # 2S-2-k) plus the live tensor; the last stage has no stash.
    assert [in_flight(k, 4) for k in range(4)] == [8, 6, 4, 1]
    assert in_flight(0, 1) == 1


def test_estimate_scales_linearly_in_micro_batch() -> None:
    prof = synthetic_profile()
    for rc, n in (("none", 1), ("recompute_all", 1), ("none", 3), ("pipeline", 3)):
        acts = [sum(s.activations for s in estimate_plan(prof, plan_for_profile(
            prof, micro_batch_size=m, num_stages=n, recompute=rc)).stages) for m in (1, 2, 4, 8)]
        # affine: equal increments per added sample
        assert acts[1] - acts[0] == pytest.approx((acts[2] - acts[1]) / 2)
        assert acts[3] - acts[2] == pytest.approx(2 * (acts[2] - acts[1]))


def test_pipeline_recompute_reduces_all_but_the_last_stage() -> None:
    prof = synthetic_profile()
    for n in (2, 3):
        for mb in (1, 8):
            plain = estimate_plan(prof, plan_for_profile(prof, micro_batch_size=mb, num_stages=n))
            rc = estimate_plan(prof, plan_for_profile(prof, micro_batch_size=mb, num_stages=n, recompute="pipeline"))
            for a, b in zip(plain.stages[:-1], rc.stages[:-1]):
                assert b.activations < a.activations
            # PopART keeps the last stage's activations (setFinalFwdStageRecomputation): nothing saved there.
            assert rc.stages[-1].activations == plain.stages[-1].activations


def test_manual_checkpoints_on_one_ipu() -> None:
    """recompute_all + checkpoints with explicit recomputation: keep the model input and the checkpoint outputs,
    rebuild the largest segment during the backward."""
    prof = synthetic_profile()
    plan = dataclasses.replace(plan_for_profile(prof, micro_batch_size=2, precision="32.32"), recompute="checkpoints",
                               recompute_checkpoints=["blocks.1"])
    st = estimate_plan(prof, plan).stages[0]
    mb, fb = 2, 4
    by = {b.name: b for b in prof.blocks}
    stash = (by["stem"].input_per_sample + by["blocks.2"].input_per_sample) * mb * fb
    # the rebuilt segment's input is part of the stash already
    rebuilt = max(sum(by[n].saved_bytes(mb, fb) for n in ("stem", "blocks.0", "blocks.1"))
                  - by["stem"].input_per_sample * mb * fb,
                  sum(by[n].saved_bytes(mb, fb) for n in ("blocks.2", "blocks.3", "head"))
                  - by["blocks.2"].input_per_sample * mb * fb)
    assert st.activations == pytest.approx(stash + rebuilt)


def test_decreasing_intervals_follow_popart_formula() -> None:
    # intervals.cpp:10-43: K = floor(0.75 * (floor(sqrt(2N)) - 1)); sizes K, K-1, .., 1, then one op each.
    assert decreasing_intervals(1) == [(0, 1)]
    assert decreasing_intervals(5) == [(i, i + 1) for i in range(5)]  # K = floor(0.75 * 2) = 1
    assert decreasing_intervals(25)[:5] == [(0, 4), (4, 7), (7, 9), (9, 10), (10, 11)]  # K = floor(0.75 * 6) = 4
    iv = decreasing_intervals(50)  # K = floor(0.75 * 9) = 6
    assert iv[:6] == [(0, 6), (6, 11), (11, 15), (15, 18), (18, 20), (20, 21)] and len(iv) == 6 + 29


def test_standard_recompute_on_a_chain_by_hand() -> None:
    """50 ops in a chain (op i reads op i-1), outputs shrinking: in each decreasing interval the smallest live set is
    the interval's last op, which PopART keeps; every op past the intervals is kept; the largest run of recomputed
    ops (0..4) is live again while its backward runs."""
    n = 50
    size = [100 - i for i in range(n)]
    ops = [OpScaling(0, float(size[i]), 0.0, float(size[i]), 0.0, (i - 1,) if i else ()) for i in range(n)]
    kept, rebuilt, ckpts = standard_recompute_bytes(ops, mb=1, ab=1)
    assert ckpts == {5, 10, 14, 17, 19} | set(range(20, n))
    assert kept == sum(size[j] for j in ckpts)
    assert rebuilt == sum(size[0:5])
    assert kept + rebuilt < sum(size)


def _brute_min_max(prof: ActivationProfile, plan) -> float:  # noqa: ANN001
    """Smallest achievable largest-stage estimate over every contiguous split (exhaustive)."""
    n = len(prof.blocks)
    return min(
        estimate_plan(prof, with_splits(plan, list(cuts))).max_total
        for cuts in combinations(range(1, n), plan.num_stages - 1)
    )


def test_planner_choices_fit_and_rejections_are_over_budget() -> None:
    prof = synthetic_profile()
    spec = MemorySpec(optimizer="sgd_momentum", ipu_memory_bytes=3 * 10**6, overhead_fraction=0.1)
    base = plan_for_profile(prof, micro_batch_size=1)
    results = plan_fits(prof, [1, 2, 4, 8, 16], base, spec, ipu_counts=(1, 2, 4))
    statuses = {f.status for f in results}
    assert {"fits", "no"} <= statuses  # the budget makes the grid non-trivial
    for f in results:
        for est in (f.estimate, f.estimate_recompute):
            exhaustive = min(
                estimate_plan(prof, with_splits(est.plan, list(cuts)), spec).max_total
                for cuts in combinations(range(1, len(prof.blocks)), est.plan.num_stages - 1))
            # every stage the planner reports as fitting is under the budget (recomputed independently)
            if est.fits:
                assert all(s.total <= spec.ipu_memory_bytes for s in est.stages)
            # a reported "does not fit" means no contiguous split of that many stages fits
            else:
                assert exhaustive > spec.ipu_memory_bytes
            # the planner's split is memory-optimal
            assert est.max_total == pytest.approx(exhaustive)


def test_max_micro_batch_is_the_boundary() -> None:
    prof = synthetic_profile()
    spec = MemorySpec(ipu_memory_bytes=6 * 10**6, overhead_fraction=0.1)
    found = []
    for n in (1, 2, 3):
        base = plan_for_profile(prof, micro_batch_size=1, num_stages=n)
        mb = max_micro_batch(prof, base, n, spec)

        def best(m: int, base=base) -> float:  # noqa: ANN001
            p = dataclasses.replace(base, micro_batch_size=m)
            return min(estimate_plan(prof, with_splits(p, list(c)), spec).max_total
                       for c in combinations(range(1, len(prof.blocks)), p.num_stages - 1))

        if mb == 0:  # nothing fits on n stages
            assert best(1) > spec.ipu_memory_bytes
        else:
            assert best(mb) <= spec.ipu_memory_bytes < best(mb + 1)
        found.append(mb)
    assert max(found) > 1


# ---------------------------------------------------------------------------------------------------------------
# Plain ops: the profile PopTorch's traced graph needs


def test_plain_ops_profile_saves_what_the_traced_ops_need() -> None:
    """PN-Act with SiLU on the plain ops: x * w + b (saves x), silu (saves its input u), * s (saves silu(u)), + t:
    3 C H W per sample (the per-channel proxy statistics are constant in the micro-batch). The default CPU path
    (a memory-lean autograd function) saves less, which is why the IPU profile must be measured on plain ops."""
    from ipu_norm.layers.proxy_norm import ProxyNormAct

    c, h = 4, 6
    layer = nn.Sequential(ProxyNormAct(c, act="silu"))
    plain = fit_activation_scaling(layer, 0, fit_sizes=(1, 2), verify_sizes=(), input_shape=(c, h, h),
                                   plain_ops=True)
    assert plain.blocks[0].float_per_sample == pytest.approx(3 * c * h * h)
    default = fit_activation_scaling(layer, 0, fit_sizes=(1, 2), verify_sizes=(), input_shape=(c, h, h))
    assert default.blocks[0].float_per_sample < plain.blocks[0].float_per_sample


def test_op_list_accounts_for_the_saved_tensors() -> None:
    """The recorded forward ops' saved elements add up to the block totals, less the model input (saved by the
    first conv but created by no op)."""
    model = TinyResNet()
    n, res = 2, 8
    m = measure_activations(model, n, res, plain_ops=True, record_ops=True)
    per_block = [0] * len(m.blocks)
    for op in m.ops:
        if op.block >= 0:
            per_block[op.block] += op.saved_elems
    totals = [b.saved_float_elems for b in m.blocks]
    assert per_block[1:] == totals[1:]
    assert totals[0] - per_block[0] == n * 3 * res * res
    assert all(0 <= i < k for k, op in enumerate(m.ops) for i in op.inputs)


# ---------------------------------------------------------------------------------------------------------------
# Budget check for the trainer


def _tiny_plan(model: nn.Module, execution: dict, micro: int, global_batch: int | None = None):  # noqa: ANN202
    return build_plan({"device": "ipu", **execution}, model, {"micro_batch_size": micro,
                                                              "global_batch_size": global_batch})


def test_check_fits_ipu_raises_naming_stage_and_fix() -> None:
    model = TinyResNet()
    prof = fit_activation_scaling(model, 16, verify_sizes=(), plain_ops=True, record_ops=True)
    spec = MemorySpec(optimizer="sgd_momentum", ipu_memory_bytes=3 * 10**6)
    plan = _tiny_plan(model, {"pipeline_splits": ["blocks.2"], "precision": "16.32"}, 64, 64 * 3)
    with pytest.raises(MemoryBudgetError) as err:
        check_fits_ipu(model, plan, spec=spec, profile=prof)
    msg = str(err.value)
    assert "stage 0 (stem..blocks.1, IPU0)" in msg
    assert "> 3 MB budget" in msg
    assert "micro_batch_size <=" in msg
    est = err.value.estimate
    assert est is not None and not est.fits and est.worst.total > 3 * 10**6
    # The suggested micro-batch really fits.
    mb = int(msg.split("micro_batch_size <= ")[1].split(",")[0].split(" ")[0])
    ok = check_fits_ipu(model, dataclasses.replace(plan, micro_batch_size=mb), spec=spec, profile=prof)
    assert ok.fits and ok.splits == [3]  # 'blocks.2' is unit 3 of stem, blocks.0.., head


def test_check_fits_ipu_measures_the_model() -> None:
    model = TinyResNet()
    # PopTorch trains N=2 pipeline stages only with gradient accumulation >= 2N-1 = 3 (ExecutionPlan checks it).
    plan = _tiny_plan(model, {"ipus_per_replica": 2, "pipeline_splits": ["blocks.1"], "precision": "16.32"}, 4, 12)
    est = check_fits_ipu(model, plan, resolution=16)
    assert est.fits and est.splits == [2] and len(est.stages) == 2
    assert est.plan is plan and est.plan.recompute == "none"
    with pytest.raises(MemoryBudgetError, match=r"stage \d \("):
        check_fits_ipu(model, plan, resolution=16, spec=MemorySpec(ipu_memory_bytes=2 * 10**5, overhead_fraction=0))


def test_check_fits_ipu_reads_the_app_config() -> None:
    from ipu_norm.config.schema import Config

    cfg = Config()
    cfg.train.micro_batch_size = 4
    cfg.execution.device = "ipu"
    cfg.execution.precision = "16.16"
    cfg.execution.loss_scaling = 128.0
    cfg.execution.pipeline_splits = ["blocks.2"]
    cfg.optim.name = "rmsprop"
    cfg.optim.momentum = 0.0
    model = TinyResNet()
    plan = build_plan(cfg.execution, model, {"micro_batch_size": 4, "global_batch_size": 12})
    est = check_fits_ipu(model, plan, config=cfg)  # resolution from model.default_cfg (cfg.data.train_size is null)
    assert est.fits and est.splits == [3] and est.spec.optimizer == "rmsprop"
    # RMSprop without momentum: one fp16 (16.16) state slot per parameter of the stage
    stage_params = sum(p.numel() for n in est.stages[0].blocks for p in model.get_submodule(n).parameters())
    assert est.stages[0].optimizer_state == 2 * stage_params


def test_memory_balanced_splits_and_cost_vector_for_the_splitter() -> None:
    model = TinyResNet(n_blocks=6)
    prof = fit_activation_scaling(model, 16, verify_sizes=(), plain_ops=True)
    plan = plan_for_profile(prof, micro_batch_size=8, num_stages=3)
    names = memory_balanced_splits(model, plan, profile=prof)
    assert len(names) == 2 and all(n.startswith("blocks.") or n == "head" for n in names)
    assert estimate_plan(prof, with_splits(plan, names)).max_total == pytest.approx(_brute_min_max(prof, plan))
    costs = unit_memory_costs(prof, plan)
    assert len(costs) == len(prof.blocks) and all(c > 0 for c in costs)
    assert len(plan_pipeline(model, 3, cost=costs)) == 2


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
    e = estimate_plan(prof, plan_for_profile(prof, micro_batch_size=3, num_stages=2))
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
