"""Newer torch APIs in one place, each with its torch 2.0.1 equivalent (the torch PopTorch 3.4 requires).

Nothing else in ``ipu_norm`` branches on the torch version: code that needs an API newer than torch 2.0.1 calls
the function here.
"""

from __future__ import annotations

import torch


def is_compiling() -> bool:
    """True while torch.compile (Dynamo) traces the caller; ``torch.compiler.is_compiling`` is newer than 2.0.1."""
    compiler = getattr(torch, "compiler", None)
    fn = getattr(compiler, "is_compiling", None)
    if fn is not None:
        return bool(fn())
    from torch import _dynamo  # torch 2.0.x: the same query lives in Dynamo itself

    return bool(_dynamo.is_compiling())
