"""Multiply-accumulate (MAC) counts of a model's forward pass, counted by ``torch.utils.flop_counter``.

Convention: the "FLOPs" of the EfficientNet and NFNet papers are multiply-accumulates. torch's
``FlopCounterMode`` counts 2 FLOPs per MAC of every convolution and matrix product (bias, norms, activations,
pooling, SE gating and residual additions are not counted: they are O(activations), not O(activations x
fan-in)), so ``FlopCount.macs`` is its total / 2. Checked: timm's dm_nfnet_f0 at 256x256 gives 12.384 G, the
published "12.38B FLOPs" of NFNet-F0 (REFERENCE.md); ResNet-50 at 224 gives 4.09 G, the usual "4.1 GFLOPs".
`FlopCount.gflops` (what the model table prints) is GMACs; `FlopCount.flops_2x` is torch's count.

Forward only: torch's count of ``convolution_backward`` is wrong for grouped and depthwise convolutions, so this
module counts no backward FLOPs.

The count runs the model once through `torch.func.functional_call` with every parameter and buffer
replaced by a meta tensor of the same shape, so it costs no memory or compute even for 500M-parameter
models and leaves the model untouched. torch 2.0.1 (the IPU environment) has no FlopCounterMode:
``ipu_norm.compat.flop_counter_mode`` then counts the same ops itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from ipu_norm.compat import flop_counter_mode

__all__ = ["FlopCount", "count_flops", "count_params"]


@dataclass
class FlopCount:
    """MACs for one image of the given size; per-operator totals (e.g. ``aten.convolution``) in `by_op`."""

    macs: int
    params: int
    input_size: tuple[int, int, int]
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        """Giga-MACs: the papers' "GFLOPs" convention (see module docstring)."""
        return self.macs / 1e9

    @property
    def flops_2x(self) -> int:
        """Arithmetic operations counting a multiply and an add separately (2 * MACs)."""
        return 2 * self.macs


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared parameter once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _input_shape(input_size: int | Sequence[int], in_chans: int) -> tuple[int, int, int]:
    if isinstance(input_size, int):
        return (in_chans, input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        return (in_chans,) + size  # type: ignore[return-value]
    if len(size) == 3:
        return size  # type: ignore[return-value]
    raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size}")


def count_flops(model: nn.Module, input_size: int | Sequence[int], in_chans: int = 3) -> FlopCount:
    """MACs of the forward pass of one image (every convolution and matrix product; see the module docstring).

    input_size: image side, (H, W) or (C, H, W). Runs in eval mode on meta tensors (shapes only); the
    model's parameters, buffers and train/eval mode are unchanged afterwards.
    """
    shape = _input_shape(input_size, in_chans)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        # Per image: the count at batch 2 minus the count at batch 1, so work that does not scale with the batch
        # (the Proxy Norm statistics, C x 200 values per layer from the parameters) is not charged to each image.
        one, two = _batch_counts(model, shape, 1), _batch_counts(model, shape, 2)
    finally:
        for m, flag in was_training.items():
            m.train(flag)
    by_op = {op: (two.get(op, 0) - one.get(op, 0)) // 2 for op in two if two.get(op, 0) != one.get(op, 0)}
    return FlopCount(macs=sum(by_op.values()), params=count_params(model), input_size=shape, by_op=by_op)


def _batch_counts(model: nn.Module, shape: tuple[int, int, int], batch: int) -> dict[str, int]:
    """FLOPs per op of one forward pass at `batch` images of `shape` (meta tensors; one real pass as fallback)."""
    meta_state = {
        name: torch.empty_like(t, device="meta")
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
    }
    counter = flop_counter_mode()
    with torch.no_grad():
        try:
            with counter:
                functional_call(model, meta_state, (torch.empty((batch,) + shape, device="meta"),))
        except (NotImplementedError, RuntimeError) as exc:
            # A model that creates real tensors inside forward cannot mix them with meta ones: fall back
            # to one real forward pass.
            warnings.warn(f"meta-tensor FLOP count failed ({exc}); running one real forward pass", stacklevel=3)
            p = next(model.parameters(), None)
            counter = flop_counter_mode()
            with counter:
                model(torch.zeros((batch,) + shape, device=p.device if p is not None else "cpu"))
    return {str(op): int(flops) for op, flops in counter.get_flop_counts().get("Global", {}).items()}
