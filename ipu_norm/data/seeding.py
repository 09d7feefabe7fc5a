"""Deterministic seed derivation and scoped RNG control shared by the data pipeline.

Every random choice in the input pipeline (augmentation parameters, generated images, shuffles) is a pure
function of integers such as (seed, epoch, index). That is what lets a run resumed mid-epoch reproduce an
uninterrupted one bit for bit: nothing depends on how many samples a worker process happened to draw
before, on the number of workers, or on the global RNG of the training loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a fast, well-mixed bijection on 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """Combine integers into one well-spread 63-bit seed (order matters; stable across processes/runs).

    Python's ``hash`` is salted per process for strings and too regular for ints, so a tiny explicit hash
    is used instead. The result fits ``torch.Generator.manual_seed``.
    """
    h = 0x1234_5678_9ABC_DEF0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << 63) - 1)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Run a block with the global CPU torch RNG seeded to ``seed``, restoring the previous state after.

    torchvision's random transforms draw from the global CPU generator and accept no ``generator``
    argument; scoping the seed here makes them a function of ``seed`` alone without disturbing the
    training loop's RNG (dropout, stochastic depth) when data loading runs in the main process. Only the
    CPU generator is touched (``devices=[]``): ``torch.manual_seed`` would also reseed CUDA generators.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield


def make_numpy_rng(seed: int) -> np.random.RandomState:
    """A private legacy NumPy ``RandomState`` (MT19937) seeded from any non-negative int (SeedSequence)."""
    return np.random.RandomState(np.random.MT19937(np.random.SeedSequence(int(seed))))


@contextlib.contextmanager
def numpy_global_rng(rng: np.random.RandomState) -> Iterator[None]:
    """Run a block with NumPy's global RNG in the state of ``rng``; afterwards ``rng`` holds the advanced state
    and the global RNG its previous one.

    For libraries that draw from ``np.random.*`` and take no generator (timm's Mixup): their draws become a
    function of ``rng`` alone, and the training loop's global NumPy stream is left as it was. Not for code that
    draws from NumPy's global RNG in another thread at the same time.
    """
    saved = np.random.get_state()
    np.random.set_state(rng.get_state())
    try:
        yield
    finally:
        rng.set_state(np.random.get_state())
        np.random.set_state(saved)


def numpy_state_to_dict(state: tuple) -> dict[str, Any]:
    """A legacy NumPy RNG state tuple as tensors / primitives (loadable with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def numpy_state_from_dict(state: dict[str, Any]) -> tuple:
    """Inverse of :func:`numpy_state_to_dict`."""
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])
