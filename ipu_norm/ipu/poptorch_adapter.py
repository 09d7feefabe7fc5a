"""Thin translation of an `ExecutionPlan` into PopTorch (Graphcore Poplar SDK 3.x).

Two layers, so that the translation is testable without the SDK:

1. Pure functions decide WHAT to set: `option_calls(plan)` returns a list of `OptionCall(path, args, kwargs)`
   (e.g. ``OptionCall("Training.gradientAccumulation", (8,))``) whose arguments may be symbolic references to
   poptorch attributes (`Ref("ReductionType.Mean")`) or objects to build (`Build("TensorLocationSettings", ...)`);
   `optimizer_spec(...)` returns the poptorch.optim class name and keyword arguments.
2. `apply_option_calls(opts, calls, poptorch)` walks the dotted paths with getattr and calls them, resolving the
   symbolic arguments against the real ``poptorch`` module (or any stand-in, which is how the tests record calls).

poptorch is imported lazily (`import_poptorch`): it is not on PyPI; it ships as a wheel in Graphcore's Poplar SDK.

PopTorch / PopDist names used here, written against Poplar SDK 3.4.0 (graphcore/poptorch tag sdk/poptorch/3.4.0:
python/options.py, python/__init__.py, python/ops.py, python/optim.py, python/enums.py) and Graphcore's examples for
popdist. tests/poptorch_api_sdk34.py holds their signatures; tests/test_poptorch_api.py checks every call made here
against it (run-time on a table-generated stand-in, and an AST scan), so add a new call's signature there too:

- python/options.py, class Options: ``replicationFactor``, ``deviceIterations``, ``autoRoundNumIPUs``,
  ``outputMode(OutputMode)``, ``setAvailableMemoryProportion({"IPU0": p, ...})`` (keys must start with "IPU"),
  ``enableExecutableCaching(path)``, ``useIpuModel(bool)``, ``randomSeed(int)``,
  ``setExecutionStrategy(PipelinedExecution(...))``, properties ``Training``, ``Precision``, ``TensorLocations``,
  ``_Popart`` (``_PopartOptions.set(key, value)``).
- options.py, _TrainingOptions: ``gradientAccumulation``, ``accumulationAndReplicationReductionType(ReductionType)``,
  ``setAutomaticLossScaling(bool)``; _PrecisionOptions: ``enableStochasticRounding(bool)``,
  ``setPartialsType(torch.float | torch.half)``; _TensorLocationOptions: ``setOptimizerLocation(
  TensorLocationSettings)``; TensorLocationSettings: ``useOnChipStorage(bool)``, ``useReplicatedTensorSharding(bool)``;
  ``PipelinedExecution(AutoStage.AutoIncrement)``.
- python/enums.py: ``ReductionType.Mean``, ``OutputMode.All`` / ``Sum``, ``AutoStage.AutoIncrement``,
  ``DataLoaderMode.AsyncRebatched``.
- python/ops.py: ``BeginBlock(module, user_id, ipu_id)`` (registers a forward pre-hook, returns the module),
  ``recomputationCheckpoint(*tensors)``, ``identity_loss(x, reduction)`` with reduction 'sum' | 'mean' | 'none'.
- python/__init__.py: ``trainingModel(model, options, optimizer)``, ``inferenceModel(model, options)``,
  ``DataLoader(options, dataset, batch_size, shuffle, num_workers, drop_last, ..., auto_distributed_partitioning,
  mode, ..., **kwargs)`` (kwargs, e.g. ``sampler``, go to torch's DataLoader).
- python/_poplar_executor.py, PoplarExecutor: ``compile``, ``copyWeightsToHost``, ``setOptimizer``,
  ``detachFromDevice``, ``destroy``, ``isAttachedToDevice``.
- python/optim.py: ``SGD(params, lr, momentum, dampening, weight_decay, nesterov, ..., loss_scaling,
  velocity_scaling, use_combined_accum, accum_type, velocity_accum_type)``, ``AdamW(params, lr, betas, eps,
  weight_decay, ..., loss_scaling, bias_correction, accum_type, first_order_momentum_accum_type,
  second_order_momentum_accum_type)``, ``RMSprop(params, lr, alpha, eps, weight_decay, momentum, centered, ...,
  loss_scaling, accum_type, first_order_momentum_accum_type, second_order_momentum_accum_type, use_tf_variant)``.
- PopART ``autoRecomputation`` values (popart.RecomputationType): 0 None, 1 Standard, 3 Pipeline, 4 RecomputeAll,
  as used with ``_Popart.set("autoRecomputation", ...)`` and ``explicitRecomputation`` in graphcore/examples
  vision/cnns/pytorch and poptorch's tests.
- Pipelining constraints, popart_compiler/source/Compiler.cpp and docs/user_guide/overview.rst: training N IPU
  stages needs ``Training.gradientAccumulation >= 2N - 1``; pipelined inference needs ``deviceIterations >= N``
  (enforced in ipu_norm/core/plan.py and `option_calls`).
- popdist (Graphcore examples, e.g. vision/cnns/pytorch utils): ``popdist.isPopdistEnvSet()``, ``popdist.init()``,
  ``popdist.getNumTotalReplicas()``, ``popdist.getNumLocalReplicas()``, ``popdist.getInstanceIndex()``,
  ``popdist.getNumInstances()``, ``popdist.poptorch.Options(ipus_per_replica=k)`` (poprun owns the replica count, so
  ``replicationFactor`` is not called on it). poprun exports POPDIST_NUM_TOTAL_REPLICAS,
  POPDIST_NUM_IPUS_PER_REPLICA, POPDIST_NUM_LOCAL_REPLICAS, ... and OpenMPI's OMPI_COMM_WORLD_* variables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ipu_norm.core.launch import popdist_rank_and_size, under_poprun  # noqa: F401  (re-exported: pa.*)
from ipu_norm.core.plan import ExecutionPlan
from ipu_norm.core.sdk import (  # noqa: F401  (re-exported: pa.*)
    POPLAR_SDK_MESSAGE,
    SDK_RELEASE,
    SDK_TORCH,
    SDK_TORCHVISION,
    PoplarSDKMissingError,
    PoptorchTorchMismatchError,
    import_poptorch,
    poptorch_installed,
    torch_mismatch_message,
)

# popart.RecomputationType values (checked in graphcore/examples and poptorch tests; see module docstring).
RECOMPUTE_NONE = 0
RECOMPUTE_STANDARD = 1
RECOMPUTE_PIPELINE = 3
RECOMPUTE_ALL = 4


@dataclass(frozen=True)
class Ref:
    """A reference to a poptorch attribute, resolved when applying (e.g. ``Ref('ReductionType.Mean')``)."""

    path: str


@dataclass(frozen=True)
class Build:
    """A poptorch object to construct when applying: ``poptorch.<cls>(*args)`` then chained ``.<method>(*a)``."""

    cls: str
    args: tuple = ()
    chain: tuple[tuple[str, tuple], ...] = ()


@dataclass(frozen=True)
class OptionCall:
    """``opts.<path>(*args, **kwargs)`` on a poptorch.Options object."""

    path: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def option_calls(plan: ExecutionPlan, *, popdist: bool = False, for_inference: bool = False) -> list[OptionCall]:
    """The poptorch.Options calls that realise `plan` (pure: no poptorch needed).

    Args:
        plan: the execution plan (``plan.replicas`` is the total replica count).
        popdist: the Options object comes from ``popdist.poptorch.Options`` (poprun sets the replica count, and
            ``replicationFactor`` must not be called).
        for_inference: options for an inference model (no Training.* calls, outputs of every batch).
    """
    calls: list[OptionCall] = []
    if not popdist:
        calls.append(OptionCall("replicationFactor", (plan.replicas,)))
    # Pipelined inference needs device iterations >= stages (PopTorch checks it at compile time).
    iterations = plan.inference_device_iterations if for_inference else plan.device_iterations
    calls.append(OptionCall("deviceIterations", (iterations,)))
    # A replica needs a power-of-two IPU partition; round up rather than fail for e.g. 3-stage pipelines.
    calls.append(OptionCall("autoRoundNumIPUs", (True,)))
    if plan.training and not for_inference:
        calls.append(OptionCall("Training.gradientAccumulation", (plan.gradient_accumulation,)))
        # Mean over micro-batches and replicas so the learning rate does not depend on how the global batch is split.
        calls.append(OptionCall("Training.accumulationAndReplicationReductionType", (Ref("ReductionType.Mean"),)))
        if plan.loss_scaling.auto:
            calls.append(OptionCall("Training.setAutomaticLossScaling", (True,)))
    # Training returns the sums of its outputs (loss, correct predictions) over the host call, as Graphcore's
    # application does (one scalar pair per replica crosses the link); inference needs every output.
    training_model = plan.training and not for_inference
    calls.append(OptionCall("outputMode", (Ref("OutputMode.Sum" if training_model else "OutputMode.All"),)))
    calls.append(
        OptionCall(
            "setAvailableMemoryProportion",
            ({f"IPU{i}": float(p) for i, p in enumerate(plan.available_memory_proportion)},),
        )
    )
    calls.append(OptionCall("Precision.enableStochasticRounding", (bool(plan.stochastic_rounding),)))
    calls.append(OptionCall("Precision.setPartialsType", (plan.precision.partials_dtype,)))
    if plan.executable_cache_dir:
        calls.append(OptionCall("enableExecutableCaching", (str(plan.executable_cache_dir),)))
    if plan.ipu_model:
        calls.append(OptionCall("useIpuModel", (True,)))
    calls.append(OptionCall("randomSeed", (int(plan.seed),)))
    if plan.training and not for_inference and (plan.optimizer_state_offchip or plan.replicated_tensor_sharding):
        location = Build(
            "TensorLocationSettings",
            chain=(
                ("useOnChipStorage", (not plan.optimizer_state_offchip,)),
                ("useReplicatedTensorSharding", (bool(plan.replicated_tensor_sharding),)),
            ),
        )
        calls.append(OptionCall("TensorLocations.setOptimizerLocation", (location,)))
    if plan.pipelined:
        # Stage ids follow BeginBlock order; AutoIncrement also allows two stages on one IPU in the future.
        calls.append(
            OptionCall("setExecutionStrategy", (Build("PipelinedExecution", (Ref("AutoStage.AutoIncrement"),)),))
        )
    if plan.stable_norm:
        # Two-pass GroupNorm/LayerNorm statistics, as Graphcore's application trains GN models (ipu_settings.py).
        calls.append(OptionCall("_Popart.set", ("enableStableNorm", True)))
    if plan.training and not for_inference:
        calls.extend(_recompute_calls(plan))
    return calls


def _recompute_calls(plan: ExecutionPlan) -> list[OptionCall]:
    """PopART recomputation options for ``plan.recompute`` (ipu_norm/core/plan.py docstring: what each mode runs)."""
    mode = plan.recompute
    if mode == "none":
        # Unset, PopTorch turns on Pipeline recomputation when pipelining (popart_compiler/source/Compiler.cpp:572-578
        # at sdk/poptorch/3.4.0): say None explicitly so what compiles is what the plan (and its estimate) says.
        return [OptionCall("_Popart.set", ("autoRecomputation", RECOMPUTE_NONE))] if plan.pipelined else []
    if mode == "pipeline" or (mode == "checkpoints" and plan.pipelined):
        # Each stage's forward is recomputed in its backward; recomputationCheckpoint outputs are kept.
        return [OptionCall("_Popart.set", ("autoRecomputation", RECOMPUTE_PIPELINE))]
    auto = RECOMPUTE_STANDARD if mode == "standard" else RECOMPUTE_ALL  # 'recompute_all' / manual 'checkpoints'
    return [OptionCall("_Popart.set", ("explicitRecomputation", True)),
            OptionCall("_Popart.set", ("autoRecomputation", auto))]


def _resolve_attr(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve_arg(value: Any, poptorch: Any) -> Any:
    if isinstance(value, Ref):
        return _resolve_attr(poptorch, value.path)
    if isinstance(value, Build):
        obj = _resolve_attr(poptorch, value.cls)(*[_resolve_arg(a, poptorch) for a in value.args])
        for method, margs in value.chain:
            # TensorLocationSettings methods return self, so chaining keeps the same object.
            obj = getattr(obj, method)(*[_resolve_arg(a, poptorch) for a in margs])
        return obj
    if isinstance(value, dict):
        return {k: _resolve_arg(v, poptorch) for k, v in value.items()}
    return value


def apply_option_calls(opts: Any, calls: Iterable[OptionCall], poptorch: Any) -> Any:
    """Apply `calls` to `opts` (a poptorch.Options or a recorder), resolving `Ref` / `Build` against `poptorch`."""
    for call in calls:
        fn = _resolve_attr(opts, call.path)
        fn(*[_resolve_arg(a, poptorch) for a in call.args], **{k: _resolve_arg(v, poptorch) for k, v in
                                                                call.kwargs.items()})
    return opts


def format_value(value: Any) -> str:
    """Python source for an option-call argument: `Ref` / `Build` as ``poptorch.`` expressions, dtypes as
    ``torch.<name>``, everything else as its repr (used by the dry run to print the exact calls)."""
    if isinstance(value, Ref):
        return f"poptorch.{value.path}"
    if isinstance(value, Build):
        chain = "".join(f".{m}({', '.join(format_value(a) for a in margs)})" for m, margs in value.chain)
        return f"poptorch.{value.cls}({', '.join(format_value(a) for a in value.args)}){chain}"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(format_value(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


def format_option_call(call: OptionCall, opts: str = "opts") -> str:
    """One option call as the Python line it stands for, e.g. ``opts.Training.gradientAccumulation(4)``."""
    parts = [format_value(a) for a in call.args] + [f"{k}={format_value(v)}" for k, v in call.kwargs.items()]
    return f"{opts}.{call.path}({', '.join(parts)})"


def create_options(plan: ExecutionPlan, *, for_inference: bool = False, poptorch: Any = None,
                   popdist_module: Any = None) -> Any:
    """A configured ``poptorch.Options`` (or ``popdist.poptorch.Options`` under poprun) for `plan`."""
    poptorch = poptorch or import_poptorch()
    use_popdist = under_poprun()
    if use_popdist:
        if popdist_module is None:
            try:
                import popdist
                import popdist.poptorch  # noqa: F401  (registers the submodule)
            except ImportError as err:
                raise PoplarSDKMissingError(
                    "launched by poprun (POPDIST_* set) but popdist is not importable: install the popdist wheel "
                    "from the Poplar SDK"
                ) from err
            popdist_module = popdist
        popdist_module.init()
        total = int(popdist_module.getNumTotalReplicas())
        if total != plan.replicas:
            raise ValueError(
                f"poprun runs {total} replicas but execution.replicas={plan.replicas}; make them equal "
                f"(poprun --num-replicas={plan.replicas}) so the global batch is what the config says"
            )
        opts = popdist_module.poptorch.Options(ipus_per_replica=plan.ipus_per_replica)
    else:
        opts = poptorch.Options()
    return apply_option_calls(opts, option_calls(plan, popdist=use_popdist, for_inference=for_inference), poptorch)


def annotate_model(model: nn.Module, plan: ExecutionPlan, poptorch: Any = None, *,
                   for_inference: bool = False) -> list[Any]:
    """Mark pipeline stages with ``poptorch.BeginBlock`` and (training only) recomputation checkpoints with forward
    hooks that wrap the module's output in ``poptorch.recomputationCheckpoint``. Returns the hook handles.

    The model must follow the MODEL CONTRACT; stage starts and checkpoints are module names such as 'blocks.7'.
    """
    poptorch = poptorch or import_poptorch()
    if plan.pipelined:
        for k, stage in enumerate(plan.stages):
            poptorch.BeginBlock(model.get_submodule(stage.start), f"stage{k}", stage.ipu)
    handles = []
    if plan.training and not for_inference and plan.recompute != "none":
        last_units = {s.units[-1] for s in plan.stages}
        for name in plan.recompute_checkpoints:
            if name in last_units:
                # A stage's output is stashed for the next stage anyway; a checkpoint there adds nothing.
                continue

            def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
                return poptorch.recomputationCheckpoint(output)

            handles.append(model.get_submodule(name).register_forward_hook(hook))
    return handles


class TrainingModelWithLoss(nn.Module):
    """The module handed to ``poptorch.trainingModel``: forward(images, targets) -> (loss, correct).

    PopTorch builds backward from ``poptorch.identity_loss``. uint8 images (8-bit host I/O) are converted and
    normalised by `input_norm` (ipu_norm.data.device.NormalizeUint8) as the graph's first layer; images are then cast
    to the compute dtype; the loss is computed in fp32 for stability in 16.x precisions. ``correct`` is the number of
    top-1 hits of the micro-batch (integer targets, or the argmax of soft ones): with ``OutputMode.Sum`` the host
    receives both summed over the host call. Logits are not returned unless `return_logits`.
    """

    def __init__(self, model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 compute_dtype: torch.dtype = torch.float32, poptorch: Any = None, return_logits: bool = False,
                 input_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.compute_dtype = compute_dtype
        self.return_logits = return_logits
        self.input_norm = input_norm
        self._poptorch = poptorch

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> Any:
        logits = self.model(_device_input(images, self.input_norm).to(self.compute_dtype))
        loss = self.criterion(logits.float(), targets)
        poptorch = self._poptorch or import_poptorch()
        loss = poptorch.identity_loss(loss, reduction="mean")
        labels = targets.argmax(-1) if targets.dim() > 1 else targets
        correct = (logits.argmax(-1) == labels).float().sum()
        return (loss, correct, logits) if self.return_logits else (loss, correct)


def _device_input(images: torch.Tensor, input_norm: nn.Module | None) -> torch.Tensor:
    """uint8 images through `input_norm` (in the graph); float ones as they are (the generated dataset)."""
    if images.dtype == torch.uint8:
        if input_norm is None:
            raise TypeError("uint8 images reached a model without an input normalisation layer (NormalizeUint8)")
        return input_norm(images)
    return images


class InferenceModel(nn.Module):
    """The module handed to ``poptorch.inferenceModel``: images (uint8 through `input_norm`) -> fp32 logits."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype = torch.float32,
                 input_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype
        self.input_norm = input_norm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_device_input(images, self.input_norm).to(self.compute_dtype)).float()


def cast_model_for_precision(model: nn.Module, plan: ExecutionPlan) -> nn.Module:
    """Half-cast the model for 16.x precisions (weights live in fp16 on the IPU; the optimizer's accum_type keeps
    fp32 accumulators / state for 16.32). Returns the same module."""
    if plan.precision.compute_dtype == torch.float16:
        model.half()
    return model


# rmsprop_tf: TensorFlow's RMSprop (ipu_norm/optim/rmsprop_tf.py), PopTorch's RMSprop with use_tf_variant=True.
_OPTIM_CLASSES = {"sgd": "SGD", "rmsprop": "RMSprop", "adamw": "AdamW", "rmsprop_tf": "RMSprop"}


def optimizer_spec(name: str, hparams: Mapping[str, Any], plan: ExecutionPlan) -> tuple[str, dict[str, Any]]:
    """``(poptorch.optim class name, keyword arguments)`` for an optimizer (pure; tested without poptorch).

    Args:
        name: 'sgd' | 'rmsprop' | 'adamw' | 'rmsprop_tf'.
        hparams: lr, weight_decay, momentum, nesterov (SGD), alpha, eps (RMSprop), betas, eps (AdamW);
            missing keys fall back to the PyTorch defaults.
        plan: gives the loss scaling and accumulator dtype (fp16 only for 16.16).
    """
    key = name.lower()
    if key not in _OPTIM_CLASSES:
        raise ValueError(f"optimizer {name!r} has no PopTorch mapping here; use one of {', '.join(_OPTIM_CLASSES)}")
    accum = plan.precision.accum_dtype
    kw: dict[str, Any] = {
        "lr": float(hparams["lr"]),
        "weight_decay": float(hparams.get("weight_decay", 0.0)),
        # With automatic loss scaling PopART starts from this value and adapts it.
        "loss_scaling": float(plan.loss_scaling.value),
        "accum_type": accum,
    }
    if key == "sgd":
        kw.update(
            momentum=float(hparams.get("momentum", 0.0)),
            nesterov=bool(hparams.get("nesterov", False)),
            velocity_accum_type=accum,
        )
    elif key in ("rmsprop", "rmsprop_tf"):
        kw.update(
            alpha=float(hparams.get("alpha", 0.99 if key == "rmsprop" else 0.9)),
            eps=float(hparams.get("eps", 1e-8 if key == "rmsprop" else 1e-10)),
            momentum=float(hparams.get("momentum", 0.0)),
            first_order_momentum_accum_type=accum,
            second_order_momentum_accum_type=accum,
        )
        if key == "rmsprop_tf":
            kw["use_tf_variant"] = True
    else:
        kw.update(
            betas=tuple(hparams.get("betas", (0.9, 0.999))),
            eps=float(hparams.get("eps", 1e-8)),
            first_order_momentum_accum_type=accum,
            second_order_momentum_accum_type=accum,
        )
    return _OPTIM_CLASSES[key], kw


def create_optimizer(params: Any, name: str, hparams: Mapping[str, Any], plan: ExecutionPlan,
                     poptorch: Any = None) -> Any:
    """A ``poptorch.optim`` optimizer over `params` (a parameter list or param groups)."""
    poptorch = poptorch or import_poptorch()
    cls_name, kw = optimizer_spec(name, hparams, plan)
    return getattr(poptorch.optim, cls_name)(params, **kw)


@dataclass(frozen=True)
class HostCall:
    """What one PopTorch host call of a training executable consumes and returns (plain arithmetic, no poptorch).

    PopTorch's rule (python/__init__.py:319-330 at sdk/poptorch/3.4.0): a ``poptorch.DataLoader`` with
    ``batch_size`` = the micro-batch yields batches of ``batch_size x deviceIterations x (replicationFactor /
    input_group_size) x gradientAccumulation`` samples -- one host call. ``replicas`` is the replication factor of
    this process's Options (all replicas, or the local ones under poprun).
    """

    micro_batch: int
    device_iterations: int
    replicas: int
    gradient_accumulation: int

    @property
    def micro_batches(self) -> int:
        """Micro-batches per host call (``_num_batches_to_combine`` in PopTorch)."""
        return self.device_iterations * self.replicas * self.gradient_accumulation

    @property
    def samples(self) -> int:
        """Samples per host call: the poptorch.DataLoader's combined batch size (``combinedBatchSize``)."""
        return self.micro_batch * self.micro_batches

    @property
    def samples_per_step(self) -> int:
        """Samples of one optimizer step over this process's replicas."""
        return self.samples // self.device_iterations

    def sum_divisor(self) -> int:
        """What an ``OutputMode.Sum`` output of a per-micro-batch mean (the loss) is divided by to give the mean
        over the host call: one term per micro-batch of every device iteration, accumulation step and replica."""
        return self.micro_batches

    def loader_batches(self, num_samples: int, drop_last: bool = True) -> int:
        """Batches an AsyncRebatched ``poptorch.DataLoader`` yields over `num_samples` sampled indices: whole host
        calls, plus one short batch for the remainder unless `drop_last` (PopTorch's ``DataLoader.__len__``,
        python/__init__.py:468-478)."""
        whole, rest = divmod(int(num_samples), self.samples)
        return whole + (1 if rest and not drop_last else 0)


def host_call(plan: ExecutionPlan, local_replicas: int | None = None) -> HostCall:
    """The `HostCall` of `plan`'s training executable for a process driving `local_replicas` (default: all)."""
    return HostCall(plan.micro_batch_size, plan.device_iterations,
                    plan.replicas if local_replicas is None else int(local_replicas), plan.gradient_accumulation)


def dataloader_kwargs(plan: ExecutionPlan, *, sampler: Any = None, num_workers: int = 0, **kwargs: Any) -> dict:
    """Keyword arguments of ``poptorch.DataLoader`` for `plan` (pure; ``mode`` is a `Ref`).

    batch_size is the micro-batch: PopTorch multiplies it by device iterations, replicas and accumulation itself.
    With a `sampler` (ours shards per process and resumes mid-epoch), PopTorch's own distributed partitioning is
    off and ``shuffle`` is False (the sampler shuffles). drop_last=True: a short last host call would need another
    executable.
    """
    kw: dict[str, Any] = {"batch_size": plan.micro_batch_size, "shuffle": sampler is None, "num_workers": num_workers,
                          "drop_last": True,
                          # A loading process prefetches whole host calls (AsynchronousDataAccessor rebatches the
                          # workers' batches to the combined size).
                          "mode": Ref("DataLoaderMode.AsyncRebatched")}
    if sampler is not None:
        kw.update(sampler=sampler, auto_distributed_partitioning=False)
    kw.update(kwargs)
    return kw


def create_dataloader(options: Any, dataset: Any, plan: ExecutionPlan, *, sampler: Any = None, num_workers: int = 0,
                      poptorch: Any = None, **kwargs: Any) -> Any:
    """``poptorch.DataLoader`` over `dataset` in AsyncRebatched mode whose batches are whole host calls
    (`dataloader_kwargs`; extra `kwargs` such as collate_fn / worker_init_fn / generator go to torch's loader)."""
    poptorch = poptorch or import_poptorch()
    kw = dataloader_kwargs(plan, sampler=sampler, num_workers=num_workers, **kwargs)
    return poptorch.DataLoader(options, dataset, **{k: _resolve_arg(v, poptorch) for k, v in kw.items()})
