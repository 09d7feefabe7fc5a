"""Newer torch APIs in one place, each with its torch 2.0.1 equivalent (the torch PopTorch 3.4 requires).

Nothing else in ``ipu_norm`` branches on the torch version: code that needs an API newer than torch 2.0.1 calls
the function here.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch


def is_compiling() -> bool:
    """True while torch.compile (Dynamo) traces the caller; ``torch.compiler.is_compiling`` is newer than 2.0.1."""
    compiler = getattr(torch, "compiler", None)
    fn = getattr(compiler, "is_compiling", None)
    if fn is not None:
        return bool(fn())
    from torch import _dynamo  # torch 2.0.x: the same query lives in Dynamo itself (no local rebinding of `torch`)

    return bool(_dynamo.is_compiling())


def resize_uint8(image: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Antialiased bilinear resize of a ``(C, H, W)`` uint8 tensor to ``size`` = [h, w], uint8 out.

    torchvision.transforms.v2's kernel: native uint8 (and fastest on channels-last input) with torch >= 2.1; with
    torch 2.0.1 / torchvision 0.15 (where transforms.v2 is a beta that warns on import) it computes in float and
    rounds. The v1 ``transforms.functional.resize`` goes through float on both and was ~7x slower here.
    """
    return _v2_functional().resize(image, size, antialias=True)


@functools.lru_cache(maxsize=1)
def _v2_functional() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision 0.15: "transforms.v2 ... still Beta"
        from torchvision.transforms.v2 import functional
    return functional
