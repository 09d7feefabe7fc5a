"""``run_train.py --dry-run``: show what an IPU run would do, without training.

Without the Poplar SDK it builds the model, the execution plan, the optimizer and the adapter's option calls and
prints them: the exact ``poptorch.Options`` calls as Python lines, the pipeline stages with their blocks and the
estimated memory per IPU (ipu_norm.memory), the ``poptorch.optim`` optimizer with its loss scaling, the
``poptorch.DataLoader`` that feeds the device, the batch arithmetic and the bytes crossing the host link per
optimizer step. With poptorch importable it then also prepares the backend exactly as
training would and compiles the training executable (``PoplarExecutor.compile``) with example inputs, and exits
before the first step.

Exit codes: 0 the run would start; 1 it would be refused (plan error, predicted memory overflow with
``execution.memory_check: error``, exact AGC or a per-step EMA on the IPU backend); 2 the config does not run on
IPUs (``--dry-run`` describes the IPU path only: add ``--device ipu``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ipu_norm.ipu import poptorch_adapter as pa

PRINT = Callable[[str], None]


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _stage_lines(plan: Any, estimate: Any) -> list[str]:
    by_index = {s.index: s for s in estimate.stages} if estimate is not None else {}
    lines = []
    for k, stage in enumerate(plan.stages):
        units = list(stage.units)
        span = units[0] if len(units) == 1 else f"{units[0]} .. {units[-1]}"
        line = f"  stage {k} on IPU{stage.ipu}: {span} ({len(units)} units)"
        est = by_index.get(k)
        if est is not None:
            line += (
                f" | est. {_mb(est.total)} of {_mb(est.budget)} ({100 * est.total / est.budget:.0f}%): weights "
                f"{_mb(est.weights)}, optimizer {_mb(est.optimizer_state)}, activations "
                f"{_mb(est.activations)} x{est.in_flight} in flight, temporary {_mb(est.temporary)}"
            )
        lines.append(line)
        if plan.pipelined:
            lines.append(f"    poptorch.BeginBlock(model.get_submodule({stage.start!r}), 'stage{k}', {stage.ipu})")
    return lines


def _estimate(model: torch.nn.Module, plan: Any, cfg: Any) -> tuple[Any, str | None, str]:
    """(estimate or None, refusal message or None, verdict line) following execution.memory_check."""
    mode = cfg.execution.memory_check
    if mode == "off":
        return None, None, "memory estimate: skipped (execution.memory_check: off)"
    from ipu_norm.memory.estimate import MemoryBudgetError, check_fits_ipu

    try:
        est = check_fits_ipu(model, plan, config=cfg)
    except MemoryBudgetError as err:
        if mode == "error":
            return err.estimate, f"{err} (execution.memory_check: error refuses this before compiling)", "DOES NOT FIT"
        return err.estimate, None, f"memory estimate: DOES NOT FIT ({err}); execution.memory_check: warn tries anyway"
    worst = est.worst
    return est, None, (f"memory estimate: fits (fullest: stage {worst.index} at "
                       f"{100 * worst.total / worst.budget:.0f}% of {_mb(worst.budget)})")


def describe(cfg: Any, model: torch.nn.Module, plan: Any, optimizer: torch.optim.Optimizer, out: PRINT) -> str | None:
    """Print the IPU run of `cfg` (see module docstring); return why it would be refused, or None."""
    from ipu_norm.ipu.backend import AGC_UNSUPPORTED, EMA_UNSUPPORTED, _optimizer_name_and_hparams

    problems: list[str] = []
    popdist = pa.under_poprun()
    instance, instances = pa.popdist_rank_and_size() if popdist else (0, 1)
    local_replicas = max(1, plan.replicas // instances)
    ex = cfg.execution

    out(f"dry run: {cfg.model.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, norm "
        f"{cfg.model.norm}) on {plan.ipus_used} IPUs = {plan.replicas} replicas x {plan.ipus_per_replica} IPUs, "
        f"precision {plan.precision.name}")
    out(f"plan: {plan.describe()}")

    out("")
    out("poptorch options (training model):")
    if popdist:
        out(f"  opts = popdist.poptorch.Options(ipus_per_replica={plan.ipus_per_replica})  # under poprun, "
            f"instance {instance} of {instances}")
    else:
        out("  opts = poptorch.Options()")
    for call in pa.option_calls(plan, popdist=popdist):
        out(f"  {pa.format_option_call(call)}")
    inference = [pa.format_option_call(c) for c in pa.option_calls(plan, popdist=popdist, for_inference=True)]
    out(f"  (the inference model for evaluation uses the same options without Training.* / _Popart recomputation, "
        f"and {next(line for line in inference if '.deviceIterations(' in line)[5:]})")

    out("")
    estimate, refusal, verdict = _estimate(model, plan, cfg)
    out(f"pipeline: {plan.num_stages} stage(s), schedule {plan.pipeline_schedule}, recompute {plan.recompute}"
        + (f" ({len(plan.recompute_checkpoints)} checkpoints)" if plan.recompute != "none" else ""))
    for line in _stage_lines(plan, estimate):
        out(line)
    out(f"  {verdict}")
    if refusal:
        problems.append(refusal)

    out("")
    if cfg.train.ema_decay is not None:
        problems.append(EMA_UNSUPPORTED.format(ema=cfg.train.ema_decay))
    if cfg.optim.agc_clip is not None and cfg.optim.agc_scope == "step":
        problems.append(AGC_UNSUPPORTED)
    elif cfg.optim.agc_clip is not None:
        from ipu_norm.optim.agc_scope import enable_micro_batch_agc, micro_batch_loss_scale

        try:
            scale = micro_batch_loss_scale("ipu", plan.precision.name, plan.loss_scaling, 1)
            layers = enable_micro_batch_agc(model, cfg.optim.agc_clip, cfg.optim.agc_eps, scale)
            exact = plan.gradient_accumulation == 1 and plan.replicas == 1
            out(f"AGC: per micro-batch in the backward pass (PopART op ipu_norm.MicroBatchAGC, clip "
                f"{cfg.optim.agc_clip:g}, loss scale {scale:g}) on the parameters of {len(layers)} Scaled-WS convs; "
                + ("exact (accumulation 1, one replica)" if exact else
                   f"not exact AGC: each of {plan.gradient_accumulation} micro-batches x {plan.replicas} replicas is "
                   "clipped before accumulation and all-reduce"))
        except ValueError as err:
            problems.append(str(err))
    name, hparams = _optimizer_name_and_hparams(optimizer)
    cls, kw = pa.optimizer_spec(name, hparams, plan)
    # The backend hands PopTorch the trainer's parameter groups, each with its own lr and weight decay.
    groups = ", ".join(f"{len(g['params'])} tensors weight_decay={g.get('weight_decay', 0.0):g}"
                       for g in optimizer.param_groups)
    args = ", ".join(f"{k}={pa.format_value(v)}" for k, v in kw.items() if k != "weight_decay")
    out(f"optimizer: poptorch.optim.{cls}([{groups}], {args})")
    scaling = ("automatic (opts.Training.setAutomaticLossScaling(True)), starting at "
               f"{plan.loss_scaling.value:g}" if plan.loss_scaling.auto else f"static {plan.loss_scaling.value:g}")
    out(f"  loss scaling: {scaling}; learning rate pushed with setOptimizer once per host call")

    out("")
    for line in _data_lines(cfg, model, plan, local_replicas, instances):
        out(line)
    if ex.executable_cache_dir:
        out(f"executable cache: {ex.executable_cache_dir}")
    return "; ".join(problems) or None


def _data_lines(cfg: Any, model: torch.nn.Module, plan: Any, local_replicas: int, instances: int) -> list[str]:
    """How the training data reach the IPUs and what crosses the host link per optimizer step."""
    from ipu_norm.train.builders import build_criterion, image_sizes

    call = pa.host_call(plan, local_replicas)
    micro, accum, iters = plan.micro_batch_size, plan.gradient_accumulation, plan.device_iterations
    kw = pa.dataloader_kwargs(plan, sampler="sampler", num_workers=cfg.data.num_workers)
    args = ", ".join(f"{k}={'sampler' if k == 'sampler' else pa.format_value(v)}" for k, v in kw.items())
    lines = [
        f"data: {cfg.data.dataset} through poptorch.DataLoader(opts, dataset, {args}), one per epoch (built after "
        f"the sampler's epoch is set: PopTorch forks its loading process then); each batch is one host call of "
        f"{call.samples} samples ({call.micro_batches} micro-batches), sharded over {instances} instance(s)",
        f"batch: micro {micro} x accumulation {accum} x replicas {plan.replicas} x device iterations {iters} = "
        f"{micro * accum * plan.replicas * iters} samples per host call"
        + (f" over all {instances} instances (this one: {call.samples})" if instances > 1 else "")
        + f" ({iters} optimizer steps: device iterations {iters}); global batch (per optimizer step) = {micro} x "
        f"{accum} x {plan.replicas} = {plan.global_batch_size}",
    ]
    size, _ = image_sizes(cfg.data, model)
    per_step = plan.global_batch_size  # samples of one optimizer step over all replicas
    _, soft = build_criterion(cfg)
    classes = cfg.model.num_classes
    image_bytes = per_step * 3 * size * size  # uint8
    label_bytes = per_step * (4 * classes if soft else 4)  # fp32 soft targets, or int32 class ids
    out_bytes = 2 * 4 * plan.replicas / iters  # OutputMode.Sum: (loss, top-1 hits) in fp32 per replica per call
    lines += [
        "host link per optimizer step (all replicas; one host call carries "
        f"{iters} steps):",
        f"  to the IPUs: images {per_step} x 3 x {size} x {size} uint8 = {image_bytes / 2**20:,.1f} MB "
        f"(8-bit input: converted and normalised on the IPU by NormalizeUint8, the traced model's first layer)"
        + (", labels " + (f"{per_step} x {classes} fp32 soft targets (Mixup/CutMix/label smoothing on the host)"
                          if soft else f"{per_step} int32 class ids")
           + f" = {label_bytes / 2**20:,.2f} MB"),
        f"  from the IPUs: loss and top-1 hits summed over the host call, outputMode(Sum): 2 x 4 bytes x "
        f"{plan.replicas} replicas per call = {out_bytes:g} bytes per step",
        "  weights copied to host per optimizer step: 0 MB (only at checkpoints, validation and the end)",
    ]
    if cfg.data.dataset == "generated":
        lines.append(f"  (data.dataset: generated yields float32 images, {4 * image_bytes / 2**20:,.1f} MB per step; "
                     "imagefolder and digits batches are uint8 as above)")
    return lines


def _compile(cfg: Any, model: torch.nn.Module, plan: Any, optimizer: torch.optim.Optimizer, poptorch: Any,
             out: PRINT) -> None:
    """Prepare the backend as training does and compile the training executable with example inputs."""
    from ipu_norm.core.backend import TrainSpec
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.builders import build_criterion, image_sizes

    criterion, soft = build_criterion(cfg)
    backend = PoptorchBackend(cfg, poptorch=poptorch)
    step_agc = cfg.optim.agc_clip if cfg.optim.agc_scope == "step" else None  # micro_batch: set up by describe
    backend.prepare(model, optimizer, plan, TrainSpec(criterion=criterion, agc_clip=step_agc))
    n = plan.micro_batch_size * backend.micro_batches_per_step
    size, _ = image_sizes(cfg.data, model)  # the trainer's train size
    # The executable is compiled for what the loader yields: uint8 images (generated data: float32).
    images = torch.zeros(n, 3, size, size, dtype=torch.float32 if cfg.data.dataset == "generated" else torch.uint8)
    classes = cfg.model.num_classes
    targets = torch.full((n, classes), 1.0 / classes) if soft else torch.zeros(n, dtype=torch.long)
    out(f"compiling the training executable with example inputs {tuple(images.shape)} ...")
    start = time.perf_counter()
    try:
        backend.train_model.compile(images, targets)
    finally:
        backend.close()
    out(f"compiled in {time.perf_counter() - start:.1f} s; exiting before training (dry run)")


def dry_run(cfg: Any, *, out: PRINT = print, poptorch: Any = None) -> int:
    """Run the dry run of `cfg` and return the process exit code (see module docstring)."""
    from ipu_norm.core.plan import PlanError, build_plan
    from ipu_norm.train.builders import build_model, build_optimizer

    if cfg.execution.device != "ipu":
        print(f"error: --dry-run describes the IPU path; this config runs on execution.device="
              f"{cfg.execution.device!r}. Add --device ipu (or use --print-config to see a CPU/GPU config).",
              file=sys.stderr)
        return 2
    if poptorch is None:
        try:
            poptorch = pa.import_poptorch()
        except pa.PoplarSDKMissingError:
            poptorch = None
    # The memory estimate runs forward passes and compiling needs real weights; otherwise shapes are enough.
    real = poptorch is not None or cfg.execution.memory_check != "off"
    torch.manual_seed(cfg.train.seed)
    if real:
        model = build_model(cfg.model)
    else:
        with torch.device("meta"):
            model = build_model(cfg.model)
    try:
        plan = build_plan(cfg.execution, model, cfg.train, seed=cfg.train.seed)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    optimizer = build_optimizer(cfg.optim, model, plan.global_batch_size)
    refusal = describe(cfg, model, plan, optimizer, out)
    if refusal:
        print(f"error: the IPU run would be refused: {refusal}", file=sys.stderr)
        return 1
    if poptorch is None:
        out("")
        out("poptorch is not installed (Poplar SDK): printed the plan only; with the SDK --dry-run also compiles.")
        return 0
    _compile(cfg, model, plan, optimizer, poptorch, out)
    return 0
