"""Reproducible DataLoader construction."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .sampler import ResumableSampler


def seed_worker(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """Seed Python's and NumPy's RNGs in a worker from torch's per-worker seed.

    PyTorch seeds each worker's torch RNG with ``base_seed + worker_id`` (``base_seed`` drawn from the
    loader's generator) but leaves ``random`` and ``numpy`` alone, so e.g. NumPy-based augmentations would
    repeat across workers. The datasets of this package do not rely on these streams (their augmentation
    is seeded per sample), but user transforms may.
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


class EpochDataLoader(DataLoader):
    """DataLoader that hands its sampler's epoch to the dataset before every iteration.

    Datasets of this package seed their augmentation per ``(seed, epoch, index)``; the epoch must be set
    on the dataset *before* worker processes copy it, i.e. when an iterator is created. Workers are
    therefore never persistent (a persistent worker would keep the first epoch's copy).
    """

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", None)
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if epoch is not None and callable(set_epoch):
            set_epoch(epoch)
        return super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch on the sampler (and, through ``__iter__``, on the dataset)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    sampler: Sampler[int] | None,
    num_workers: int,
    drop_last: bool,
    seed: int,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    collate_fn: Any = None,
) -> EpochDataLoader:
    """A reproducible DataLoader: seeded generator, seeded workers, epoch forwarded to the dataset.

    With a :class:`ResumableSampler` and a dataset from :func:`ipu_norm.data.build_dataset`, the sequence
    of batches (content and augmentation) depends only on the seeds and the epoch, not on
    ``num_workers``, so a resumed run reproduces an uninterrupted one on CPU.

    Args:
        dataset: map-style dataset.
        batch_size: samples per batch (the micro-batch on each replica).
        sampler: index sampler; ``None`` means a non-shuffling :class:`ResumableSampler` over the dataset.
        num_workers: loader worker processes (0: load in the main process).
        drop_last: drop the last incomplete batch.
        seed: seed of the loader's generator (which draws the workers' base seed).
        pin_memory: pin host memory for faster GPU copies.
        prefetch_factor: batches prefetched per worker (only with ``num_workers > 0``).
        collate_fn: custom collate function.
    """
    if sampler is None:
        sampler = ResumableSampler(len(dataset), shuffle=False, seed=seed, drop_last=False)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    kwargs: dict[str, Any] = {}
    if num_workers > 0 and prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    return EpochDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
        collate_fn=collate_fn,
        **kwargs,
    )
