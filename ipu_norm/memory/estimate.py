"""Estimate IPU (Mk2 GC200) memory per pipeline stage of an `ExecutionPlan`, plan what fits, check before compiling.

Inputs: an :class:`~ipu_norm.memory.measure.ActivationProfile` of the model (per block: parameters, saved-for-backward
float elements per sample and per micro-batch, block input/output sizes, and the forward's op list), measured on CPU
on the plain ATen ops that PopTorch traces (``plain_ops``: not the CPU-only fused kernels), the plan itself
(``ipu_norm.core.plan.ExecutionPlan``: micro-batch, stages, replicas, accumulation, precision, recomputation, memory
proportion) and a `MemorySpec` (the optimizer's state slots, the IPU budget, the fixed overhead). Per stage k of S:

- weights: params x 2 bytes when the model is cast to fp16 on the IPU (16.32 and 16.16: ``model.half()``; no fp32
  master copy on the device; averaging keeps its fp32 copies on the host), else 4;
- optimizer state: slots x params x accumulator bytes (fp32 for 16.32/32.32, fp16 for 16.16: ``accum_type``);
  0 when the state lives off chip (Streaming Memory); divided by replicas with replicated tensor sharding;
- gradients: params x weight bytes, plus a gradient accumulator (accumulator bytes) when accumulating;
- activations of one micro-batch priced at the compute dtype, times the copies in flight: PopART stashes a stage's
  activations in a buffer of ``2 (S - k) - 1`` entries next to the live tensor the forward wrote (stash and restore
  in place: graphcore/popart sdk/poplar/3.4.0 willow/src/transforms/pipeline.cpp:72-79, the stash size
  `getStashSize` :1477-1481 = `numIndependentStages` :2314-2321 between the forward and backward pipeline stages), so
  stage k < S-1 holds ``2 (S - k)`` copies and the last stage (forward and backward in one pipeline stage, no stash)
  holds one. Recomputation as the plan states it:
  ``none`` all saved tensors; ``pipeline`` stages before the last stash only their input (and manual checkpoint
  outputs) and rebuild one micro-batch's segment in the backward, the last stage keeps everything (pipeline.cpp
  setRecomputation :776-869, setFinalFwdStageRecomputation :1123-1274); ``recompute_all`` / ``checkpoints`` on one
  IPU keep the model input and the checkpoint outputs and rebuild the largest segment (recompute.cpp:163-181 with
  explicitRecomputation); ``standard`` applies PopART's own checkpoint choice to the profiled op list
  (recompute.cpp:64-150, intervals.cpp:10-43: the forward ops are cut into decreasing intervals, the smallest live set
  of each interval is kept, and every op past the intervals is kept);
- temporary memory (gradients of activations, conv/matmul partials): 3 x the largest block-boundary tensor of one
  micro-batch, capped at available_memory_proportion x IPU memory;
- a fixed overhead for code, exchange buffers, control and host-I/O streams: ``overhead_fraction`` x IPU memory.

The budget is 900 MB (9e8 bytes) per IPU: Graphcore's rounded figure (1472 tiles x 624 KiB = 940.6e6 bytes, less
what the runtime keeps). These are planning estimates; ``read_popvision`` reads real figures from a PopVision report
when libpva is available. Splits are chosen with the project's one split algorithm (`ipu_norm.core.splitter`).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ipu_norm.core.plan import ExecutionPlan, LossScaling, PrecisionSpec, StageSpec, make_stages
from ipu_norm.core.splitter import split_stages
from ipu_norm.memory.measure import ActivationProfile, BlockScaling, OpScaling

IPU_MEMORY_BYTES = 900 * 10**6
DEFAULT_OVERHEAD_FRACTION = 0.15
TEMP_BOUNDARY_FACTOR = 3
IPU_COUNTS = (1, 2, 4, 8)

OPTIMIZER_SLOTS: dict[str, int] = {
    "sgd": 0,
    "sgd_momentum": 1,
    "nesterov": 1,
    "rmsprop": 1,
    "rmsprop_momentum": 2,
    "rmsprop_centered": 3,
    "adam": 2,
    "adamw": 2,
    "lamb": 2,
}


class MemoryBudgetError(RuntimeError):
    """A plan does not fit in IPU memory; the message names the stage, the figure and what to change."""

    def __init__(self, message: str, estimate: PlanEstimate | None = None) -> None:
        super().__init__(message)
        self.estimate = estimate


@dataclass(frozen=True)
class MemorySpec:
    """What the estimate needs beyond the plan: optimizer state slots and the device budget."""

    optimizer: str = "sgd_momentum"  # a key of OPTIMIZER_SLOTS (see `optimizer_kind`)
    ipu_memory_bytes: int = IPU_MEMORY_BYTES
    overhead_fraction: float = DEFAULT_OVERHEAD_FRACTION

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_SLOTS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {sorted(OPTIMIZER_SLOTS)}")


def optimizer_kind(name: str, momentum: float = 0.0, centered: bool = False) -> str:
    """The state layout of the config's optimizer (``optim.name``/``momentum``): a key of OPTIMIZER_SLOTS."""
    key = str(name).lower()
    if key == "sgd":
        return "sgd_momentum" if momentum else "sgd"
    if key in ("rmsprop", "rmsprop_tf"):
        return "rmsprop_centered" if centered else "rmsprop_momentum" if momentum else "rmsprop"
    if key in ("adamw", "adam", "lamb"):
        return "adamw" if key != "lamb" else "lamb"
    raise ValueError(f"optimizer {name!r} has no IPU memory model; expected sgd, rmsprop, adamw or lamb")


def spec_from_config(cfg: Any, **overrides: Any) -> MemorySpec:
    """`MemorySpec` of the app's Config (its ``optim`` section; the default spec without one), with overrides."""
    optim = getattr(cfg, "optim", None)
    kw: dict[str, Any] = {}
    if optim is not None:
        kw["optimizer"] = optimizer_kind(optim.name, optim.momentum or 0.0)
    kw.update(overrides)
    return MemorySpec(**kw)


def _human(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} kB"


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def precision_bytes(plan: ExecutionPlan) -> tuple[int, int, int]:
    """(weight/gradient bytes, activation bytes, optimizer state / accumulator bytes) per element for the plan."""
    p: PrecisionSpec = plan.precision
    act = _dtype_bytes(p.compute_dtype)
    weight = 2 if plan.weights_half else 4
    return weight, act, _dtype_bytes(p.accum_dtype)


# ----------------------------------------------------------------------------------------------------------
# What-if plans: the same ExecutionPlan with other splits / micro-batch / recomputation.


def with_splits(plan: ExecutionPlan, splits: Sequence[str | int], **changes: Any) -> ExecutionPlan:
    """A copy of `plan` whose stages start at `splits` (unit names or indices into ``plan.unit_names``).

    The recomputation follows what PopTorch would run for the new layout: a single-IPU mode (standard /
    recompute_all) on a pipelined copy becomes 'pipeline', and 'pipeline' on one stage becomes 'standard'.
    Gradient accumulation is raised to PopTorch's minimum 2N - 1 for N pipelined training stages.
    """
    units = plan.unit_names
    idx = [s if isinstance(s, int) else units.index(str(s)) for s in splits]
    if idx != sorted(set(idx)) or (idx and (idx[0] <= 0 or idx[-1] >= len(units))):
        raise ValueError(f"pipeline splits {list(splits)} must be increasing unit indices in 1..{len(units) - 1}")
    stages = make_stages(units, idx)
    new = dataclasses.replace(plan, stages=stages, **changes)
    if new.pipelined and new.recompute in ("standard", "recompute_all"):
        new.recompute = "pipeline"
    elif not new.pipelined and new.recompute == "pipeline":
        new.recompute = "standard"
    if new.training:
        new.gradient_accumulation = max(new.gradient_accumulation, min_accumulation(len(stages)))
    return new


def plan_for_profile(profile: ActivationProfile, *, micro_batch_size: int, precision: str = "16.32",
                     num_stages: int = 1, recompute: str = "none", available_memory_proportion: float = 0.6,
                     gradient_accumulation: int = 1, optimizer_state_offchip: bool = False) -> ExecutionPlan:
    """An IPU `ExecutionPlan` over the profile's units, for what-if tables (``python -m ipu_norm.memory``); a run's
    plan comes from ``ipu_norm.core.plan.build_plan``."""
    units = profile.names
    plan = ExecutionPlan(
        device="ipu", micro_batch_size=micro_batch_size, replicas=1, gradient_accumulation=gradient_accumulation,
        device_iterations=1, stages=make_stages(units, []), pipeline_schedule="gpipe", recompute=recompute,
        recompute_checkpoints=[], available_memory_proportion=[available_memory_proportion] * num_stages,
        precision=PrecisionSpec.parse(precision), stochastic_rounding=False, loss_scaling=LossScaling(False, 1.0),
        optimizer_state_offchip=optimizer_state_offchip, replicated_tensor_sharding=False, unit_names=list(units),
    )
    return with_stage_count(plan, num_stages) if num_stages > 1 else plan


def with_stage_count(plan: ExecutionPlan, num_stages: int, **changes: Any) -> ExecutionPlan:
    """`with_splits` with an even placeholder split over `num_stages` (estimate functions then choose the best)."""
    n = len(plan.unit_names)
    if num_stages > n:
        raise ValueError(f"{num_stages} stages for {n} units")
    return with_splits(plan, [round(k * n / num_stages) for k in range(1, num_stages)], **changes)


def min_accumulation(num_stages: int) -> int:
    """Smallest gradient accumulation PopTorch accepts for pipelined training over `num_stages` (2N - 1)."""
    return 2 * num_stages - 1 if num_stages > 1 else 1


def in_flight(stage: int, num_stages: int) -> int:
    """Copies of one micro-batch's stashed activations on stage `stage` of `num_stages` (module docstring):
    the stash of ``2 (S - k) - 1`` entries plus the live tensor; the last stage (and an unpipelined model) one."""
    if num_stages <= 1 or stage == num_stages - 1:
        return 1
    return 2 * (num_stages - stage)


# ----------------------------------------------------------------------------------------------------------
# Per-stage estimate.


@dataclass
class StageEstimate:
    """Estimated bytes on one IPU (pipeline stage) and how they add up."""

    index: int
    blocks: list[str]
    in_flight: int
    weights: float
    optimizer_state: float
    gradients: float
    activations: float
    temporary: float
    overhead: float
    budget: int

    @property
    def total(self) -> float:
        return self.weights + self.optimizer_state + self.gradients + self.activations + self.temporary + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def label(self) -> str:
        span = self.blocks[0] if len(self.blocks) == 1 else f"{self.blocks[0]}..{self.blocks[-1]}"
        return f"stage {self.index} ({span}, IPU{self.index})"


@dataclass
class PlanEstimate:
    """All stages of a plan for one profile."""

    plan: ExecutionPlan
    spec: MemorySpec
    stages: list[StageEstimate]
    splits: list[int]
    split_method: str = "given"

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def worst(self) -> StageEstimate:
        return max(self.stages, key=lambda s: s.total / s.budget)

    @property
    def max_total(self) -> float:
        return max(s.total for s in self.stages)


def _segments(names: Sequence[str], checkpoints: Sequence[str]) -> list[list[int]]:
    """Recomputation segments of a stage: a checkpointed unit's output ends a segment."""
    kept = {i for i, n in enumerate(names) if n in set(checkpoints)}
    segs: list[list[int]] = []
    cur: list[int] = []
    for i in range(len(names)):
        cur.append(i)
        if i in kept:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    return segs


def _segmented(blocks: Sequence[BlockScaling], checkpoints: Sequence[str], mb: int, ab: int,
               per_block: Sequence[float]) -> tuple[float, float]:
    """(kept bytes: each segment's input, rebuilt bytes: the largest segment's saved tensors less its input)."""
    segs = _segments([b.name for b in blocks], checkpoints)
    seg_in = [blocks[seg[0]].input_per_sample * mb * ab for seg in segs]
    # The rebuilt segment's own input is in the stash already (a block's first op saves its input).
    rebuilt = max(max(sum(per_block[i] for i in seg) - x, 0.0) for seg, x in zip(segs, seg_in))
    return sum(seg_in), rebuilt


def decreasing_intervals(n: int) -> list[tuple[int, int]]:
    """PopART's intervals over n forward ops for Standard recomputation (intervals.cpp:10-43 at sdk/poplar/3.4.0):
    sizes K, K-1, .., 1 with K = floor(0.75 (floor(sqrt(2n)) - 1)), then one interval per remaining op."""
    if n == 1:
        return [(0, 1)]
    k = int(int(math.sqrt(2.0 * n)) - 1)
    k = int(k * 0.75)
    out, i0, size = [], 0, k
    while i0 + size <= n and size > 0:
        out.append((i0, i0 + size))
        i0, size = i0 + size, size - 1
    out.extend((i, i + 1) for i in range(i0, n))
    return out


def standard_recompute_bytes(ops: Sequence[OpScaling], mb: int, ab: int) -> tuple[float, float, set[int]]:
    """(kept bytes, rebuilt bytes, checkpoint op indices) of PopART's Standard recomputation over `ops`.

    Checkpoints as recompute.cpp:64-150 picks them: for each interval of `decreasing_intervals`, the live set with the
    least output memory (live set at op i: i and every earlier op whose output a later op still reads). Kept: what
    checkpoint ops' outputs hold for the backward (their saved part, or all of it when a recomputed op reads it).
    Rebuilt: the largest run of consecutive recomputed ops' saved tensors, live while its backward runs.
    """
    n = len(ops)
    out_b = [o.out_elems(mb) * ab for o in ops]
    saved_b = [o.saved_elems(mb) * ab for o in ops]
    last_use = [-1] * n
    for i, o in enumerate(ops):
        for j in o.inputs:
            last_use[j] = max(last_use[j], i)
    # Output memory of each live set, incrementally.
    ends_at: dict[int, list[int]] = {}
    for j, u in enumerate(last_use):
        ends_at.setdefault(u, []).append(j)
    live_mem, running = [], 0.0
    for i in range(n):
        running += out_b[i] if last_use[i] > i else 0.0
        for j in ends_at.get(i, []):
            if j < i:
                running -= out_b[j]
        live_mem.append(running + (out_b[i] if last_use[i] <= i else 0.0))

    def live_set(i: int) -> set[int]:
        return {j for j in range(i + 1) if last_use[j] > i} | {i}

    checkpoints: set[int] = set()
    intervals = decreasing_intervals(n)
    tail = next((a for a, b in intervals if b - a == 1 and a >= intervals[0][1]), n) if n > 1 else 0
    for a, b in intervals:
        if a >= tail:
            break
        best = min(range(a, b), key=lambda i: live_mem[i])
        checkpoints |= live_set(best)
    # Past the decreasing intervals every op is its own interval: each live set is kept.
    checkpoints |= set(range(tail, n)) | {j for j in range(tail) if last_use[j] >= tail}
    read_by_recomputed = set()
    for i, o in enumerate(ops):
        if i not in checkpoints:
            read_by_recomputed.update(o.inputs)
    kept = sum(out_b[j] if j in read_by_recomputed else saved_b[j] for j in checkpoints)
    rebuilt, run = 0.0, 0.0
    for i in range(n):
        run = 0.0 if i in checkpoints else run + saved_b[i]
        rebuilt = max(rebuilt, run)
    return kept, rebuilt, checkpoints


def stage_estimate(profile: ActivationProfile, start: int, end: int, index: int, plan: ExecutionPlan,
                   spec: MemorySpec) -> StageEstimate:
    """Estimate stage `index` of the plan holding the profile's blocks ``start..end-1``."""
    blocks = profile.blocks[start:end]
    weight_b, ab, state_b = precision_bytes(plan)
    mb = plan.micro_batch_size
    s = plan.num_stages
    params = sum(b.param_elems for b in blocks)
    opt_state = OPTIMIZER_SLOTS[spec.optimizer] * params * state_b if not plan.optimizer_state_offchip else 0.0
    if plan.replicated_tensor_sharding and plan.replicas > 1:
        opt_state /= plan.replicas
    accumulate = plan.gradient_accumulation > 1 or s > 1
    grads = params * weight_b + (params * state_b if accumulate else 0)

    n_flight = in_flight(index, s)
    last = index == s - 1
    per_block = [b.saved_bytes(mb, ab) for b in blocks]
    loss = profile.extra_float_per_sample * mb * ab + profile.extra_float_const * ab if last else 0.0
    mode = plan.recompute if plan.training else "none"
    ckpts = plan.recompute_checkpoints
    if mode == "none" or (s > 1 and last and mode in ("pipeline", "checkpoints")):
        # Nothing recomputed; on the last pipeline stage PopART keeps everything after its last checkpoint.
        acts = n_flight * (sum(per_block) + loss)
    elif s > 1:  # 'pipeline' / 'checkpoints' on a stage before the last: stash the segment inputs only
        kept, rebuilt = _segmented(blocks, ckpts, mb, ab, per_block)
        acts = n_flight * kept + rebuilt + loss
    elif mode == "standard" and profile.ops:
        kept, rebuilt, _ = standard_recompute_bytes(profile.ops, mb, ab)
        # Saved tensors that no op created (the model input): always kept.
        outside = sum(per_block) - sum(o.saved_elems(mb) * ab for o in profile.ops if o.block >= 0)
        acts = kept + rebuilt + max(outside, 0.0)
    else:  # 'recompute_all' / 'checkpoints' on one IPU ('standard' without an op list: block checkpoints)
        names = [b.name for b in blocks] if mode == "standard" else ckpts
        kept, rebuilt = _segmented(blocks, names, mb, ab, per_block)
        acts = kept + rebuilt + loss
    boundary = max(max(b.input_per_sample, b.output_per_sample) for b in blocks) * mb * ab
    amp = plan.available_memory_proportion[min(index, len(plan.available_memory_proportion) - 1)]
    temp = min(TEMP_BOUNDARY_FACTOR * boundary, amp * spec.ipu_memory_bytes)
    return StageEstimate(
        index=index,
        blocks=[b.name for b in blocks],
        in_flight=n_flight,
        weights=params * weight_b,
        optimizer_state=opt_state,
        gradients=grads,
        activations=acts,
        temporary=temp,
        overhead=spec.overhead_fraction * spec.ipu_memory_bytes,
        budget=spec.ipu_memory_bytes,
    )


def _check_profile(profile: ActivationProfile, plan: ExecutionPlan) -> None:
    if profile.names != list(plan.unit_names):
        raise ValueError(f"the profile's units ({profile.names[0]}..{profile.names[-1]}, {len(profile.names)}) are not "
                         f"the plan's ({len(plan.unit_names)}): profile the planned model")


def estimate_plan(profile: ActivationProfile, plan: ExecutionPlan, spec: MemorySpec | None = None,
                  split_method: str = "given") -> PlanEstimate:
    """Estimate every stage of `plan` (its own stages) for `profile`."""
    spec = spec or MemorySpec()
    _check_profile(profile, plan)
    idx = [plan.unit_names.index(st.start) for st in plan.stages[1:]]
    bounds = [0, *idx, len(profile.blocks)]
    stages = [stage_estimate(profile, bounds[k], bounds[k + 1], k, plan, spec) for k in range(plan.num_stages)]
    return PlanEstimate(plan, spec, stages, idx, split_method)


def best_split(profile: ActivationProfile, plan: ExecutionPlan, spec: MemorySpec | None = None) -> PlanEstimate:
    """The same plan with the memory-balanced split over its number of stages (`split_stages`: exact minimax of the
    fullest stage's estimate, stage-dependent in-flight copies included)."""
    spec = spec or MemorySpec()
    _check_profile(profile, plan)
    s = plan.num_stages
    if s == 1:
        return estimate_plan(profile, plan, spec)
    probe = with_stage_count(plan, s)  # the recomputation / accumulation of an s-stage plan

    def cost(k: int, i: int, j: int) -> float:
        return stage_estimate(profile, i, j, k, probe, spec).total

    splits = split_stages(len(profile.blocks), s, cost)
    return estimate_plan(profile, with_splits(plan, splits), spec, "memory minimax")


# ----------------------------------------------------------------------------------------------------------
# Planning: which micro-batch sizes fit on 1, 2, 4, 8 IPUs.


@dataclass
class FitResult:
    micro_batch: int
    num_ipus: int
    estimate: PlanEstimate  # without recomputation
    estimate_recompute: PlanEstimate  # with recomputation (PopTorch's default mode for the layout)

    @property
    def status(self) -> str:
        if self.estimate.fits:
            return "fits"
        if self.estimate_recompute.fits:
            return "fits+rc"
        return "no"


def default_recompute(num_stages: int) -> str:
    """The recomputation PopTorch runs for `num_stages` when it is on: Pipeline when pipelined, else Standard."""
    return "pipeline" if num_stages > 1 else "standard"


def plan_fits(profile: ActivationProfile, micro_batches: Sequence[int], base: ExecutionPlan,
              spec: MemorySpec | None = None, ipu_counts: Sequence[int] = IPU_COUNTS) -> list[FitResult]:
    """For each micro-batch and IPU count (one pipeline of that many stages), the best split's estimate, without and
    with recomputation."""
    out = []
    for mb in micro_batches:
        for n in ipu_counts:
            if n > len(profile.blocks):
                continue
            p = with_stage_count(base, n, micro_batch_size=mb, recompute="none", recompute_checkpoints=[])
            prc = with_stage_count(base, n, micro_batch_size=mb, recompute=default_recompute(n),
                                   recompute_checkpoints=[])
            out.append(FitResult(mb, n, best_split(profile, p, spec), best_split(profile, prc, spec)))
    return out


def max_micro_batch(profile: ActivationProfile, base: ExecutionPlan, num_ipus: int, spec: MemorySpec | None = None,
                    limit: int = 4096, keep_split: bool = False) -> int:
    """Largest micro-batch that fits on `num_ipus` stages with `base`'s other settings (0 if none does).

    ``keep_split``: keep `base`'s split (it must have `num_ipus` stages); else the memory-balanced split is chosen
    for every micro-batch. Memory grows with the micro-batch, so the answer is found by doubling then bisection.
    """
    if keep_split and base.num_stages != num_ipus:
        raise ValueError("keep_split needs a plan with num_ipus stages")
    shaped = base if keep_split else with_stage_count(base, num_ipus)

    def fits(mb: int) -> bool:
        p = dataclasses.replace(shaped, micro_batch_size=mb)
        return (estimate_plan(profile, p, spec) if keep_split else best_split(profile, p, spec)).fits

    if num_ipus > len(profile.blocks) or not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # memory grows with mb: fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def assumptions_text(plan: ExecutionPlan, spec: MemorySpec | None = None) -> str:
    """The assumptions behind the estimate, for printing next to its tables."""
    spec = spec or MemorySpec()
    weight_b, ab, state_b = precision_bytes(plan)
    overhead = _human(spec.overhead_fraction * spec.ipu_memory_bytes)
    return "\n".join([
        f"IPU budget {_human(spec.ipu_memory_bytes)} per Mk2 IPU; fixed overhead (code, exchange buffers, "
        f"control, host streams) = {spec.overhead_fraction:.0%} of it ({overhead}).",
        f"precision {plan.precision.name}: {weight_b}-byte weights/gradients (model.half() on the IPU: no fp32 master "
        f"copy), {ab}-byte activations, {state_b}-byte optimizer state and gradient accumulators.",
        f"optimizer {spec.optimizer}: {OPTIMIZER_SLOTS[spec.optimizer]} state slot(s) per parameter, "
        + ("off chip (Streaming Memory: not counted)" if plan.optimizer_state_offchip else "on chip") + ".",
        "pipeline: stage k < S-1 of S holds 2(S-k) copies of a micro-batch's stashed activations (PopART's stash of "
        "2(S-k)-1 plus the live tensor), the last stage one; stages balanced by memory (exact minimax, "
        "ipu_norm.core.splitter).",
        "recomputation as PopTorch runs it: Pipeline when pipelined (stage input stashed, one micro-batch rebuilt; the "
        "last stage keeps everything), Standard on one IPU (PopART's own checkpoints on the profiled op list).",
        f"temporary memory = {TEMP_BOUNDARY_FACTOR} x largest block-boundary tensor of one micro-batch, capped at "
        f"available_memory_proportion x IPU memory.",
        "activations = measured saved-for-backward tensors per block on the plain ops PopTorch traces (CPU, fp32, "
        "dedup by storage) re-priced at the compute dtype.",
    ])


def format_plan_error(est: PlanEstimate, suggestions: Sequence[str]) -> str:
    """One line: the fullest stage, its parts and what would make the plan fit."""
    w = est.worst
    parts = (
        f"weights {_human(w.weights)}, optimizer {_human(w.optimizer_state)}, "
        f"grads {_human(w.gradients)}, activations {_human(w.activations)} ({w.in_flight} micro-batch cop"
        f"{'y' if w.in_flight == 1 else 'ies'} in flight, recompute {est.plan.recompute}), temporary "
        f"{_human(w.temporary)}, overhead {_human(w.overhead)}"
    )
    msg = f"{w.label} needs ~{_human(w.total)} > {_human(w.budget)} budget [{parts}]"
    if suggestions:
        msg += ": use " + ", or ".join(suggestions)
    return msg


def suggest(profile: ActivationProfile, plan: ExecutionPlan, spec: MemorySpec | None = None) -> list[str]:
    """Concrete changes that would make `plan` fit (each checked with the same estimate)."""
    spec = spec or MemorySpec()
    out = []
    mb = max_micro_batch(profile, plan, plan.num_stages, spec, keep_split=True)
    if 0 < mb < plan.micro_batch_size:
        out.append(f"micro_batch_size <= {mb}")
    if plan.num_stages > 1:
        bal = best_split(profile, plan, spec)
        if bal.fits and bal.splits != estimate_plan(profile, plan, spec).splits:
            names = ", ".join(profile.names[i] for i in bal.splits)
            out.append(f"pipeline_splits [{names}] (memory-balanced)")
    for n in (2, 4, 8, 16):
        if plan.num_stages < n <= len(profile.blocks):
            p = with_stage_count(plan, n)
            if best_split(profile, p, spec).fits:
                out.append(f"{n} pipeline stages (gradient_accumulation >= {2 * n - 1})")
                break
    if plan.recompute == "none":
        mode = default_recompute(plan.num_stages)
        if estimate_plan(profile, dataclasses.replace(plan, recompute=mode), spec).fits:
            out.append(f"execution.recompute: {mode}")
    if not plan.optimizer_state_offchip and OPTIMIZER_SLOTS[spec.optimizer]:
        if estimate_plan(profile, dataclasses.replace(plan, optimizer_state_offchip=True), spec).fits:
            out.append("optimizer state off chip")
    if plan.precision.name == "32.32":
        p = dataclasses.replace(plan, precision=PrecisionSpec.parse("16.32"))
        if estimate_plan(profile, p, spec).fits:
            out.append("precision 16.32")
    if not out:
        out.append("a smaller model or resolution (no single change found that fits)")
    return out


# ----------------------------------------------------------------------------------------------------------
# The trainer's pre-compile check.


def profile_model(model: Any, resolution: int) -> ActivationProfile:
    """A model's per-block activation profile at `resolution`, measured as PopTorch will trace it: the plain ATen ops,
    CPU, fp32, micro-batches 1 and 2, with the forward's op list.

    The model is deep-copied to CPU float32 so the caller's model (possibly already on a device or in half) is not
    touched. Nothing is cached: a profile is a value the caller keeps (ResNet-50 at 224 px: a few seconds).
    """
    import copy

    from ipu_norm.memory.measure import fit_activation_scaling

    m = copy.deepcopy(model).float().cpu()
    with torch.random.fork_rng():
        return fit_activation_scaling(m, resolution, fit_sizes=(1, 2), verify_sizes=(), plain_ops=True,
                                      record_ops=True)


def check_fits_ipu(
    model: Any,
    plan: ExecutionPlan,
    *,
    config: Any = None,
    spec: MemorySpec | None = None,
    resolution: int | None = None,
    profile: ActivationProfile | None = None,
) -> PlanEstimate:
    """Raise MemoryBudgetError if the plan's stages would not fit in IPU memory; return the estimate if they do.

    Call it before compiling (poptorch.trainingModel / .compile) or allocating anything on the device.
    `config`: the app's Config, for what the plan does not hold (``optim`` -> `spec_from_config`, ``data.train_size``
    -> the resolution); `spec` overrides the config's; `resolution`: training image side (default: the config's
    data.train_size, else model.default_cfg['train_size'], else 224).
    """
    if spec is None:
        spec = spec_from_config(config) if config is not None else MemorySpec()
    if profile is None:
        if resolution is None:
            size = getattr(getattr(config, "data", None), "train_size", None) if config is not None else None
            cfg = getattr(model, "default_cfg", None) or {}
            resolution = int(size) if size else int(cfg.get("train_size", 224))
        profile = profile_model(model, resolution)
    est = estimate_plan(profile, plan, spec)
    if not est.fits:
        raise MemoryBudgetError(format_plan_error(est, suggest(profile, plan, spec)), est)
    return est


def unit_memory_costs(profile: ActivationProfile, plan: ExecutionPlan, spec: MemorySpec | None = None) -> list[float]:
    """Per-unit bytes (stem, blocks.*, head) for one micro-batch as if alone on one IPU, overhead excluded: a cost
    vector for ``ipu_norm.core.splitter.plan_pipeline(cost=...)``. Stage-dependent in-flight copies are not in it; for
    splits that account for them use `memory_balanced_splits`."""
    spec = spec or MemorySpec()
    one = with_splits(plan, [], recompute="none")
    return [stage_estimate(profile, i, i + 1, 0, one, spec).total - spec.overhead_fraction * spec.ipu_memory_bytes
            for i in range(len(profile.blocks))]


def memory_balanced_splits(model: Any, plan: ExecutionPlan, num_stages: int | None = None, *,
                           spec: MemorySpec | None = None, resolution: int | None = None,
                           profile: ActivationProfile | None = None) -> list[str]:
    """``pipeline_splits`` names (e.g. ['blocks.4', 'blocks.11']) minimising the fullest IPU's estimate."""
    n = num_stages or plan.num_stages
    if n == 1:
        return []
    if profile is None:
        cfg = getattr(model, "default_cfg", None) or {}
        profile = profile_model(model, resolution or int(cfg.get("train_size", 224)))
    est = best_split(profile, with_stage_count(plan, n), spec)
    return [profile.names[i] for i in est.splits]


# ----------------------------------------------------------------------------------------------------------
# PopVision reports (actual figures, when the Graphcore SDK's libpva is importable).


def read_popvision(directory: str) -> dict[str, Any] | None:
    """Per-IPU memory (bytes, including gaps) from the newest profile.pop under `directory`, or None.

    Returns None when libpva (Poplar SDK) is not importable or there is no report.
    """
    try:
        import pva  # noqa: PLC0415 - Poplar SDK only
    except ImportError:
        return None
    files = sorted(glob.glob(os.path.join(directory, "**", "profile.pop"), recursive=True), key=os.path.getmtime)
    if not files:
        return None
    report = pva.openReport(files[-1])
    tiles = list(report.compilation.tiles)
    num_ipus = max(1, len(report.compilation.ipus))
    per_ipu = len(tiles) // num_ipus
    used = [0] * num_ipus
    for i, t in enumerate(tiles):
        used[min(i // per_ipu, num_ipus - 1)] += t.memory.total.includingGaps
    return {"report": files[-1], "num_ipus": num_ipus, "bytes_per_ipu": used, "total_bytes": sum(used)}


__all__ = [
    "IPU_COUNTS", "IPU_MEMORY_BYTES", "MemoryBudgetError", "MemorySpec", "OPTIMIZER_SLOTS", "PlanEstimate",
    "StageEstimate", "FitResult", "StageSpec", "assumptions_text", "best_split", "check_fits_ipu",
    "decreasing_intervals", "default_recompute", "estimate_plan", "in_flight", "max_micro_batch", "min_accumulation",
    "memory_balanced_splits", "optimizer_kind", "plan_fits", "plan_for_profile", "precision_bytes", "profile_model",
    "read_popvision", "spec_from_config", "stage_estimate", "standard_recompute_bytes", "suggest", "unit_memory_costs",
    "with_splits", "with_stage_count",
]
