"""Exponential moving average of model weights: a thin subclass of ``timm.utils.ModelEmaV3``.

What it adds to timm's class: the TF/DeepMind "num_updates" decay warmup, unwrapping of DDP / DataParallel /
``torch.compile`` wrappers, a frozen (``requires_grad=False``) copy, and ``update`` returning the decay it used.
The averaging itself (one ``torch._foreach_lerp_`` over the floating-point tensors, buffers copied or averaged)
is timm's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class ModelEma(ModelEmaV3):
    """Keep ``ema = d * ema + (1 - d) * param`` for every parameter, in a frozen eval-mode copy (``.module``).

    ``d = min(decay, (1 + step) / (10 + step))`` when ``warmup`` (the TF/DeepMind "num_updates" warmup, so
    early averages are not dominated by the random initialisation), else ``decay``. Buffers (BatchNorm running
    mean/var, ``num_batches_tracked``) are copied from the live model by default, so the EMA model
    normalises with the statistics the live model accumulated; ``ema_buffers=True`` averages floating-point
    buffers instead (timm's default; non-float buffers are still copied). Save and load the average with
    ``ema.module.state_dict()`` / ``ema.module.load_state_dict()``.

    Args:
        model: the model being trained (DDP/DataParallel/compile wrappers are unwrapped).
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
            raise ValueError(f"ModelEma: decay must be in [0, 1], got {decay}")
        super().__init__(
            unwrap_model(model),
            decay=float(decay),
            device=None if device is None else torch.device(device),
            stochastic_rounding=False,  # plain lerp for every dtype, as torch.optim's own EMA does
            exclude_buffers=not ema_buffers,
        )
        self.warmup = bool(warmup)
        self.module.requires_grad_(False)

    def get_decay(self, step: int | None = None) -> float:
        """Decay used at optimizer step ``step`` (0-based); ``None``: the final decay."""
        if self.warmup and step is not None:
            return min(self.decay, (1.0 + step) / (10.0 + step))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> float:
        """Fold the current weights of ``model`` into the average; returns the decay used."""
        super().update(unwrap_model(model), step)
        return self.get_decay(step)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy the weights and buffers of ``model`` into the EMA model (reset the average)."""
        super().set(unwrap_model(model))
