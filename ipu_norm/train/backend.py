"""The CPU / CUDA backend (`TorchBackend`), registered as "cpu" and "cuda" in the backend registry.

The interface (`Backend`, `StepResult`, `TrainSpec`) and the registry (`get_backend`, `register_backend`,
`resolve_device`) live in ``ipu_norm/core/backend.py``; they are re-exported here for the trainer and the tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ipu_norm.compat import total_norm
from ipu_norm.core.backend import (
    Backend,
    MicroBatch,
    StepResult,
    TrainSpec,
    get_backend,
    register_backend,
    resolve_device,
)
from ipu_norm.train.distributed import DistInfo

__all__ = ["Backend", "MicroBatch", "StepResult", "TorchBackend", "TrainSpec", "get_backend", "resolve_device"]


class TorchBackend:
    """CPU / CUDA backend: micro-batches with gradient accumulation, DDP, autocast + GradScaler, AGC.

    One ``train_step``: for each micro-batch, forward + ``loss / n_micro`` backward (under DDP ``no_sync``
    except the last, so gradients are all-reduced once per step); then ``GradScaler.unscale_`` (fp16),
    Adaptive Gradient Clipping on the fully accumulated, all-reduced, unscaled gradients, and the optimizer
    step. Losses are divided by the number of micro-batches so the update is that of the mean loss over the
    step's samples on all processes (DDP averages across processes).
    """

    def __init__(self, device: str, dist: DistInfo) -> None:
        self.name = device
        self.dist = dist
        if device == "cuda":
            self.device = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.model: nn.Module | None = None  # the host module (unwrapped)
        self.train_model: nn.Module | None = None  # what forward runs (DDP / compiled)
        self.ddp: nn.Module | None = None  # the DistributedDataParallel wrapper when running under torchrun
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.autocast_dtype: torch.dtype | None = None
        self.spec: TrainSpec | None = None
        self.agc_params: list[nn.Parameter] = []

    # ------------------------------------------------------------------------------------ setup

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: Any, spec: TrainSpec) -> None:
        """Move the model to the device, pick autocast/GradScaler from the precision, wrap in DDP."""
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.spec = spec
        precision = plan.precision.name if hasattr(plan.precision, "name") else str(plan.precision)
        self.autocast_dtype, use_scaler = _amp_settings(precision, self.device.type)
        if use_scaler:
            self.scaler = torch.amp.GradScaler("cuda")
        if spec.agc_clip is not None:
            from ipu_norm.optim.agc import agc_parameters

            # Selected on the bare model (classifier excluded by module, REFERENCE.md), before any wrapping.
            self.agc_params = list(agc_parameters(model))
        train_model: nn.Module = model
        if getattr(plan, "training", False) and getattr(plan, "recompute", "none") != "none":
            from ipu_norm.parallel.stages import build_local_model

            # The IPU plan's recomputation points, as torch.utils.checkpoint segments over the same modules.
            train_model = build_local_model(model, plan, device_type=self.device.type, autocast=False)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = train_model = DDP(train_model, device_ids=ids)
        if getattr(plan, "compile", False):
            # Compile the DDP-wrapped module (PyTorch's documented order: DDP first, then torch.compile).
            train_model = torch.compile(train_model)
        self.train_model = train_model

    # ------------------------------------------------------------------------------------ steps

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> StepResult:
        """One optimizer step over this process's micro-batches (see class docstring)."""
        assert self.train_model is not None and self.optimizer is not None and self.spec is not None
        model, opt, n = self.train_model, self.optimizer, len(micro_batches)
        if n == 0:
            raise ValueError("train_step needs at least one micro-batch")
        model.train()
        opt.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=self.device)
        samples = 0
        for i, (images, targets) in enumerate(micro_batches):
            images, targets = self._to_device(images), self._to_device(targets)
            last = i == n - 1
            # DDP: all-reduce only on the last micro-batch's backward (gradients accumulate locally before).
            sync_ctx = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync_ctx:
                with self._autocast():
                    logits = model(images)
                    loss = self.spec.criterion(logits.float(), targets)
                scaled = loss / n
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            total_loss += loss.detach()
            samples += images.shape[0]
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        clip_fraction = None
        if self.spec.agc_clip is not None:
            from ipu_norm.optim.agc import adaptive_clip_grad_

            # Once per optimizer step, on the accumulated, all-reduced, unscaled gradients, before the step
            # (which applies weight decay and momentum).
            clip_fraction = adaptive_clip_grad_(self.agc_params, self.spec.agc_clip, eps=self.spec.agc_eps)
        skipped = False
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(opt)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale_before
        elif _grads_finite(opt):
            opt.step()
        else:
            # Without a GradScaler nothing else guards the weights: one inf/nan gradient would turn every weight
            # into nan. Skip the update instead (gradients are all-reduced, so every rank decides alike); the
            # trainer stops after train.max_nonfinite_steps such steps in a row.
            skipped = True
        return StepResult(loss=float(total_loss / n), samples=samples, skipped=skipped,
                          agc_clip_fraction=None if clip_fraction is None else float(clip_fraction))

    @torch.no_grad()
    def eval_step(self, images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Logits (fp32) of ``model`` (default: the trained model) in eval mode."""
        module = model if model is not None else self.model
        assert module is not None
        was_training = module.training
        module.eval()
        with self._autocast():
            logits = module(self._to_device(images))
        module.train(was_training)
        return logits.float()

    def sync_to_host(self) -> None:
        """Weights already live in the host module on CPU/CUDA."""

    def lr_changed(self) -> None:
        """The optimizer object itself is used on CPU/CUDA: nothing to push."""

    def state_dict(self) -> dict[str, Any]:
        """GradScaler state (empty when no scaler)."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        """Nothing to release on CPU/CUDA."""


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """True when every gradient the optimizer would apply is finite (one fused max-abs norm, no overflow)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(total_norm(grads, norm_type=float("inf"))))


def _amp_settings(precision: str, device_type: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for a precision string on a torch device type."""
    if precision == "32.32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if precision in ("16.32", "16.16"):
        if device_type == "cuda":
            # PyTorch AMP keeps fp32 master weights in both cases; 16.16's fp16 accumulators are IPU-only.
            return torch.float16, True
        raise ValueError(
            f"execution.precision={precision!r} (fp16) needs a CUDA GPU or an IPU; on CPU use '32.32' or 'bf16'"
        )
    raise ValueError(f"unknown execution.precision {precision!r}")


def _create_torch_backend(cfg: Any, dist: DistInfo) -> TorchBackend:
    """Registry factory for "cpu" and "cuda"."""
    device = cfg.execution.device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("execution.device='cuda' but torch.cuda.is_available() is False; use --device cpu")
    return TorchBackend(device, dist)


register_backend("cpu", _create_torch_backend)
register_backend("cuda", _create_torch_backend)
