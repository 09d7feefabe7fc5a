"""Newer torch APIs in one place, each with its torch 2.0.1 equivalent (the torch PopTorch 3.4 requires).

Nothing else in ``ipu_norm`` branches on the torch version: code that needs an API newer than torch 2.0.1 calls
the function here.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch


def is_compiling() -> bool:
    """True while torch.compile (Dynamo) traces the caller; ``torch.compiler.is_compiling`` is newer than 2.0.1."""
    compiler = getattr(torch, "compiler", None)
    fn = getattr(compiler, "is_compiling", None)
    if fn is not None:
        return bool(fn())
    from torch import _dynamo  # torch 2.0.x: the same query lives in Dynamo itself ("import torch._dynamo"
    # here would make ``torch`` a local name of this function, unbound on the first line)

    return bool(_dynamo.is_compiling())


def finalize_with_storage(t: torch.Tensor, fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn(*args)`` when the storage of `t` is freed.

    torch >= 2.1 keeps one Python object per storage for as long as the storage lives, and a weakref finalizer on
    it fires exactly then. torch 2.0.x makes a new storage object at each ``untyped_storage()`` call, and a weakref
    to one dangles (the interpreter crashes when it is touched): there the finalizer hangs on the tensor `t`
    instead, exact when `t` owns its storage and early when a view of it outlives it.
    """
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 1):
        weakref.finalize(t.untyped_storage(), fn, *args)
    else:
        weakref.finalize(t, fn, *args)


def flop_counter_mode() -> Any:
    """A silent FLOP counter context (2 FLOPs per MAC of convolutions and matrix products).

    ``torch.utils.flop_counter.FlopCounterMode`` (newer than 2.0.1) where it exists; on torch 2.0.x the same count
    for the ops a CNN uses (aten convolution, mm, addmm, bmm, baddbmm) through a ``TorchDispatchMode``. Both give
    ``get_total_flops()`` and ``get_flop_counts()`` (``{"Global": {op: flops}}``).
    """
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return _make_dispatch_flop_counter()()
    return FlopCounterMode(display=False)


def total_norm(tensors: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of the norms of `tensors` (``torch.nn.utils.get_total_norm``, newer than 2.0.1)."""
    fn = getattr(torch.nn.utils, "get_total_norm", None)
    if fn is not None:
        return fn(tensors, norm_type=norm_type)
    norms = torch.stack([torch.linalg.vector_norm(t.detach(), norm_type) for t in tensors])
    return torch.linalg.vector_norm(norms, norm_type)


def mark_optimizer_stepped(optimizer: torch.optim.Optimizer) -> None:
    """Tell torch's LR schedulers that `optimizer` has stepped although its ``step`` ran elsewhere (on the IPU).

    Newer torch checks ``optimizer._opt_called``; torch 2.0.x checks ``optimizer._step_count >= 1``.
    """
    optimizer._opt_called = True  # type: ignore[attr-defined]
    if getattr(optimizer, "_step_count", 1) < 1:
        optimizer._step_count = 1  # type: ignore[attr-defined]


def _make_dispatch_flop_counter() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class DispatchFlopCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.by_op: dict[Any, int] = {}

        def get_total_flops(self) -> int:
            return sum(self.by_op.values())

        def get_flop_counts(self) -> dict[str, dict[Any, int]]:
            return {"Global": dict(self.by_op)}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            packet = func.overloadpacket
            flops = 0
            if packet is aten.convolution:
                x, w = args[0], args[1]
                if args[6]:  # transposed: each input element meets weight[0].numel() weights
                    flops = 2 * x.numel() * w[0].numel()
                else:
                    flops = 2 * out.numel() * w[0].numel()
            elif packet is aten.mm:
                flops = 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
            elif packet is aten.addmm:
                flops = 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
            elif packet is aten.bmm:
                b, m, k = args[0].shape
                flops = 2 * b * m * k * args[1].shape[2]
            elif packet is aten.baddbmm:
                b, m, k = args[1].shape
                flops = 2 * b * m * k * args[2].shape[2]
            if flops:
                self.by_op[packet] = self.by_op.get(packet, 0) + flops
            return out

    return DispatchFlopCounter
