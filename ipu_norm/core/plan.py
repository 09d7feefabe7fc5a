"""Execution plan: the device-independent description of how one training step runs.

`build_plan(execution, model, train)` turns the config's ``execution:`` section (plus ``train.micro_batch_size`` /
``train.global_batch_size``) and a MODEL CONTRACT model into an `ExecutionPlan`: batch arithmetic, pipeline stages,
recomputation checkpoints, memory proportions, precision, loss scaling and optimizer-state placement. The plan is
pure Python, the one plan type of the project, and is consumed by:

- ipu_norm/ipu/poptorch_adapter.py (PopTorch options, BeginBlock, recomputation checkpoints),
- ipu_norm/parallel/ (the same stages with torch.distributed.pipelining, DDP replicas, torch.utils.checkpoint),
- ipu_norm/train/backend.py's TorchBackend (micro-batches x accumulation on one device),
- ipu_norm/memory/estimate.py (the IPU memory estimate reads the same object).

Recomputation is always stated explicitly (``plan.recompute``), as the mode that will actually run:

- ``none``: nothing is recomputed. On a pipelined IPU plan PopTorch would switch on PopART's Pipeline recomputation
  by itself when ``autoRecomputation`` is unset (graphcore/poptorch sdk/poptorch/3.4.0,
  popart_compiler/source/Compiler.cpp:572-578), so the adapter sets ``RecomputationType::None`` explicitly.
- ``standard``: PopART's Standard mode on one IPU per replica: PopART picks its own checkpoints
  (graphcore/popart sdk/poplar/3.4.0, willow/src/recompute.cpp:64-150); checkpoints of ours are not used.
- ``recompute_all``: PopART's RecomputeAll with explicit recomputation on one IPU: every forward op is recomputed
  from the model input (willow/src/recompute.cpp:163-181).
- ``pipeline``: PopART's Pipeline mode (pipelined plans only): each stage but the last stashes its input only and
  recomputes its forward in the backward (willow/src/transforms/pipeline.cpp:776-869, 1123-1274).
- ``checkpoints``: manual checkpoints (``recompute_checkpoints``, module names whose outputs are kept) on top of
  RecomputeAll (one IPU, as Graphcore's ``recompute_mode: manual``) or Pipeline (pipelined).
The config value ``auto`` resolves to what PopTorch runs by default with recomputation on: ``pipeline`` for a
pipelined IPU plan, ``standard`` for one IPU, and checkpoints at every block on CPU/GPU (torch.utils.checkpoint).

Batch arithmetic (Graphcore's convention, REFERENCE.md): global batch = micro-batch x replicas x gradient
accumulation; one host call (a "step" of PopTorch) consumes global batch x device iterations samples.

The config sections may be the app engineer's dataclasses or plain dicts: fields are read by name with defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PRECISIONS = ("32.32", "16.32", "16.16", "bf16")
# What the config may say; the plan holds one of PLAN_RECOMPUTE_MODES (never 'auto').
RECOMPUTE_MODES = ("none", "auto", "standard", "recompute_all", "pipeline", "checkpoints")
PLAN_RECOMPUTE_MODES = ("none", "standard", "recompute_all", "pipeline", "checkpoints")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
DEVICES = ("auto", "cpu", "cuda", "ipu")
# Initial loss scale for automatic loss scaling on the IPU (PopART ALS adapts it from here) and the static default
# used for 16.16 when the user asks for 'auto' on a device without ALS. 2**7 is Graphcore's usual starting point
# for CNNs in fp16.
DEFAULT_INITIAL_LOSS_SCALE = 128.0


class PlanError(ValueError):
    """An execution config that cannot run; the message says what to change."""


@dataclass(frozen=True)
class PrecisionSpec:
    """What a precision string means.

    ``'A.B'`` follows Graphcore's examples: A = bits of weights/activations on the device (compute dtype),
    B = bits of matmul/conv partials and of gradient accumulators / optimizer state.
    ``'bf16'`` is bfloat16 autocast with fp32 weights (CPU/GPU only: Mk2 IPUs have no bfloat16).
    """

    name: str
    compute_dtype: torch.dtype
    partials_dtype: torch.dtype
    accum_dtype: torch.dtype

    @property
    def is_half(self) -> bool:
        """True when activations/weights run in a 16-bit float type."""
        return self.compute_dtype in (torch.float16, torch.bfloat16)

    @classmethod
    def parse(cls, name: str | float) -> PrecisionSpec:
        """Parse '32.32' | '16.32' | '16.16' | 'bf16' (YAML may hand us a float such as 16.16)."""
        key = _precision_key(name)
        if key == "32.32":
            return cls(key, torch.float32, torch.float32, torch.float32)
        if key == "16.32":
            return cls(key, torch.float16, torch.float32, torch.float32)
        if key == "16.16":
            return cls(key, torch.float16, torch.float16, torch.float16)
        if key == "bf16":
            return cls(key, torch.bfloat16, torch.float32, torch.float32)
        raise PlanError(f"execution.precision={name!r} is not one of {', '.join(PRECISIONS)}")


def _precision_key(name: str | float) -> str:
    if isinstance(name, float):
        # YAML reads 16.16 and 32.32 as floats; 16.32 would read as 16.32 too. Format with two decimals.
        return f"{name:.2f}"
    return str(name).strip().lower()


@dataclass(frozen=True)
class LossScaling:
    """Static (``auto=False``) or automatic loss scaling; ``value`` is the (initial) scale."""

    auto: bool
    value: float

    @property
    def enabled(self) -> bool:
        return self.auto or self.value != 1.0


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: it starts at module `start` and runs on IPU `ipu` (within the replica)."""

    start: str
    ipu: int
    units: tuple[str, ...] = ()


@dataclass
class ExecutionPlan:
    """How one optimizer step is executed (see module docstring for the batch arithmetic)."""

    device: str
    micro_batch_size: int
    replicas: int
    gradient_accumulation: int
    device_iterations: int
    stages: list[StageSpec]
    pipeline_schedule: str
    recompute: str
    recompute_checkpoints: list[str]
    available_memory_proportion: list[float]
    precision: PrecisionSpec
    stochastic_rounding: bool
    loss_scaling: LossScaling
    optimizer_state_offchip: bool
    replicated_tensor_sharding: bool
    executable_cache_dir: str | None = None
    ipu_model: bool = False
    training: bool = True
    seed: int = 0
    compile: bool = False
    unit_names: list[str] = field(default_factory=list)
    # GroupNorm/LayerNorm statistics with the two-pass (stable) variance on the IPU, as Graphcore's application sets
    # it (opts.enableStableNorm, vision/cnns/pytorch/utils/ipu_settings.py); True when the model has GN/LN layers.
    stable_norm: bool = False

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def pipelined(self) -> bool:
        return self.num_stages > 1

    @property
    def weights_half(self) -> bool:
        """The model itself is cast to fp16 on the IPU (``model.half()`` for 16.x): fp16 weights and no fp32 master
        copy on the device; the optimizer keeps fp32 state / accumulators for 16.32 (``accum_type``)."""
        return self.device == "ipu" and self.precision.compute_dtype == torch.float16

    @property
    def ipus_per_replica(self) -> int:
        return max(s.ipu for s in self.stages) + 1

    @property
    def ipus_used(self) -> int:
        return self.ipus_per_replica * self.replicas

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer update."""
        return self.micro_batch_size * self.replicas * self.gradient_accumulation

    @property
    def samples_per_step(self) -> int:
        """Samples consumed by one host call (PopTorch step): global batch x device iterations."""
        return self.global_batch_size * self.device_iterations

    @property
    def inference_device_iterations(self) -> int:
        """Device iterations for an inference executable: PopTorch needs >= the number of pipeline stages."""
        return max(self.device_iterations, self.num_stages) if self.pipelined else self.device_iterations

    @property
    def pipeline_splits(self) -> list[str]:
        """Names where stages 1.. start (the config's ``pipeline_splits``)."""
        return [s.start for s in self.stages[1:]]

    def stage_of(self, unit: str) -> int:
        """Index of the stage that runs `unit` ('stem', 'blocks.<i>', 'head')."""
        for k, s in enumerate(self.stages):
            if unit in s.units:
                return k
        raise KeyError(unit)

    def describe(self) -> str:
        """One-paragraph human summary, printed by the trainer at start."""
        stages = ", ".join(f"IPU{s.ipu}<-{s.start}" for s in self.stages)
        amp = ", ".join(f"{p:g}" for p in self.available_memory_proportion)
        ls = "auto" if self.loss_scaling.auto else f"{self.loss_scaling.value:g}"
        ck = self.recompute_checkpoints
        ck_text = "" if not ck else f"[{', '.join(ck)}]" if len(ck) <= 4 else f"[{len(ck)} checkpoints]"
        return (
            f"device={self.device} precision={self.precision.name} micro_batch={self.micro_batch_size} "
            f"replicas={self.replicas} grad_accum={self.gradient_accumulation} "
            f"device_iterations={self.device_iterations} global_batch={self.global_batch_size} "
            f"samples/step={self.samples_per_step} stages=[{stages}] schedule={self.pipeline_schedule} "
            f"recompute={self.recompute}{ck_text} stable_norm={self.stable_norm} mem_proportion=[{amp}] "
            f"loss_scaling={ls} stochastic_rounding={self.stochastic_rounding} "
            f"optimizer_state_offchip={self.optimizer_state_offchip} rts={self.replicated_tensor_sharding}"
        )


def _get(section: Any, key: str, default: Any = None) -> Any:
    """Read `key` from a dataclass/namespace or a mapping; None and missing both give `default`."""
    if section is None:
        return default
    value = section.get(key, default) if isinstance(section, Mapping) else getattr(section, key, default)
    return default if value is None else value


def _choice(section: Any, key: str, default: str, allowed: tuple[str, ...]) -> str:
    """`key` of the execution section, lower-cased, checked against `allowed` (PlanError names the key)."""
    value = str(_get(section, key, default)).lower()
    if value not in allowed:
        raise PlanError(f"execution.{key}={value!r} is not one of {', '.join(allowed)}")
    return value


def _resolve_recompute(mode: str, device: str, *, pipelined: bool) -> str:
    """The recomputation that will run for config value `mode` (see module docstring); never 'auto'."""
    if mode != "auto":
        return mode
    if device == "ipu":
        return "pipeline" if pipelined else "standard"
    return "checkpoints"


def _unit_names(model: nn.Module) -> list[str]:
    for attr in ("stem", "blocks", "head"):
        if not hasattr(model, attr):
            raise PlanError(f"model {type(model).__name__} lacks .{attr} (MODEL CONTRACT); cannot plan stages")
    return ["stem", *[f"blocks.{i}" for i in range(len(model.blocks))], "head"]


def _valid_splits_msg(units: Sequence[str]) -> str:
    blocks = [u for u in units if u.startswith("blocks.")]
    shown = f"{blocks[0]} .. {blocks[-1]}" if len(blocks) > 2 else ", ".join(blocks)
    return f"valid split names: {shown}, head (a split 'blocks.i' starts a new stage at block i)"


def make_stages(units: Sequence[str], starts: Sequence[int]) -> list[StageSpec]:
    """Stages over `units` (stem, blocks.*, head): stage k+1 starts at unit index ``starts[k]``, one IPU each."""
    bounds = [0, *starts, len(units)]
    return [StageSpec(units[a], ipu=k, units=tuple(units[a:b])) for k, (a, b) in enumerate(zip(bounds[:-1],
                                                                                                bounds[1:]))]


def has_group_or_layer_norm(model: nn.Module) -> bool:
    """True when `model` normalises with GroupNorm / LayerNorm (PopART's GroupNorm ops, which enableStableNorm
    switches to the two-pass variance)."""
    return any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in model.modules())


def _available_ipus_from_env() -> int | None:
    """IPUs visible to this process when launched by poprun (POPDIST_* variables), else None (unknown)."""
    total = os.environ.get("POPDIST_NUM_TOTAL_REPLICAS")
    per = os.environ.get("POPDIST_NUM_IPUS_PER_REPLICA")
    if total and per:
        return int(total) * int(per)
    return None



def build_plan(
    execution: Any,
    model: nn.Module,
    train: Any = None,
    *,
    micro_batch_size: int | None = None,
    global_batch_size: int | None = None,
    available_ipus: int | None = None,
    training: bool = True,
    seed: int | None = None,
    split_cost: Any = "flops",
) -> ExecutionPlan:
    """Compute and validate the `ExecutionPlan`.

    Args:
        execution: the config's ``execution`` section (dataclass or dict; field names as in the schema).
        model: the model (real or on the meta device); its stem/blocks/head names the valid stage starts.
        train: the ``train`` section (``micro_batch_size``, ``global_batch_size``, ``seed``); the keyword arguments
            override it.
        available_ipus: IPUs the run may use (checked against replicas x IPUs per replica); None = not checked
            unless poprun's POPDIST_* variables say.
        training: False for inference plans (no accumulation / loss-scaling checks).
        split_cost: cost for automatic splitting when ``ipus_per_replica > 1`` and no ``pipeline_splits`` are given
            (see `ipu_norm.core.splitter.plan_pipeline`).

    Raises:
        PlanError: with a message naming the key to change.
    """
    from ipu_norm.core.backend import resolve_device

    device = resolve_device(_choice(execution, "device", "auto", DEVICES))
    units = _unit_names(model)

    mbs = int(micro_batch_size or _get(train, "micro_batch_size", 0) or 0)
    if mbs < 1:
        raise PlanError(f"train.micro_batch_size must be >= 1, got {mbs}")
    replicas = int(_get(execution, "replicas", 1))
    if replicas < 1:
        raise PlanError(f"execution.replicas must be >= 1, got {replicas}")
    device_iterations = int(_get(execution, "device_iterations", 1))
    if device_iterations < 1:
        raise PlanError(f"execution.device_iterations must be >= 1, got {device_iterations}")

    gbs = global_batch_size or _get(train, "global_batch_size", None)
    accum_cfg = _get(execution, "gradient_accumulation", None)
    if accum_cfg is not None and int(accum_cfg) < 1:
        raise PlanError(f"execution.gradient_accumulation must be >= 1, got {accum_cfg}")
    if gbs is None:
        accum = int(accum_cfg or 1)
    else:
        gbs = int(gbs)
        per_pass = mbs * replicas
        if gbs % per_pass:
            valid = sorted({(gbs // per_pass) * per_pass, (gbs // per_pass + 1) * per_pass} - {0})
            raise PlanError(
                f"train.global_batch_size={gbs} is not a multiple of micro_batch_size x replicas = {mbs} x {replicas} "
                f"= {per_pass}; use global_batch_size {' or '.join(map(str, valid))}, or change the micro-batch / "
                "replicas"
            )
        accum = gbs // per_pass
        if accum_cfg is not None and int(accum_cfg) != accum:
            raise PlanError(
                f"execution.gradient_accumulation={accum_cfg} contradicts train.global_batch_size={gbs} = "
                f"micro {mbs} x replicas {replicas} x accumulation {accum}; set gradient_accumulation: null "
                f"(derived) or {accum}"
            )

    # Pipeline stages.
    splits_cfg = _get(execution, "pipeline_splits", []) or []
    if isinstance(splits_cfg, str):
        splits_cfg = [splits_cfg]
    splits = [str(s) for s in splits_cfg]
    ipus_per_replica = _get(execution, "ipus_per_replica", None)
    if not splits and ipus_per_replica is not None and int(ipus_per_replica) > 1:
        from ipu_norm.core.splitter import plan_pipeline

        splits = plan_pipeline(model, int(ipus_per_replica), cost=split_cost)
    for s in splits:
        if s not in units or s == "stem":
            raise PlanError(f"execution.pipeline_splits: {s!r} is not a stage boundary of this model; "
                            + _valid_splits_msg(units))
    positions = [units.index(s) for s in splits]
    if positions != sorted(set(positions)):
        raise PlanError(f"execution.pipeline_splits {splits} must be distinct and in model order")
    stages = make_stages(units, positions)
    # ipus_per_replica == 1 is the schema's default: with explicit splits it means "derive it from the splits".
    if ipus_per_replica is not None and int(ipus_per_replica) > 1 and int(ipus_per_replica) != len(stages):
        raise PlanError(
            f"execution.ipus_per_replica={ipus_per_replica} but pipeline_splits {splits} make {len(stages)} stages "
            f"(one per IPU); set ipus_per_replica: {len(stages)} or give {int(ipus_per_replica) - 1} splits "
            f"(or none, to split automatically)"
        )

    schedule = _choice(execution, "pipeline_schedule", "gpipe", PIPELINE_SCHEDULES)
    if training and len(stages) > 1:
        # PopTorch counts 2N-1 pipeline stages when training N IPU stages (each forward stage gets a backward
        # stage; the last ones are fused) and requires gradient accumulation >= that count
        # (popart_compiler/source/Compiler.cpp, docs/user_guide/overview.rst in graphcore/poptorch). torch's
        # GPipe / 1F1B schedules on CPU/GPU need one micro-batch per stage.
        need = 2 * len(stages) - 1 if device == "ipu" else len(stages)
        if accum < need:
            raise PlanError(
                f"pipelined training over {len(stages)} stages on {device} needs gradient accumulation >= {need} (the "
                f"pipeline is filled by accumulated micro-batches), got {accum}; raise train.global_batch_size to "
                f">= {mbs * replicas * need} or lower micro_batch_size / replicas"
            )

    # Recomputation: resolved to the mode that will actually run (module docstring).
    asked = _choice(execution, "recompute", "none", RECOMPUTE_MODES)
    recompute = _resolve_recompute(asked, device, pipelined=len(stages) > 1)
    ckpts = [str(c) for c in (_get(execution, "recompute_checkpoints", []) or [])]
    if asked == "checkpoints" and not ckpts:
        raise PlanError("execution.recompute='checkpoints' needs execution.recompute_checkpoints (e.g. ['blocks.3'])")
    if recompute != "checkpoints" and ckpts and asked != "auto":
        raise PlanError(f"execution.recompute_checkpoints is set but execution.recompute is {recompute!r}; set "
                        "recompute: checkpoints or remove the checkpoints")
    for c in ckpts:
        if c not in units:
            raise PlanError(f"execution.recompute_checkpoints: {c!r} is not a module of this model; valid names: "
                            f"stem, blocks.0 .. blocks.{len(units) - 3}, head (the output of that module is kept)")
    if ckpts and recompute in ("standard", "pipeline"):
        recompute = "checkpoints"  # 'auto' with checkpoints: PopART keeps them on top of its own mode
    if recompute == "checkpoints" and not ckpts:
        # 'auto' on CPU/GPU keeps every block output (torch.utils.checkpoint per block).
        ckpts = [u for u in units if u.startswith("blocks.")]
    if device == "ipu" and recompute in ("standard", "recompute_all") and len(stages) > 1:
        raise PlanError(f"execution.recompute={recompute!r} is a single-IPU PopART mode; a pipelined plan uses "
                        "'pipeline' (PopTorch's default when pipelining) or 'checkpoints'")
    if recompute == "pipeline" and len(stages) < 2:
        raise PlanError("execution.recompute='pipeline' needs pipeline_splits (two or more stages); on one IPU use "
                        "'standard', 'recompute_all' or 'checkpoints'")

    # Memory proportion per IPU.
    n_ipus = len(stages)
    amp_cfg = _get(execution, "available_memory_proportion", None)
    if amp_cfg is None:
        amp = [0.6] * n_ipus  # PopTorch's default proportion
    elif isinstance(amp_cfg, (int, float)):
        amp = [float(amp_cfg)] * n_ipus
    else:
        amp = [float(a) for a in amp_cfg]
        if len(amp) == 1:
            amp = amp * n_ipus
        if len(amp) != n_ipus:
            raise PlanError(f"execution.available_memory_proportion has {len(amp)} values for {n_ipus} IPUs per "
                            f"replica; give one float or exactly {n_ipus}")
    for i, a in enumerate(amp):
        if not 0.0 < a <= 1.0:
            raise PlanError(f"execution.available_memory_proportion for IPU{i} is {a}; it must be in (0, 1]")

    # Precision and loss scaling.
    precision = PrecisionSpec.parse(_get(execution, "precision", "32.32"))
    if device == "ipu" and precision.name == "bf16":
        raise PlanError("execution.precision='bf16' is not available on Mk2 IPUs (no bfloat16); use '16.32' or '16.16'")
    ls_cfg = _get(execution, "loss_scaling", None)
    if isinstance(ls_cfg, str):
        if ls_cfg.lower() != "auto":
            raise PlanError(f"execution.loss_scaling={ls_cfg!r}: use 'auto' or a positive number")
        # 'auto' means "as the precision needs": fp16 gradients get automatic (dynamic) scaling, while fp32 and
        # bf16 (fp32 exponent range) need none.
        if precision.compute_dtype == torch.float16:
            loss_scaling = LossScaling(auto=True, value=DEFAULT_INITIAL_LOSS_SCALE)
        else:
            loss_scaling = LossScaling(auto=False, value=1.0)
    elif ls_cfg is None:
        loss_scaling = LossScaling(auto=False, value=1.0)
    else:
        if float(ls_cfg) <= 0:
            raise PlanError(f"execution.loss_scaling={ls_cfg} must be positive")
        loss_scaling = LossScaling(auto=False, value=float(ls_cfg))
    if training and precision.name == "16.16" and not loss_scaling.enabled:
        raise PlanError("execution.precision='16.16' keeps gradients in fp16 and needs loss scaling: set "
                        "execution.loss_scaling to 'auto' or a value such as 128")
    stochastic_rounding = bool(_get(execution, "stochastic_rounding", False))
    if stochastic_rounding and device != "ipu":
        # Stochastic rounding is an IPU hardware feature; elsewhere it is ignored rather than emulated.
        stochastic_rounding = False

    offchip = bool(_get(execution, "optimizer_state_offchip", False))
    rts = bool(_get(execution, "replicated_tensor_sharding", False))
    if rts and replicas < 2:
        raise PlanError("execution.replicated_tensor_sharding shards optimizer state across replicas; it needs "
                        "replicas >= 2")

    if device == "ipu":
        avail = available_ipus if available_ipus is not None else _available_ipus_from_env()
        if avail is not None and n_ipus * replicas > avail:
            raise PlanError(
                f"the plan needs {n_ipus} IPUs per replica x {replicas} replicas = {n_ipus * replicas} IPUs but "
                f"{avail} are available; lower execution.replicas or use fewer pipeline stages"
            )

    return ExecutionPlan(
        device=device,
        micro_batch_size=mbs,
        replicas=replicas,
        gradient_accumulation=accum,
        device_iterations=device_iterations,
        stages=stages,
        pipeline_schedule=schedule,
        recompute=recompute,
        recompute_checkpoints=ckpts,
        available_memory_proportion=amp,
        precision=precision,
        stochastic_rounding=stochastic_rounding,
        loss_scaling=loss_scaling,
        optimizer_state_offchip=offchip,
        replicated_tensor_sharding=rts,
        executable_cache_dir=_get(execution, "executable_cache_dir", None),
        ipu_model=bool(_get(execution, "ipu_model", False)),
        training=training,
        seed=int(seed if seed is not None else _get(train, "seed", 0)),
        compile=bool(_get(execution, "compile", False)),
        unit_names=units,
        stable_norm=has_group_or_layer_norm(model),
    )
