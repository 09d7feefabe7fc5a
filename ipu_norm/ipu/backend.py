"""PoptorchBackend: the trainer's Backend protocol (ipu_norm/train/backend.py) on Graphcore IPUs.

`create_backend(cfg, dist)` is what ``ipu_norm.train.backend.get_backend`` calls for ``execution.device: ipu``.

One ``train_step`` is ONE PopTorch host call: it consumes micro-batch x device_iterations x local replicas x
gradient accumulation samples and performs ``device_iterations`` optimizer steps on the device (the learning rate
is pushed with ``setOptimizer`` between host calls, so with device_iterations > 1 it changes every D steps, as in
Graphcore's applications). `micro_batches_per_step` says how many micro-batches the trainer must pass.

Throughput shape (Graphcore's application): the training data come from a ``poptorch.DataLoader`` in AsyncRebatched
mode built per epoch by `epoch_loader` (each batch is one host call); images cross the host link as uint8
(``accepts_uint8``) and are converted and normalised on the IPU by ``NormalizeUint8``, the first layer of the
traced model; the executable returns the loss and the top-1 hit count summed over the host call
(``OutputMode.Sum``), which `train_step` divides by the micro-batches / samples of the call. The weights come
back to the host only at `sync_to_host` (checkpoints, validation, the end): a per-step EMA (``train.ema_decay``)
would copy them after every host call and is refused; use checkpoint averaging (``train.weight_avg_strategy``).

Everything PopTorch-specific goes through ipu_norm/ipu/poptorch_adapter.py; poptorch is imported lazily and a
missing SDK gives `PoplarSDKMissingError` with instructions.

Not supported on IPU by this backend (it raises at `prepare`): exact (``optim.agc_scope: step``) Adaptive Gradient
Clipping (it needs per-unit clipping of the accumulated gradient inside the device's optimizer step, which
poptorch.optim does not offer); ``agc_scope: micro_batch`` runs in the model's graph (ipu_norm.ops.agc_micro).

Evaluation runs on the IPU through ONE ``poptorch.inferenceModel`` executor, whatever the number of models evaluated
(the trained model, its EMA average): PopTorch's default connection type (Always) makes an executor acquire its IPUs
at compile and hold them until ``detachFromDevice``, so a second executor over the same IPUs fails with "Failed to
acquire N IPU(s)". The executor wraps the backend's own eval copy of the model; `eval_step` swaps the weights of
the model to evaluate into it with the executor's ``load_state_dict`` (host load, then a copy to the device if
attached -- otherwise attaching copies them). Weight transfers are PopTorch's own: detaching the training executor
copies its weights to the host, attaching an executor copies the host weights to the device; the backend adds none
on top. Partial batches are padded to the compiled batch size so the executable is not recompiled.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ipu_norm.compat import mark_optimizer_stepped
from ipu_norm.core.plan import ExecutionPlan
from ipu_norm.data.device import NormalizeUint8
from ipu_norm.ipu import poptorch_adapter as pa


def _train_types() -> tuple[Any, Any]:
    from ipu_norm.core.backend import StepResult, TrainSpec

    return StepResult, TrainSpec


def _optimizer_name_and_hparams(optimizer: torch.optim.Optimizer) -> tuple[str, dict[str, Any]]:
    """Map the trainer's torch optimizer to an optimizer_spec name and hyper-parameters."""
    name = {"rmsproptf": "rmsprop_tf"}.get(type(optimizer).__name__.lower(), type(optimizer).__name__.lower())
    if name not in ("sgd", "rmsprop", "adamw", "rmsprop_tf"):
        raise ValueError(
            f"the IPU backend maps SGD, RMSprop, AdamW, RMSpropTF to poptorch.optim; got {type(optimizer).__name__}"
        )
    return name, dict(optimizer.defaults)


# Why the IPU backend refuses a per-step EMA (raised by `prepare`, reported by the dry run).
EMA_UNSUPPORTED = (
    "train.ema_decay={ema} (a per-step EMA) is not available on IPUs: it copies the weights to the host after every "
    "host call; set train.ema_decay: null and train.weight_avg_strategy: exponential (checkpoint averaging after "
    "training, as Graphcore's recipe)"
)

# Why the IPU backend refuses AGC (raised by `prepare`, reported by the dry run).
AGC_UNSUPPORTED = (
    "optim.agc_scope: step (exact AGC on the accumulated, all-reduced gradient) is not available on IPUs: PopTorch "
    "3.4 has no hook between gradient accumulation and the weight update. Set optim.agc_scope: micro_batch (AGC on "
    "each micro-batch's gradient in the backward pass, the PopART op ipu_norm.MicroBatchAGC), or optim.agc_clip: null."
)


class PoptorchBackend:
    """Backend for ``execution.device: ipu`` (see module docstring)."""

    def __init__(self, cfg: Any = None, dist: Any = None, *, poptorch: Any = None) -> None:
        self.name = "ipu"
        # Host-side tensors live on the CPU; PopTorch moves them to the IPUs itself.
        self.device = torch.device("cpu")
        self.cfg = cfg
        self.dist = dist
        self.poptorch = poptorch or pa.import_poptorch()
        self.model: nn.Module | None = None
        self.plan: ExecutionPlan | None = None
        self.optimizer: torch.optim.Optimizer | None = None  # the trainer's (its LR schedule drives ours)
        self.ipu_optimizer: Any = None
        self.train_model: Any = None
        self.eval_model: nn.Module | None = None  # the eval copy the inference executor runs
        self.eval_executor: Any = None
        self._eval_loaded: nn.Module | None = None  # whose weights eval_model holds since the last sync_to_host
        self._hooks: list[Any] = []
        self._options: Any = None  # the training executable's poptorch.Options (shared with the DataLoader)

    # uint8 images cross the host link; NormalizeUint8 converts them in the graph (Graphcore's eight_bit_io).
    accepts_uint8 = True
    # ------------------------------------------------------------------------------------ setup

    def local_replicas(self) -> int:
        """Replicas driven by this process: all of them, or total / instances under poprun."""
        assert self.plan is not None
        _, instances = pa.popdist_rank_and_size() if pa.under_poprun() else (0, 1)
        return max(1, self.plan.replicas // instances)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches one `train_step` consumes: accumulation x local replicas x device iterations."""
        assert self.plan is not None
        return self.plan.gradient_accumulation * self.local_replicas() * self.plan.device_iterations

    def host_call(self) -> pa.HostCall:
        """What one training host call of this process consumes (poptorch_adapter.HostCall)."""
        assert self.plan is not None
        return pa.host_call(self.plan, self.local_replicas())

    def training_options(self) -> Any:
        """The training executable's ``poptorch.Options`` (made once: the DataLoader reads the same object)."""
        assert self.plan is not None
        if self._options is None:
            self._options = pa.create_options(self.plan, poptorch=self.poptorch)
        return self._options

    def epoch_loader(self, loader: torch.utils.data.DataLoader) -> Any:
        """A ``poptorch.DataLoader`` (AsyncRebatched) for one epoch over the dataset and sampler of the trainer's
        `loader`, whose batches are whole host calls.

        Build it after the sampler's ``set_epoch`` / resume position are set: PopTorch forks the loading process
        when the DataLoader is built, and that process iterates the sampler as it was then. Each batch lives in
        shared memory that the next batch overwrites: use it before asking for the next. Its loading process ends
        when the loader is dropped (PopTorch's ``DataLoader.__del__`` calls ``terminate``).
        """
        assert self.plan is not None
        sampler, dataset = loader.sampler, loader.dataset
        epoch = getattr(sampler, "epoch", None)
        if epoch is not None and callable(getattr(dataset, "set_epoch", None)):
            dataset.set_epoch(epoch)  # what the trainer's EpochDataLoader does in __iter__
        return pa.create_dataloader(
            self.training_options(), dataset, self.plan, sampler=sampler, num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
            poptorch=self.poptorch,
        )

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: ExecutionPlan, spec: Any) -> None:
        """Cast, annotate (stages, recomputation) and wrap the model in ``poptorch.trainingModel``."""
        if getattr(spec, "agc_clip", None) is not None:
            raise NotImplementedError(AGC_UNSUPPORTED)
        ema = getattr(getattr(self.cfg, "train", None), "ema_decay", None)
        if ema is not None:
            raise ValueError(EMA_UNSUPPORTED.format(ema=ema))
        self.model, self.plan, self.optimizer = model, plan, optimizer
        self.memory_estimate = self._check_memory(model, plan)
        pa.cast_model_for_precision(model, plan)
        # The inference executor's own copy (taken before PopTorch wraps the model): the weights of whichever model
        # is evaluated are loaded into it, so one executor serves the model and its EMA.
        self.eval_model = copy.deepcopy(model).eval()
        self.eval_model.requires_grad_(False)
        pa.annotate_model(self.eval_model, plan, self.poptorch, for_inference=True)
        self._hooks = pa.annotate_model(model, plan, self.poptorch)
        options = self.training_options()
        name, hparams = _optimizer_name_and_hparams(optimizer)
        # Mirror the trainer's parameter groups (weight decay only on conv/linear weights and PN proxy params).
        groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g.get("weight_decay", 0.0)}
                  for g in optimizer.param_groups]
        self.ipu_optimizer = pa.create_optimizer(groups, name, hparams, plan, poptorch=self.poptorch)
        wrapped = pa.TrainingModelWithLoss(model, spec.criterion, plan.precision.compute_dtype, poptorch=self.poptorch,
                                           input_norm=NormalizeUint8())
        wrapped.train()
        self.train_model = self.poptorch.trainingModel(wrapped, options=options, optimizer=self.ipu_optimizer)

    def _check_memory(self, model: nn.Module, plan: ExecutionPlan) -> Any:
        """The per-stage memory estimate (ipu_norm.memory), before the long Poplar compilation.

        ``execution.memory_check`` decides what a predicted overflow does: 'error' (default) refuses the run with
        the stage, the figure and what to change; 'warn' only reports it (the estimate is approximate and the
        compiler has the final word); 'off' skips the estimate.
        """
        mode = getattr(getattr(self.cfg, "execution", None), "memory_check", "error")
        if mode == "off":
            return None
        from ipu_norm.memory.estimate import MemoryBudgetError, check_fits_ipu

        try:
            return check_fits_ipu(model, plan, config=self.cfg)
        except MemoryBudgetError as err:
            if mode == "error":
                raise MemoryBudgetError(
                    f"{err} (refused before compiling; set execution.memory_check: warn to try anyway)",
                    estimate=getattr(err, "estimate", None),
                ) from None
            warnings.warn(f"IPU memory estimate: {err}", RuntimeWarning, stacklevel=2)
            return getattr(err, "estimate", None)

    # ------------------------------------------------------------------------------------ steps

    def train_step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """One PopTorch call over `micro_batches_per_step` micro-batches (one batch of a loader from `epoch_loader`
        split into micro-batches, or loose ones); returns their mean loss and top-1 accuracy."""
        step_result, _ = _train_types()
        assert self.train_model is not None and self.plan is not None
        need = self.micro_batches_per_step
        if len(micro_batches) != need:
            raise ValueError(
                f"the IPU step needs {need} micro-batches (gradient accumulation {self.plan.gradient_accumulation} x "
                f"local replicas {self.local_replicas()} x device iterations {self.plan.device_iterations}), got "
                f"{len(micro_batches)}; the trainer should pass backend.micro_batches_per_step micro-batches"
            )
        if self.eval_executor is not None and self.eval_executor.isAttachedToDevice():
            self.eval_executor.detachFromDevice()  # free the IPUs; the training executor re-attaches when called
        images = _join([x for x, _ in micro_batches])
        targets = _join([y for _, y in micro_batches])
        loss_sum, correct_sum = self.train_model(images, targets)  # OutputMode.Sum: sums over the host call
        if self.optimizer is not None:
            # The update ran on the device; tell torch's LR scheduler the (host) optimizer has stepped.
            mark_optimizer_stepped(self.optimizer)
        call = self.host_call()
        loss = float(torch.as_tensor(loss_sum).double().sum()) / call.sum_divisor()
        accuracy = float(torch.as_tensor(correct_sum).double().sum()) / call.samples
        return step_result(loss=loss, samples=int(images.shape[0]), accuracy=accuracy)

    @torch.no_grad()
    def eval_step(self, images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """fp32 logits of `model` (default: the trained model) from the one ``poptorch.inferenceModel`` executor.

        The weights of `model` are swapped in at its first batch after `sync_to_host` (the trainer syncs at the
        start of every evaluation), and whenever the evaluated model changes: evaluate each model over the whole
        set in turn, not alternately per batch, or every batch pays a weight swap.
        """
        assert self.plan is not None and self.model is not None and self.eval_model is not None
        source = model if model is not None else self.model
        if self.train_model is not None and self.train_model.isAttachedToDevice():
            self.train_model.detachFromDevice()  # PopTorch copies weights and optimizer state to the host first
        if self.eval_executor is None:
            opts = pa.create_options(self.plan, for_inference=True, poptorch=self.poptorch)
            wrapped = pa.InferenceModel(self.eval_model, self.plan.precision.compute_dtype, input_norm=NormalizeUint8())
            self.eval_executor = self.poptorch.inferenceModel(wrapped, opts)
        if self._eval_loaded is not source:
            # Host load; PopTorch copies to the device now if attached, else when the call below attaches/compiles.
            self.eval_executor.load_state_dict(source.state_dict(prefix="model."))
            self._eval_loaded = source
        # One inference call consumes micro-batch x local replicas x device iterations images; pad to that size so
        # a short last batch does not trigger a recompilation, then drop the padding.
        per_call = self.plan.micro_batch_size * self.local_replicas() * self.plan.inference_device_iterations
        n = images.shape[0]
        outs = []
        for start in range(0, n, per_call):
            chunk = images[start:start + per_call]
            pad = per_call - chunk.shape[0]
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros((pad, *chunk.shape[1:]))])
            outs.append(self.eval_executor(chunk)[: per_call - pad])
        return torch.cat(outs).float()

    def sync_to_host(self) -> None:
        """Bring the IPU weights into the host module (before EMA updates, evaluation and checkpoints); a no-op when
        the host already has them (after a detach). The next `eval_step` swaps fresh weights in."""
        if self.train_model is not None and self.train_model.isCompiled():
            self.train_model.copyWeightsToHostIfNeeded()
        self._eval_loaded = None

    def lr_changed(self) -> None:
        """Push the trainer's scheduled learning rates to the device optimizer."""
        if self.optimizer is None or self.ipu_optimizer is None:
            return
        for src, dst in zip(self.optimizer.param_groups, self.ipu_optimizer.param_groups):
            dst["lr"] = src["lr"]
        self.train_model.setOptimizer(self.ipu_optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The device optimizer's state (PopTorch reads it back from the IPU)."""
        return {"poptorch_optimizer": self.ipu_optimizer.state_dict()} if self.ipu_optimizer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the device optimizer's state saved by `state_dict`."""
        if state.get("poptorch_optimizer") and self.ipu_optimizer is not None:
            self.ipu_optimizer.load_state_dict(state["poptorch_optimizer"])
            self.train_model.setOptimizer(self.ipu_optimizer)

    def close(self) -> None:
        """Release the IPUs (detaching the training executor copies its weights to the host first)."""
        for executor in (self.eval_executor, self.train_model):
            if executor is not None and executor.isAttachedToDevice():
                executor.detachFromDevice()
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """One tensor from consecutive parts: no copy when they are views that already lie back to back in one tensor
    (the micro-batches the trainer split from one DataLoader batch), else ``torch.cat``."""
    first = parts[0]
    if len(parts) > 1 and all(p.is_contiguous() for p in parts):
        step = first.numel() * first.element_size()
        base = first.untyped_storage().data_ptr() if hasattr(first, "untyped_storage") else None
        same = base is not None and all(p.untyped_storage().data_ptr() == base for p in parts)
        if same and all(p.data_ptr() == first.data_ptr() + k * step and p.shape == first.shape
                        for k, p in enumerate(parts)):
            rows = sum(p.shape[0] for p in parts)
            return first.as_strided((rows, *first.shape[1:]), first.stride())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def create_backend(cfg: Any, dist: Any) -> PoptorchBackend:
    """Entry point used by ``ipu_norm.train.backend.get_backend`` for ``execution.device: ipu``."""
    return PoptorchBackend(cfg, dist)
