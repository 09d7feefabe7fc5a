"""Estimate IPU (Mk2 GC200) memory per pipeline stage, plan what fits, and check a plan before compiling.

Inputs: an :class:`~ipu_norm.memory.measure.ActivationProfile` (per block: parameters, saved-for-backward
float elements per sample and per micro-batch, block input/output sizes - measured with saved-tensor hooks on
CPU/GPU) and a plan (micro-batch, stages, replicas, accumulation, precision, optimizer, recomputation,
available memory proportion). Per stage k (0-based) of S stages the estimate adds:

- weights: params x compute bytes (2 for 16.x, 4 for 32.32); 16.32 adds an fp32 master copy (4 bytes/param);
- optimizer state: slots x params x state bytes (fp32 for 16.32/32.32, fp16 for 16.16); slots = 0 SGD,
  1 SGD momentum/Nesterov, 1 RMSprop, 2 RMSprop with momentum, 2 Adam/AdamW/LAMB; 0 when the state lives
  off chip (Streaming Memory); divided by replicas with replicated tensor sharding;
- gradients: params x compute bytes, plus a gradient accumulator (state bytes) when accumulating
  (pipelining always accumulates: gradient accumulation >= stages);
- activations: saved-for-backward bytes of the stage's blocks for one micro-batch, priced at the compute
  dtype (non-float saved tensors keep their measured size), times the micro-batches in flight. Schedule
  rule (PopART pipelining, GPipe-like fill/flush with 1F1B steady state): stage k holds 2 (S - k) - 1
  micro-batches in flight (1 without pipelining). With recomputation the in-flight micro-batches keep only
  the stash - the stage input ('stage') or every block input ('checkpoints') - and the activations of one
  micro-batch are rebuilt during its backward: the whole stage ('stage') or the largest block
  ('checkpoints');
- temporary memory (gradients of activations, conv/matmul partials): 3 x the largest block-boundary tensor
  of one micro-batch, capped at available_memory_proportion x IPU memory (the proportion Poplar may use for
  conv/matmul temporaries);
- a fixed overhead for code, exchange buffers, control and host-I/O streams: ``overhead_fraction`` x IPU
  memory (default 15 %).

The budget is 900 MB (9e8 bytes) per IPU: Graphcore's rounded figure (1472 tiles x 624 KiB = 940.6e6 bytes,
less what the runtime keeps). These are planning estimates; ``read_popvision`` reads real figures from a
PopVision report when libpva is available.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ipu_norm.memory.measure import ActivationProfile, BlockScaling

IPU_MEMORY_BYTES = 900 * 10**6
DEFAULT_OVERHEAD_FRACTION = 0.15
DEFAULT_AMP = 0.6
TEMP_BOUNDARY_FACTOR = 3
IPU_COUNTS = (1, 2, 4, 8)

# precision -> (compute bytes, state/accumulator bytes, fp32 master copy of the weights)
PRECISIONS: dict[str, tuple[int, int, bool]] = {
    "32.32": (4, 4, False),
    "16.32": (2, 4, True),
    "16.16": (2, 2, False),
}
OPTIMIZER_SLOTS: dict[str, int] = {
    "sgd": 0,
    "sgd_momentum": 1,
    "momentum": 1,
    "nesterov": 1,
    "rmsprop": 1,
    "rmsprop_momentum": 2,
    "rmsprop_centered": 3,
    "adam": 2,
    "adamw": 2,
    "lamb": 2,
}
RECOMPUTE_MODES = ("none", "checkpoints", "stage")


class MemoryBudgetError(RuntimeError):
    """A plan does not fit in IPU memory; the message names the stage, the figure and what to change."""

    def __init__(self, message: str, estimate: PlanEstimate | None = None) -> None:
        super().__init__(message)
        self.estimate = estimate


def _human(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} kB"


@dataclass
class IPUPlan:
    """The memory-relevant part of an execution plan (see ``from_any`` for what it reads from other objects).

    splits: block indices (into the profile's block list: stem, blocks.0.., head) where stages 1..S-1
    start; None lets the planner choose (the memory-balanced split).
    """

    micro_batch_size: int
    num_stages: int = 1
    splits: list[int] | None = None
    replicas: int = 1
    gradient_accumulation: int = 1
    precision: str = "16.32"
    optimizer: str = "sgd_momentum"
    optimizer_on_chip: bool = True
    replicated_tensor_sharding: bool = False
    recompute: str = "none"
    checkpoints: list[str] | None = None  # units whose outputs are kept ('blocks.3'); None = every block
    available_memory_proportion: float | Sequence[float] = DEFAULT_AMP
    ipu_memory_bytes: int = IPU_MEMORY_BYTES
    overhead_fraction: float = DEFAULT_OVERHEAD_FRACTION

    def __post_init__(self) -> None:
        self.precision = str(self.precision)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} not in {sorted(PRECISIONS)}")
        self.optimizer = _canonical_optimizer(self.optimizer)
        self.recompute = _canonical_recompute(self.recompute)
        if self.micro_batch_size < 1 or self.num_stages < 1:
            raise ValueError("micro_batch_size and num_stages must be >= 1")

    def amp(self, stage: int) -> float:
        a = self.available_memory_proportion
        if isinstance(a, (int, float)):
            return float(a)
        return float(list(a)[min(stage, len(a) - 1)])

    @classmethod
    def from_any(cls, obj: Any, config: Any = None, **overrides: Any) -> IPUPlan:
        """Build from an IPUPlan, an ExecutionPlan-like object, or a (nested) config dict.

        Looks (attributes or keys, top level or under execution/ipu/optimizer/train/model sections) for:
        micro_batch_size | micro_batch, stages (list of block-name groups or split points) | num_stages |
        pipeline_splits | splits, replicas | replication_factor, gradient_accumulation | accumulation,
        precision, optimizer (name or {name|type: ...}) | optimizer_name, optimizer_on_chip |
        optimizer_state_offchip, replicated_tensor_sharding, recompute | recompute_mode,
        available_memory_proportion | amp. `config` (e.g. the trainer's Config, whose optim/data sections an
        ExecutionPlan lacks) is searched after `obj`.
        """
        if isinstance(obj, IPUPlan):
            return replace(obj, **overrides)
        get = _finder(obj, config)
        kw: dict[str, Any] = {}
        mb = get("micro_batch_size", "micro_batch", "micro-batch-size")
        if mb is not None:
            kw["micro_batch_size"] = int(mb)
        stages = get("stages", "pipeline_stages")
        splits = get("pipeline_splits", "splits", "split_points")
        if isinstance(stages, int):
            kw["num_stages"] = stages
        elif stages:
            kw["num_stages"] = len(stages)
            kw["splits"] = _stages_to_split_names(stages)
        elif splits:
            kw["num_stages"] = len(splits) + 1
            kw["splits"] = list(splits)
        n = get("num_stages", "pipeline_depth", "ipus_per_replica")
        if n is not None and "num_stages" not in kw:
            kw["num_stages"] = int(n)
        for key, names, conv in (
            ("replicas", ("replicas", "replication_factor", "replica"), int),
            ("gradient_accumulation", ("gradient_accumulation", "accumulation", "gradient_accumulation_steps"), int),
            ("precision", ("precision",), _precision_name),
            ("replicated_tensor_sharding", ("replicated_tensor_sharding", "rts"), bool),
            ("available_memory_proportion", ("available_memory_proportion", "amp"), None),
        ):
            v = get(*names)
            if v is not None:
                kw[key] = conv(v) if conv else v
        opt = _optimizer_name(get("optimizer", "optim", "optimizer_name", "opt"))
        if opt:
            kw["optimizer"] = opt
        on = get("optimizer_on_chip", "optimizer_state_on_chip")
        off = get("optimizer_state_offchip", "optimizer_off_chip", "offchip_optimizer_state")
        if on is not None:
            kw["optimizer_on_chip"] = bool(on)
        elif off is not None:
            kw["optimizer_on_chip"] = not bool(off)
        rc = get("recompute", "recompute_mode", "recomputation")
        if rc is not None:
            kw["recompute"] = rc
        cps = get("recompute_checkpoints")
        if cps:
            kw["checkpoints"] = [str(c) for c in cps]
        kw.update(overrides)
        if "micro_batch_size" not in kw:
            raise ValueError("the plan/config names no micro_batch_size")
        return cls(**kw)


def _precision_name(p: Any) -> str:
    """'16.32' from a string, a YAML float (16.16) or a PrecisionSpec-like object with .name; bf16 -> 16.32
    (same sizes: 2-byte activations, fp32 weights/state)."""
    p = getattr(p, "name", p)
    key = f"{p:.2f}" if isinstance(p, float) else str(p).strip().lower()
    return "16.32" if key == "bf16" else key


def _optimizer_name(opt: Any) -> str | None:
    """Optimizer name with its state-relevant flags, from a string, a mapping or an object (name, momentum)."""
    if opt is None:
        return None
    if isinstance(opt, str):
        return opt

    def field_(k: str) -> Any:
        return opt.get(k) if isinstance(opt, Mapping) else getattr(opt, k, None)

    name = field_("name") or field_("type")
    if name is None:
        name = type(opt).__name__ if isinstance(opt, object) and not isinstance(opt, Mapping) else None
    if name is None:
        return None
    name = str(name).lower()
    momentum = field_("momentum")
    if momentum is None and isinstance(opt, object) and hasattr(opt, "defaults"):  # a torch optimizer
        momentum = opt.defaults.get("momentum")
    name = {"rmsproptf": "rmsprop_tf"}.get(name, name)
    if name in ("sgd", "rmsprop", "rmsprop_tf") and momentum:
        return "sgd_momentum" if name == "sgd" else "rmsprop_momentum"
    return name


def _canonical_optimizer(name: str) -> str:
    key = str(name).lower().replace("-", "_").replace(" ", "_")
    key = {"sgd_combined": "sgd_momentum", "sgdm": "sgd_momentum", "rmsprop_tf": "rmsprop"}.get(key, key)
    if key not in OPTIMIZER_SLOTS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZER_SLOTS)}")
    return key


def _canonical_recompute(rc: Any) -> str:
    if rc in (None, False, 0):
        return "none"
    if rc is True:
        return "checkpoints"
    key = str(rc).lower()
    if key in ("none", "off", "false", "no"):
        return "none"
    if key in ("checkpoints", "checkpoint", "manual", "auto", "true", "on", "pipeline_checkpoints"):
        return "checkpoints"
    if key in ("stage", "pipeline", "recompute_all"):
        return "stage"
    raise ValueError(f"unknown recompute mode {rc!r}; expected one of {RECOMPUTE_MODES}")


def _finder(*objs: Any) -> Callable[..., Any]:
    """A lookup of the first present name over `objs` in order: each at top level, then its common
    sub-sections (execution, train, optim, data, ...), over attributes or mapping keys."""
    sections = ("execution", "ipu", "pipeline", "train", "training", "optim", "optimizer", "data", "model")

    def lookup(o: Any, name: str) -> Any:
        if isinstance(o, Mapping):
            return o.get(name, o.get(name.replace("_", "-")))
        return getattr(o, name, None)

    def get(*names: str) -> Any:
        scopes = []
        for obj in objs:
            if obj is None:
                continue
            scopes.append(obj)
            scopes += [s for s in (lookup(obj, sec) for sec in sections) if s is not None and not isinstance(
                s, (str, int, float, list, tuple))]
        for scope in scopes:
            for n in names:
                v = lookup(scope, n)
                if v is not None and not callable(v):
                    return v
        return None

    return get


def _stages_to_split_names(stages: Sequence[Any]) -> list[Any]:
    """Stage descriptions -> split markers: the first block of stages 1..S-1 (name, index, or an object
    with .blocks / .modules / .start)."""
    firsts = []
    for st in list(stages)[1:]:
        for attr in ("start", "first_block", "blocks", "modules", "module_names"):
            v = st.get(attr) if isinstance(st, Mapping) else getattr(st, attr, None)
            if v is not None:
                st = v
                break
        if isinstance(st, (list, tuple)):
            st = st[0]
        firsts.append(st)
    return firsts


# ----------------------------------------------------------------------------------------------------------
# Per-stage estimate.


@dataclass
class StageEstimate:
    """Estimated bytes on one IPU (pipeline stage) and how they add up."""

    index: int
    blocks: list[str]
    in_flight: int
    weights: float
    master_weights: float
    optimizer_state: float
    gradients: float
    activations: float
    temporary: float
    overhead: float
    budget: int

    @property
    def total(self) -> float:
        return (
            self.weights + self.master_weights + self.optimizer_state + self.gradients + self.activations
            + self.temporary + self.overhead
        )

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

    plan: IPUPlan
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


def min_accumulation(num_stages: int) -> int:
    """Smallest gradient accumulation PopTorch accepts for pipelined training over `num_stages` (2N - 1)."""
    return 2 * num_stages - 1 if num_stages > 1 else 1


def in_flight(stage: int, num_stages: int) -> int:
    """Micro-batches whose activations stage `stage` holds: 2 (S - k) - 1 (1 without pipelining)."""
    return 2 * (num_stages - stage) - 1


def stage_estimate(
    blocks: Sequence[BlockScaling], index: int, plan: IPUPlan, extra_float_per_sample: float = 0.0
) -> StageEstimate:
    """Estimate one stage holding `blocks` (contiguous) as stage `index` of ``plan.num_stages``."""
    compute_b, state_b, master = PRECISIONS[plan.precision]
    mb = plan.micro_batch_size
    params = sum(b.param_elems for b in blocks)
    weights = params * compute_b
    master_w = params * 4 if master else 0
    slots = OPTIMIZER_SLOTS[plan.optimizer]
    opt_state = slots * params * state_b if plan.optimizer_on_chip else 0
    if plan.replicated_tensor_sharding and plan.replicas > 1:
        opt_state /= plan.replicas
    accumulate = plan.gradient_accumulation > 1 or plan.num_stages > 1
    grads = params * compute_b + (params * state_b if accumulate else 0)

    n_flight = in_flight(index, plan.num_stages)
    per_block = [b.saved_bytes(mb, compute_b) for b in blocks]
    loss_bytes = extra_float_per_sample * mb * compute_b if index == plan.num_stages - 1 else 0.0
    if plan.recompute == "none":
        acts = n_flight * (sum(per_block) + loss_bytes)
    elif plan.recompute == "checkpoints":
        segments = _segments(blocks, plan.checkpoints)
        # stash: the stage input plus the output of every checkpoint inside the stage (= next segment's input)
        seg_in = [blocks[seg[0]].input_per_sample * mb * compute_b for seg in segments]
        # The rebuilt segment's own input is already in the stash (a block's first op saves its input).
        rebuilt = max(max(sum(per_block[i] for i in seg) - x, 0.0) for seg, x in zip(segments, seg_in))
        acts = n_flight * sum(seg_in) + rebuilt + loss_bytes
    else:  # "stage": stash the stage input only, rebuild the whole stage for one micro-batch
        stash = blocks[0].input_per_sample * mb * compute_b
        acts = n_flight * stash + max(sum(per_block) - stash, 0.0) + loss_bytes
    boundary = max(max(b.input_per_sample, b.output_per_sample) for b in blocks) * mb * compute_b
    temp = min(TEMP_BOUNDARY_FACTOR * boundary, plan.amp(index) * plan.ipu_memory_bytes)
    return StageEstimate(
        index=index,
        blocks=[b.name for b in blocks],
        in_flight=n_flight,
        weights=weights,
        master_weights=master_w,
        optimizer_state=opt_state,
        gradients=grads,
        activations=acts,
        temporary=temp,
        overhead=plan.overhead_fraction * plan.ipu_memory_bytes,
        budget=plan.ipu_memory_bytes,
    )


def _segments(blocks: Sequence[BlockScaling], checkpoints: Sequence[str] | None) -> list[list[int]]:
    """Recomputation segments of a stage: a checkpointed unit's output starts a new segment after it.

    checkpoints None = every block is a checkpoint (each block its own segment). A name inside a unit
    ('blocks.3.conv2') counts as that unit's output being kept (conservative: the unit's rest is recomputed).
    """
    if checkpoints is None:
        return [[i] for i in range(len(blocks))]
    names = [b.name for b in blocks]
    kept = {i for i, n in enumerate(names) for c in checkpoints if c == n or str(c).startswith(n + ".")}
    segs, cur = [], []
    for i in range(len(blocks)):
        cur.append(i)
        if i in kept:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    return segs


def _resolve_splits(profile: ActivationProfile, splits: Sequence[Any]) -> list[int]:
    """Split markers (indices or block names such as 'blocks.4' / model attribute paths) -> block indices."""
    names = profile.names
    out = []
    for s in splits:
        if isinstance(s, int):
            out.append(s)
            continue
        key = str(s)
        if key in names:
            out.append(names.index(key))
            continue
        # 'model.blocks.4' or 'blocks.4.conv1' -> the unit that contains it
        hits = [i for i, n in enumerate(names) if key.endswith(n) or key.startswith(n + ".") or f".{n}." in key]
        if not hits:
            raise ValueError(f"pipeline split {s!r} names no block of the model ({names[0]}..{names[-1]})")
        out.append(hits[0])
    if out != sorted(set(out)) or (out and (out[0] <= 0 or out[-1] >= len(names))):
        raise ValueError(f"pipeline splits {list(splits)} must be increasing block indices in 1..{len(names) - 1}")
    return out


def estimate_plan(
    profile: ActivationProfile, plan: IPUPlan, splits: Sequence[Any] | None = None, split_method: str = "given"
) -> PlanEstimate:
    """Estimate every stage for a given split (block indices where stages 1..S-1 start)."""
    if splits is None:
        splits = plan.splits
    if splits is None:
        if plan.num_stages == 1:
            splits = []
        else:
            return best_split(profile, plan)
    idx = _resolve_splits(profile, splits)
    if len(idx) != plan.num_stages - 1:
        raise ValueError(f"{plan.num_stages} stages need {plan.num_stages - 1} splits, got {len(idx)}")
    bounds = [0, *idx, len(profile.blocks)]
    stages = [
        stage_estimate(profile.blocks[bounds[k]:bounds[k + 1]], k, plan, profile.extra_float_per_sample)
        for k in range(plan.num_stages)
    ]
    return PlanEstimate(plan, stages, idx, split_method)


# ----------------------------------------------------------------------------------------------------------
# Balancing stages by memory.


def _optimal_split(profile: ActivationProfile, plan: IPUPlan) -> list[int]:
    """Contiguous split minimising the largest stage estimate (stage-aware: in-flight count depends on k).

    Exact dynamic programme over (stage, first block of the next stage); cheap for tens of blocks.
    """
    n, s = len(profile.blocks), plan.num_stages
    if s > n:
        raise ValueError(f"{s} stages for {n} blocks")
    cost_cache: dict[tuple[int, int, int], float] = {}

    def cost(k: int, i: int, j: int) -> float:
        key = (k, i, j)
        if key not in cost_cache:
            cost_cache[key] = stage_estimate(profile.blocks[i:j], k, plan, profile.extra_float_per_sample).total
        return cost_cache[key]

    inf = math.inf
    # best[k][j]: minimal max-cost of putting blocks[0:j] on stages 0..k; arg[k][j]: start of stage k
    best = [[inf] * (n + 1) for _ in range(s)]
    arg = [[0] * (n + 1) for _ in range(s)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for k in range(1, s):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                v = max(best[k - 1][i], cost(k, i, j))
                if v < best[k][j]:
                    best[k][j], arg[k][j] = v, i
    splits, j = [], n
    for k in range(s - 1, 0, -1):
        i = arg[k][j]
        splits.append(i)
        j = i
    return sorted(splits)


def _splitter_split(profile: ActivationProfile, plan: IPUPlan) -> list[int] | None:
    """The project splitter's answer (ipu_norm.ipu.splitter.auto_split) on per-block memory costs, if present."""
    try:
        from ipu_norm.ipu.splitter import auto_split  # noqa: PLC0415 - optional: written in parallel
    except Exception:  # noqa: BLE001 - absent or broken: the planner's own split is used
        return None
    # A block's cost as if it sat on the middle stage: the splitter balances stage-independent costs.
    mid = replace(plan, num_stages=1)
    costs = [stage_estimate([b], 0, mid).total - mid.overhead_fraction * mid.ipu_memory_bytes for b in profile.blocks]
    try:
        res = auto_split(costs, plan.num_stages)
    except Exception:  # noqa: BLE001
        return None
    return _coerce_split(res, len(costs), plan.num_stages)


def _coerce_split(res: Any, n: int, s: int) -> list[int] | None:
    """Accept the shapes a splitter may return: cut indices, boundaries [0,..,n], groups, or stage per block."""
    for attr in ("splits", "boundaries", "stages"):
        if hasattr(res, attr):
            res = getattr(res, attr)
            break
    try:
        res = list(res)
    except TypeError:
        return None
    if len(res) == s and all(isinstance(g, (list, tuple, range)) for g in res):
        sizes = [len(g) for g in res]
        cuts, acc = [], 0
        for z in sizes[:-1]:
            acc += z
            cuts.append(acc)
        return cuts if sum(sizes) == n else None
    if all(isinstance(v, int) for v in res):
        if len(res) == n:  # stage id per block
            return [i for i in range(1, n) if res[i] != res[i - 1]] if len(set(res)) == s else None
        if len(res) == s + 1 and res[0] == 0 and res[-1] == n:
            return list(res[1:-1])
        if len(res) == s - 1:
            return list(res)
    return None


def best_split(profile: ActivationProfile, plan: IPUPlan) -> PlanEstimate:
    """Memory-balanced split: the splitter's (if it exists) or the exact minimax split, whichever is lower."""
    cands = []
    sp = _splitter_split(profile, plan)
    if sp is not None:
        try:
            cands.append(estimate_plan(profile, plan, sp, "ipu.splitter.auto_split"))
        except ValueError:
            pass
    cands.append(estimate_plan(profile, plan, _optimal_split(profile, plan), "memory minimax"))
    return min(cands, key=lambda e: e.max_total)


# ----------------------------------------------------------------------------------------------------------
# Planning: which micro-batch sizes fit on 1, 2, 4, 8 IPUs.


@dataclass
class FitResult:
    micro_batch: int
    num_ipus: int
    estimate: PlanEstimate  # without recomputation
    estimate_recompute: PlanEstimate  # with recompute='checkpoints'

    @property
    def status(self) -> str:
        if self.estimate.fits:
            return "fits"
        if self.estimate_recompute.fits:
            return "fits+rc"
        return "no"


def plan_fits(
    profile: ActivationProfile,
    micro_batches: Sequence[int],
    base: IPUPlan | None = None,
    ipu_counts: Sequence[int] = IPU_COUNTS,
) -> list[FitResult]:
    """For each micro-batch and IPU count (one pipeline of that many stages), the best split's estimate."""
    base = base or IPUPlan(micro_batch_size=1)
    out = []
    for mb in micro_batches:
        for n in ipu_counts:
            if n > len(profile.blocks):
                continue
            p = replace(base, micro_batch_size=mb, num_stages=n, splits=None, recompute="none",
                        gradient_accumulation=max(base.gradient_accumulation, min_accumulation(n)))
            e = estimate_plan(profile, p) if n > 1 else estimate_plan(profile, p, [])
            prc = replace(p, recompute="checkpoints")
            erc = estimate_plan(profile, prc) if n > 1 else estimate_plan(profile, prc, [])
            out.append(FitResult(mb, n, e, erc))
    return out


def max_micro_batch(profile: ActivationProfile, base: IPUPlan, num_ipus: int, limit: int = 4096) -> int:
    """Largest micro-batch that fits on `num_ipus` stages with `base`'s other settings (0 if none does).

    Memory grows with the micro-batch, so the answer is found by doubling then bisection.
    """

    # A split given for this many stages is kept (it is what the trainer will run); otherwise the
    # memory-balanced split is chosen for every micro-batch.
    keep = base.splits is not None and base.num_stages == num_ipus

    def fits(mb: int) -> bool:
        p = replace(base, micro_batch_size=mb, num_stages=num_ipus, splits=base.splits if keep else None,
                    gradient_accumulation=max(base.gradient_accumulation, min_accumulation(num_ipus)))
        return (estimate_plan(profile, p) if num_ipus > 1 or keep else estimate_plan(profile, p, [])).fits

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


def assumptions_text(plan: IPUPlan) -> str:
    """The assumptions behind the estimate, for printing next to its tables."""
    compute_b, state_b, master = PRECISIONS[plan.precision]
    overhead = _human(plan.overhead_fraction * plan.ipu_memory_bytes)
    return "\n".join([
        f"IPU budget {_human(plan.ipu_memory_bytes)} per Mk2 IPU; fixed overhead (code, exchange buffers, "
        f"control, host streams) = {plan.overhead_fraction:.0%} of it ({overhead}).",
        f"precision {plan.precision}: {compute_b}-byte weights/activations/gradients"
        + (", + fp32 master weights" if master else "")
        + f", {state_b}-byte optimizer state and gradient accumulators.",
        f"optimizer {plan.optimizer}: {OPTIMIZER_SLOTS[plan.optimizer]} state slot(s) per parameter, "
        + ("on chip" if plan.optimizer_on_chip else "off chip (Streaming Memory: not counted)") + ".",
        "pipeline: stage k of S holds 2(S-k)-1 micro-batches of activations in flight; stages balanced by "
        "memory (exact minimax over contiguous splits of stem, blocks.*, head; ipu.splitter considered if present).",
        "recompute 'checkpoints': in-flight micro-batches keep the stage input and every checkpoint output "
        "(default: every block's); one micro-batch's largest segment between checkpoints is rebuilt in backward "
        "(its saved tensors less its input, already stashed).",
        f"temporary memory = {TEMP_BOUNDARY_FACTOR} x largest block-boundary tensor of one micro-batch, capped at "
        f"available_memory_proportion ({plan.available_memory_proportion}) x IPU memory.",
        "activations = measured saved-for-backward tensors per block (CPU, fp32, dedup by storage) re-priced at "
        "the compute dtype.",
    ])


def format_plan_error(est: PlanEstimate, suggestions: Sequence[str]) -> str:
    w = est.worst
    parts = (
        f"weights {_human(w.weights + w.master_weights)}, optimizer {_human(w.optimizer_state)}, "
        f"grads {_human(w.gradients)}, activations {_human(w.activations)} ({w.in_flight} micro-batches in "
        f"flight), temporary {_human(w.temporary)}, overhead {_human(w.overhead)}"
    )
    msg = f"{w.label} needs ~{_human(w.total)} > {_human(w.budget)} budget [{parts}]"
    if suggestions:
        msg += ": use " + ", or ".join(suggestions)
    return msg


def suggest(profile: ActivationProfile, plan: IPUPlan) -> list[str]:
    """Concrete changes that would make `plan` fit (each checked with the same estimate)."""
    out = []
    mb = max_micro_batch(profile, plan, plan.num_stages)
    if 0 < mb < plan.micro_batch_size:
        out.append(f"micro_batch_size <= {mb}")
    if plan.splits is not None and plan.num_stages > 1:
        bal = best_split(profile, replace(plan, splits=None))
        if bal.fits:
            names = ", ".join(profile.names[i] for i in bal.splits)
            out.append(f"pipeline_splits [{names}] (memory-balanced)")
    for n in (2, 4, 8, 16):
        if n > plan.num_stages and n <= len(profile.blocks):
            # PopTorch's pipelined training needs gradient accumulation >= 2N - 1 for N stages
            acc = max(plan.gradient_accumulation, min_accumulation(n))
            p = replace(plan, num_stages=n, splits=None, gradient_accumulation=acc)
            if estimate_plan(profile, p).fits:
                out.append(f"{n} pipeline stages (gradient_accumulation >= {2 * n - 1})")
                break
    if plan.recompute == "none":
        p = replace(plan, recompute="checkpoints")
        if estimate_plan(profile, p).fits:
            out.append("execution.recompute: checkpoints")
    if plan.optimizer_on_chip and OPTIMIZER_SLOTS[plan.optimizer]:
        p = replace(plan, optimizer_on_chip=False)
        if estimate_plan(profile, p).fits:
            out.append("optimizer state off chip")
    if plan.precision == "32.32":
        p = replace(plan, precision="16.32")
        if estimate_plan(profile, p).fits:
            out.append("precision 16.32")
    if not out:
        out.append("a smaller model or resolution (no single change found that fits)")
    return out


# ----------------------------------------------------------------------------------------------------------
# The trainer's pre-compile check.


_PROFILE_CACHE: dict[tuple, ActivationProfile] = {}


def profile_model(model: Any, resolution: int, *, cache: bool = True) -> ActivationProfile:
    """Measure a model's per-block activation profile at `resolution` (CPU, fp32, mb 1 and 2; cached).

    The model is deep-copied to CPU float32 so the caller's model (possibly already on a device or in half)
    is not touched.
    """
    import copy

    import torch

    from ipu_norm.memory.measure import fit_activation_scaling

    key = (id(model), resolution)
    if cache and key in _PROFILE_CACHE:
        return _PROFILE_CACHE[key]
    m = copy.deepcopy(model).float().cpu()
    with torch.random.fork_rng():
        prof = fit_activation_scaling(m, resolution, fit_sizes=(1, 2), verify_sizes=())
    if cache:
        _PROFILE_CACHE[key] = prof
    return prof


def check_fits_ipu(
    model: Any,
    plan_or_config: Any,
    *,
    config: Any = None,
    resolution: int | None = None,
    profile: ActivationProfile | None = None,
    **overrides: Any,
) -> PlanEstimate:
    """Raise MemoryBudgetError if the plan's stages would not fit in IPU memory; return the estimate if they do.

    Call it before compiling (poptorch.trainingModel / .compile) or allocating anything on the device.
    `plan_or_config`: an IPUPlan, an ipu.plan.ExecutionPlan, the app's Config or a config dict (see
    IPUPlan.from_any); `config`: searched after it for what an ExecutionPlan lacks (optim.name/momentum,
    data.train_size); `resolution`: training image side (default: the config's data.train_size, else
    model.default_cfg['train_size'], else 224); `overrides`: IPUPlan fields (e.g. optimizer='rmsprop').
    Measuring the profile runs two forward passes on CPU (ResNet-50 at 224 px: a few seconds).
    """
    plan = IPUPlan.from_any(plan_or_config, config, **overrides)
    profile = profile or _resolve_profile(model, plan_or_config, config, resolution)
    est = estimate_plan(profile, plan)
    if not est.fits:
        raise MemoryBudgetError(format_plan_error(est, suggest(profile, plan)), est)
    return est


def _resolve_profile(model: Any, plan_or_config: Any, config: Any, resolution: int | None) -> ActivationProfile:
    if resolution is None:
        res = _finder(plan_or_config, config)("resolution", "image_size", "train_size", "input_size")
        cfg = getattr(model, "default_cfg", None) or {}
        resolution = int(res) if isinstance(res, (int, float)) else int(cfg.get("train_size", 224))
    return profile_model(model, resolution)


def unit_memory_costs(profile: ActivationProfile, plan: IPUPlan) -> list[float]:
    """Per-unit bytes (stem, blocks.*, head) for one micro-batch in flight, overhead excluded: a cost vector for
    ``ipu.splitter.plan_pipeline(cost=...)``. Stage-dependent in-flight counts are not in it; for splits that
    account for them use ``memory_balanced_splits``."""
    one = replace(plan, num_stages=1, splits=[])
    return [stage_estimate([b], 0, one).total - one.overhead_fraction * one.ipu_memory_bytes for b in profile.blocks]


def memory_balanced_splits(
    model: Any, plan_or_config: Any, num_stages: int | None = None, *, config: Any = None,
    resolution: int | None = None, profile: ActivationProfile | None = None, **overrides: Any,
) -> list[str]:
    """``pipeline_splits`` names (e.g. ['blocks.4', 'blocks.11']) minimising the fullest IPU's estimate."""
    if num_stages is not None:
        overrides["num_stages"] = num_stages
    plan = replace(IPUPlan.from_any(plan_or_config, config, **overrides), splits=None)
    profile = profile or _resolve_profile(model, plan_or_config, config, resolution)
    if plan.num_stages == 1:
        return []
    est = best_split(profile, plan)
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
    "IPU_COUNTS", "IPU_MEMORY_BYTES", "IPUPlan", "MemoryBudgetError", "OPTIMIZER_SLOTS", "PRECISIONS",
    "PlanEstimate", "StageEstimate", "FitResult", "assumptions_text", "best_split",
    "check_fits_ipu", "estimate_plan", "in_flight", "max_micro_batch", "min_accumulation", "memory_balanced_splits",
    "plan_fits", "profile_model", "read_popvision", "stage_estimate", "suggest", "unit_memory_costs",
]
