"""Stochastic depth (Huang et al. 2016): timm's ``DropPath`` / ``drop_path``, with a range check on the rate.

timm's layer zeroes the residual branch of each example with probability ``drop_prob`` in training mode and,
with ``scale_by_keep`` (the default, EfficientNet), divides the survivors by the keep probability; NFNets use
``scale_by_keep=False``, as DeepMind's reference does (REFERENCE.md). ``tests/test_models_efficientnet.py``
checks it bitwise against the formula written in the test.
"""

from __future__ import annotations

from timm.layers import DropPath as _TimmDropPath
from timm.layers import drop_path

__all__ = ["DropPath", "drop_path"]


class DropPath(_TimmDropPath):
    """``timm.layers.DropPath`` that rejects a rate outside [0, 1) with one line naming it."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"DropPath: drop_prob must be in [0, 1), got {drop_prob}")
        super().__init__(drop_prob, scale_by_keep)
