"""Unit-wise norms of parameters and their gradients that a kernel computed as a by-product, for AGC.

Adaptive Gradient Clipping needs ||W_i|| and ||G_i|| for every unit (row) of every parameter: on CPU two reads of
the whole model from DRAM per step. The Scaled-Weight-Standardization kernel (`ipu_norm.layers.weight_std`)
already reads every row of W in its forward, and writes every row of dL/dW in its backward, while the row is in
cache; it sums the squares there and records them here, and `ipu_norm.optim.agc` takes them instead of reading
the tensors again.

A record is used only while the tensor it describes is provably unchanged:

- weight norm: the parameter's storage (data_ptr), shape and version counter are those of the forward that
  computed it (the optimizer step, `load_state_dict`, `copy_` under no_grad all bump the version);
- gradient norm: ``param.grad`` is the very tensor the backward wrote (AccumulateGrad hands it over without a
  copy when ``.grad`` was None, i.e. after ``zero_grad(set_to_none=True)``), untouched since (same data_ptr and
  version: accumulating a second micro-batch, DDP's all-reduce, GradScaler's unscale, any in-place op bumps the
  version or replaces the tensor), and the weight's version is still that of the forward;
- records are consumed (popped) by the reader, so a stale one cannot match a later, unrelated gradient that
  happens to reuse the freed memory.

Not every in-place write bumps a version counter: writes through ``.data`` bypass it (as they bypass autograd's
own checks), and so does ``torch._amp_foreach_non_finite_check_and_unscale_``, the kernel behind
``GradScaler.unscale_`` (measured with torch 2.14). A gradient record therefore also keeps the first and last
element of the gradient and must find them unchanged, which catches a uniform rescale like the unscale; and
`ipu_norm.optim.agc.AGC.step_` does not take recorded gradient norms after an unscale at all. Code that modifies a
parameter or its gradient in other ways that bypass the version counter, between backward and the clip, must not
use the recorded norms (``AGC(..., use_recorded_norms=False)``).
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["pop_grad_norm", "pop_weight_norm", "record_grad_norm", "record_weight_norm"]

_WEIGHT: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> (data_ptr, version, shape, norms)
# param -> ((grad data_ptr, version, shape), weight version, [first, last element of grad], norms)
_GRAD: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _key(t: torch.Tensor) -> tuple[int, int, torch.Size]:
    return t.data_ptr(), t._version, t.shape


def _unit_norms(sq_sums: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # unitwise_norm's layout (out, 1, ...) in like's dtype, from the (out,) per-row sums of squares.
    return sq_sums.sqrt().to(like.dtype).view((like.shape[0],) + (1,) * (like.ndim - 1))


def record_weight_norm(param: torch.Tensor, sq_sums: torch.Tensor) -> None:
    """Record unitwise_norm(param) from the (out,) per-row sums of squares of param's current values."""
    _WEIGHT[param] = (_key(param), _unit_norms(sq_sums, param))


def _ends(t: torch.Tensor) -> list[float]:
    # The first and last element (one strided view, no copy of the tensor).
    flat = t.view(-1)
    return flat[:: max(flat.numel() - 1, 1)].tolist()


def record_grad_norm(param: torch.Tensor, grad: torch.Tensor, weight_version: int, sq_sums: torch.Tensor) -> None:
    """Record unitwise_norm(grad) from the (out,) per-row sums of squares of the contiguous gradient `grad` of
    param, computed by the backward of the forward that saw param at version `weight_version`."""
    _GRAD[param] = (_key(grad), weight_version, _ends(grad), _unit_norms(sq_sums, grad))


def pop_weight_norm(param: torch.Tensor) -> torch.Tensor | None:
    """The recorded unit-wise norms of param if they still describe it, else None; the record is removed."""
    entry = _WEIGHT.pop(param, None)
    if entry is None or entry[0] != _key(param):
        return None
    return entry[1]


def pop_grad_norm(param: torch.Tensor) -> torch.Tensor | None:
    """The recorded unit-wise norms of param.grad if they still describe it, else None; the record is removed."""
    entry = _GRAD.pop(param, None)
    grad = param.grad
    if entry is None or grad is None or entry[0] != _key(grad) or entry[1] != param._version:
        return None
    if entry[2] != _ends(grad):  # a write that bypassed the version counter (module docstring)
        return None
    return entry[3]
