"""Reproducible DataLoader construction."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .collate import collate_batch
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


class EpochKeySampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` keys from an index sampler that has an ``epoch`` (e.g. :class:`ResumableSampler`).

    The epoch travels with every index, so a dataset that accepts such keys (``accepts_epoch_keys``) augments for
    the right epoch even in persistent loader workers, whose copy of the dataset never sees ``set_epoch``. Other
    attributes (``set_epoch``, ``epoch``, ``set_start_batch`` ...) are the wrapped sampler's.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "sampler":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)


class EpochDataLoader(DataLoader):
    """DataLoader that hands its sampler's epoch to the dataset before every iteration.

    Datasets of this package seed their augmentation per ``(seed, epoch, index)``. With a dataset that accepts
    ``(epoch, index)`` keys, :func:`build_loader` samples such keys (:class:`EpochKeySampler`) and keeps its
    workers alive across epochs. Otherwise the epoch must be set on the dataset *before* worker processes copy
    it, i.e. when an iterator is created, and workers are not persistent (one would keep the first epoch's copy).
    """

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", None)
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if epoch is not None and callable(set_epoch):
            set_epoch(epoch)
        return super().__iter__()

    def shutdown_workers(self) -> None:
        """Stop persistent workers now, as the loader's garbage collection would.

        Call it when done with the loader: its workers may ignore SIGTERM (:func:`ipu_norm.train.interrupt.
        shield_loader_workers`), and then nothing else stops them before the interpreter waits for them at exit.
        """
        iterator, self._iterator = getattr(self, "_iterator", None), None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

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
    persistent_workers: bool | None = None,
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
        collate_fn: custom collate function (default :func:`ipu_norm.data.collate.collate_batch`: batches the
            dataset collated itself pass through, anything else goes to ``default_collate``).
        persistent_workers: keep workers across epochs; default: when ``num_workers > 0`` and the dataset accepts
            ``(epoch, index)`` keys (``accepts_epoch_keys``), which the loader then samples. ``True`` for another
            dataset is an error (its workers would keep augmenting for the first epoch).
    """
    if sampler is None:
        sampler = ResumableSampler(len(dataset), shuffle=False, seed=seed, drop_last=False)
    epoch_keys = bool(getattr(dataset, "accepts_epoch_keys", False))
    if persistent_workers is None:
        persistent_workers = epoch_keys and num_workers > 0
    if persistent_workers and not epoch_keys:
        raise ValueError(
            f"persistent_workers=True needs a dataset that accepts (epoch, index) keys; {type(dataset).__name__} does "
            "not (its workers would keep the first epoch's augmentation)"
        )
    if epoch_keys:
        sampler = EpochKeySampler(sampler)
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
        persistent_workers=bool(persistent_workers and num_workers > 0),
        collate_fn=collate_fn or collate_batch,
        **kwargs,
    )
