"""Adaptive Gradient Clipping (Brock et al. 2021, arXiv 2102.06171), unit-wise, vectorised.

For every unit i of a parameter W (a row: output channel of a conv OIHW, output unit of a Linear (out, in);
the whole tensor for vectors and scalars), with G the gradient:

    G_i <- lambda * (||W_i||* / ||G_i||) * G_i   if ||G_i|| / ||W_i||* > lambda,   else G_i
    ||W_i||* = max(||W_i||_F, eps = 1e-3),  ||G_i|| guarded with max(., 1e-6)

The final classifier is not clipped (`agc_parameters` excludes `model.get_classifier()` by module).

Where to call it (the gradient must be the one the optimizer is about to apply):

1. Gradient accumulation: clip ONCE per optimizer step, after the backward of the last micro-batch, on the
   accumulated gradient. Clipping is non-linear, so clipping each micro-batch and summing is a different
   (wrong) update.
2. Mixed precision with ``torch.amp.GradScaler``: call ``scaler.unscale_(optimizer)`` first; on scaled
   gradients the ratio ||G||/||W|| is off by the loss scale. Then ``scaler.step(optimizer)`` (which skips
   the step if the unscale found inf/nan; clipping such gradients is harmless since they are discarded)
   and ``scaler.update()``. `AGC.step_` does exactly this order.
3. DDP: DistributedDataParallel all-reduces (averages) gradients during the last backward (with
   ``no_sync()`` on the earlier micro-batches), so calling AGC after that backward clips the global
   gradient, identically on every replica. Clipping before the all-reduce would give a different update.
4. On IPUs the optimizer runs on device inside PopTorch's compiled step, where this eager function never
   sees the gradients; AGC there would have to be part of the compiled graph (not provided by this module).

Clipping is applied before weight decay and momentum (the optimizer sees the clipped gradient).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from ipu_norm.ops.agc_micro import GRAD_NORM_EPS, unitwise_norm

__all__ = ["AGC", "adaptive_clip_grad_", "agc_parameters", "unitwise_norm"]


def _unitwise_norms_grouped(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """unitwise_norm of every tensor, computed with one reduction per (device, dtype, row length) group.

    On accelerators, matrices/conv weights are viewed as (rows, row_len) and concatenated along rows inside a
    group, so a network with hundreds of parameters costs a handful of kernels (on CPU each view is reduced in
    place instead, see below); vectors/scalars go through a single
    torch._foreach_norm. Norms are accumulated in fp32 for half-precision tensors.
    """
    out: list[torch.Tensor | None] = [None] * len(tensors)
    whole: list[int] = []
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):  # only builds index lists
        if t.ndim <= 1:
            whole.append(i)
        else:
            groups[(t.device, t.dtype, t[0].numel())].append(i)
    if whole:
        half = (torch.float16, torch.bfloat16)
        norms = torch._foreach_norm([tensors[i].float() if tensors[i].dtype in half else tensors[i] for i in whole])
        for i, n in zip(whole, norms):
            out[i] = n
    for (device, dtype, row_len), idx in groups.items():
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        if device.type == "cpu":
            # On CPU, concatenating first would copy every weight and gradient (2x the model per step, measured
            # 2.6x slower than per-tensor reductions on NFNet-F0) while there is no kernel-launch overhead to
            # amortise: reduce each (rows, row_len) view in place. PyTorch's optimizers likewise use their
            # multi-tensor (foreach) paths on accelerators only. These two reads of the model are DRAM-bound
            # (~90% of the clip). Taking the same norms in post-accumulate-grad hooks during
            # backward, hoping for cache-hot data, was measured NOT to help on NFNet-F0 (1 thread, see commit
            # 90eb0e8): the tensors are far larger than L2, so backward grew by about what the clip saved.
            for i in idx:
                norms = torch.linalg.vector_norm(tensors[i].reshape(-1, row_len), dim=1, dtype=acc)
                out[i] = norms.view((-1,) + (1,) * (tensors[i].ndim - 1))
            continue
        rows = torch.cat([tensors[i].reshape(-1, row_len) for i in idx]).to(acc)
        norms = torch.linalg.vector_norm(rows, dim=1)
        sizes = [tensors[i].shape[0] for i in idx]
        for i, n in zip(idx, norms.split(sizes)):
            out[i] = n.view((-1,) + (1,) * (tensors[i].ndim - 1))
    return out  # type: ignore[return-value]


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
) -> torch.Tensor | None:
    """Clip the .grad of `parameters` in place, unit-wise (module docstring). Parameters without grad are skipped.

    Call on the fully accumulated, all-reduced, unscaled gradient, once per optimizer step. The unit-wise norms
    of weights and gradients are computed here, from the tensors as they are, on every call.

    Returns the fraction of units clipped (a 0-dim float32 tensor on the first gradient's device, so reading it
    is the caller's choice of synchronisation), or None when no parameter has a gradient.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return None
    if any(p.grad.is_sparse for p in params):
        raise RuntimeError("adaptive_clip_grad_ does not support sparse gradients")
    grads = [p.grad for p in params]
    w_norms = _unitwise_norms_grouped([p.detach() for p in params])
    g_norms = _unitwise_norms_grouped(grads)
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, g in enumerate(grads):  # only builds index lists
        by_device[g.device].append(i)
    n_clipped, n_units = torch.zeros((), device=grads[0].device), 0
    for device, idx in by_device.items():
        # All units of all tensors on this device as one flat vector: one where() for the whole model.
        acc = torch.float64 if any(w_norms[i].dtype == torch.float64 for i in idx) else torch.float32
        w = torch.cat([w_norms[i].reshape(-1).to(acc) for i in idx])
        g = torch.cat([g_norms[i].reshape(-1).to(acc) for i in idx])
        max_norm = w.clamp_min(eps) * clip_factor
        clipped = g > max_norm
        f = torch.where(clipped, max_norm / g.clamp_min(GRAD_NORM_EPS), torch.ones_like(g))
        n_clipped = n_clipped + clipped.sum().to(n_clipped.device, torch.float32)
        n_units += clipped.numel()
        sizes = [w_norms[i].numel() for i in idx]
        if device.type == "cpu":
            _scale_clipped_rows_cpu([grads[i] for i in idx], f, clipped, sizes)
        else:
            factors = [fi.view(w_norms[i].shape).to(grads[i].dtype) for i, fi in zip(idx, f.split(sizes))]
            torch._foreach_mul_([grads[i] for i in idx], factors)
    return n_clipped / max(n_units, 1)


def _scale_clipped_rows_cpu(grads: list[torch.Tensor], factors: torch.Tensor, clipped: torch.Tensor,
                            sizes: list[int]) -> None:
    """Multiply only the clipped units of CPU gradients by their factor (the others' factor is exactly 1).

    Bitwise the same as multiplying every gradient by its factor (x * 1.0 == x), but the multiply is a full
    read-modify-write pass over the model's gradients while AGC usually clips a small minority of units
    (NFNet-F0 in the benchmark: ~550 of 112k units, in 35 of 231 tensors); the host reads the per-tensor counts
    of clipped units with one `.tolist()`, free on CPU. Accelerators keep the single fused multi-tensor multiply
    instead (no synchronisation).
    """
    running = torch.zeros(clipped.numel() + 1, dtype=torch.long)
    torch.cumsum(clipped, 0, out=running[1:])
    bounds = torch.tensor([0, *itertools.accumulate(sizes)])
    counts = (running[bounds[1:]] - running[bounds[:-1]]).tolist()
    start = 0
    for grad, units, count in zip(grads, sizes, counts):
        if count:
            f = factors[start:start + units].to(grad.dtype)
            if count == units or not grad.is_contiguous():
                grad.mul_(f.view((-1,) + (1,) * (grad.ndim - 1)) if grad.ndim > 1 else f.view(()))
            else:
                rows = clipped[start:start + units].nonzero().squeeze(1)
                g2 = grad.view(units, -1)
                g2.index_copy_(0, rows, g2.index_select(0, rows).mul_(f[rows].unsqueeze(1)))
        start += units


def agc_parameters(model: nn.Module, exclude: Iterable[nn.Module] = ()) -> list[nn.Parameter]:
    """Trainable parameters of model that AGC clips: all but the classifier's (and those of `exclude`).

    The classifier is `model.get_classifier()` (selected by module, not by parameter order); a DDP or
    similar wrapper exposing `.module` is unwrapped first.
    """
    inner = getattr(model, "module", model)
    if not hasattr(inner, "get_classifier"):
        raise TypeError(f"{type(inner).__name__} has no get_classifier(); pass the classifier through `exclude`")
    skip = {id(p) for m in (inner.get_classifier(), *exclude) for p in m.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]


class AGC:
    """Holds the clip factor and the clipped parameters; `clip_()` once per optimizer step.

    >>> agc = AGC(model, clip_factor=0.01)       # or AGC(list_of_params, ...)
    >>> for i, (x, y) in enumerate(micro_batches):
    ...     (loss_fn(model(x), y) / n_micro).backward()   # scaler.scale(...).backward() with AMP
    >>> agc.step_(optimizer, scaler)              # [unscale_] -> clip_ -> step -> [update]
    >>> optimizer.zero_grad()
    """

    def __init__(self, params_or_model: nn.Module | Iterable[torch.Tensor], clip_factor: float = 0.01,
                 eps: float = 1e-3) -> None:
        if clip_factor <= 0:
            raise ValueError(f"clip_factor must be > 0, got {clip_factor}")
        if isinstance(params_or_model, nn.Module):
            self.params = agc_parameters(params_or_model)
        else:
            self.params = list(params_or_model)
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.num_clips = 0  # how many times clip_ ran (tests / logging: one per optimizer step)

    def clip_(self) -> None:
        """Clip the current (accumulated, all-reduced, unscaled) gradients in place."""
        adaptive_clip_grad_(self.params, self.clip_factor, self.eps)
        self.num_clips += 1

    def step_(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
        """One optimizer step in the correct order: scaler.unscale_ -> clip_ -> (scaler.)step -> scaler.update."""
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(optimizer)
            self.clip_()
            scaler.step(optimizer)
            scaler.update()
        else:
            self.clip_()
            optimizer.step()

    def __repr__(self) -> str:
        return f"AGC(clip_factor={self.clip_factor}, eps={self.eps}, num_params={len(self.params)})"
