"""Newer torch APIs in one place, each with its torch 2.0.1 equivalent (the torch PopTorch 3.4 requires).

Nothing else in ``ipu_norm`` branches on the torch version: code that needs an API newer than torch 2.0.1 calls
the function here.
"""

from __future__ import annotations

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


def flop_counter_mode() -> Any:
    """A silent ``torch.utils.flop_counter.FlopCounterMode`` (torch >= 2.1; torch 2.0.1 has no FLOP counter).

    Raises ``RuntimeError`` (one line naming the torch version) under torch 2.0.x, the IPU environment's torch:
    count FLOPs in the CPU/GPU environment instead; the counts depend on shapes only.
    """
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        raise RuntimeError(
            f"counting FLOPs needs torch.utils.flop_counter (torch >= 2.1), this is torch {torch.__version__}: "
            "count them in the CPU/GPU environment (the counts depend on shapes only)"
        ) from None
    return FlopCounterMode(display=False)
