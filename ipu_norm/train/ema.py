"""Exponential moving average of model weights (for evaluation with the averaged model)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel wrappers (their ``.module`` is the real model)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class ModelEma:
    """Keep ``ema = d * ema + (1 - d) * param`` for every parameter, in a frozen eval-mode copy of the model.

    ``d = min(decay, (1 + step) / (10 + step))`` when ``warmup`` (the TF/DeepMind "num_updates" warmup, so
    early averages are not dominated by the random initialisation), else ``decay``. Floating-point
    parameters are averaged with one fused ``torch._foreach_lerp_`` per call. Buffers (BatchNorm running
    mean/var, ``num_batches_tracked``) are copied from the live model by default, so the EMA model
    normalises with the statistics the live model accumulated; ``ema_buffers=True`` averages
    floating-point buffers instead (timm ModelEmaV3 behaviour; non-float buffers are still copied).

    Args:
        model: the model being trained (DDP/DataParallel wrappers are unwrapped).
        decay: EMA decay, e.g. 0.97 (Graphcore EfficientNet) or 0.99999 (NFNets).
        warmup: use the decay warmup above.
        ema_buffers: average float buffers instead of copying them.
        device: keep the EMA copy on this device (default: same as the model).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        warmup: bool = True,
        *,
        ema_buffers: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.ema_buffers = bool(ema_buffers)
        self.device = None if device is None else torch.device(device)
        self.module = copy.deepcopy(unwrap_model(model))
        self.module.eval()
        self.module.requires_grad_(False)
        if self.device is not None:
            self.module.to(self.device)

    def get_decay(self, step: int) -> float:
        """Decay used at optimizer step ``step`` (0-based)."""
        if self.warmup:
            return min(self.decay, (1.0 + step) / (10.0 + step))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Fold the current weights of ``model`` into the average; returns the decay used."""
        decay = self.get_decay(step)
        model = unwrap_model(model)
        ema_params = dict(self.module.named_parameters())
        lerp_ema: list[torch.Tensor] = []
        lerp_model: list[torch.Tensor] = []
        for name, p in model.named_parameters():
            e = ema_params[name]
            if e.is_floating_point():
                lerp_ema.append(e)
                lerp_model.append(p.detach().to(e.device, e.dtype))
            else:
                e.copy_(p)
        ema_bufs = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            e = ema_bufs[name]
            if self.ema_buffers and e.is_floating_point():
                lerp_ema.append(e)
                lerp_model.append(b.detach().to(e.device, e.dtype))
            else:
                e.copy_(b)
        if lerp_ema:
            # lerp_(end, w): e += w * (end - e) == d * e + (1 - d) * end with w = 1 - d.
            torch._foreach_lerp_(lerp_ema, lerp_model, 1.0 - decay)
        return decay

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy the weights and buffers of ``model`` into the EMA model (reset the average)."""
        self.module.load_state_dict(unwrap_model(model).state_dict())

    def state_dict(self) -> dict[str, Any]:
        """The EMA model's state dict."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> Any:
        """Load an EMA model state dict saved by :meth:`state_dict`."""
        return self.module.load_state_dict(state_dict, strict=strict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the EMA model."""
        return self.module(*args, **kwargs)
