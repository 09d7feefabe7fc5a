"""A resumable, shardable sampler (DistributedSampler semantics plus mid-epoch restart)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from .seeding import make_generator, mix_seed


class ResumableSampler(Sampler[int]):
    """Index sampler whose order is a pure function of ``(seed, epoch)``, sharded across replicas.

    Each epoch the full index range is permuted with a generator seeded from ``(seed, epoch)`` (identical on
    every replica), made divisible by ``num_replicas`` like ``torch.utils.data.DistributedSampler`` (the tail
    is dropped with ``drop_last=True``, otherwise the list is padded by repeating its start), and replica
    ``rank`` takes every ``num_replicas``-th index from position ``rank``.

    Mid-epoch resumption: ``set_start_batch(b, batch_size)`` makes the next iterations of the *current*
    epoch skip this replica's first ``b * batch_size`` indices, i.e. the batches an interrupted run already
    consumed; the remaining batches are then exactly those of an uninterrupted epoch. ``set_epoch`` with a
    new epoch clears the skip; calling it again with the same epoch keeps it (so the usual
    ``load_state_dict(...)`` then ``set_epoch(epoch)`` sequence works). ``len()`` is the number of indices
    the next iteration yields.

    Typical use (the sampler cannot see how far the training loop got, because loaders prefetch)::

        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader, start=sampler.start_batch(batch_size)):
            ...
            if checkpoint_now:
                sampler.set_start_batch(i + 1, batch_size)   # batches consumed so far in this epoch
                save({"sampler": sampler.state_dict(), ...})

    Args:
        length: size of the dataset.
        shuffle: permute each epoch (else the order is 0..length-1).
        seed: base seed, must be equal on all replicas.
        num_replicas: number of data-parallel replicas (processes) sharing the dataset.
        rank: index of this replica.
        drop_last: drop the tail so every replica gets ``floor(length / num_replicas)`` indices, else pad to
            ``ceil(length / num_replicas)`` by repeating indices.
    """

    def __init__(
        self,
        length: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas={num_replicas}")
        self.length = int(length)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_index = 0

    @property
    def num_samples(self) -> int:
        """Indices per replica in a full epoch."""
        if self.drop_last:
            return self.length // self.num_replicas
        return math.ceil(self.length / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a different epoch than the current one clears any start offset."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.start_index = 0
        self.epoch = epoch

    def set_start_batch(self, batch_index: int, batch_size: int) -> None:
        """Skip this replica's first ``batch_index * batch_size`` indices of the current epoch."""
        if batch_index < 0 or batch_size < 1:
            raise ValueError(f"invalid {batch_index=} / {batch_size=}")
        self.start_index = min(int(batch_index) * int(batch_size), self.num_samples)

    def start_batch(self, batch_size: int) -> int:
        """Index of the first batch the next iteration yields (``start_index // batch_size``)."""
        return self.start_index // batch_size

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """This replica's full index list for ``epoch`` (default: the current one), ignoring the offset."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            order = torch.randperm(self.length, generator=make_generator(mix_seed(self.seed, epoch))).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.num_replicas
        if total <= len(order):
            order = order[:total]
        elif order:
            repeats = math.ceil((total - len(order)) / len(order))
            order = order + (order * repeats)[: total - len(order)]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    def state_dict(self) -> dict[str, Any]:
        """Position and configuration (restored by :meth:`load_state_dict`)."""
        return {
            "epoch": self.epoch,
            "start_index": self.start_index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "length": self.length,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore epoch, start offset and seed.

        Resuming *mid-epoch* (``start_index > 0``) needs the same dataset length and sharding: a different
        ``length``/``shuffle``/``drop_last`` or replica count would silently change which samples the
        remaining batches hold, so it raises instead. At an epoch boundary these may change (e.g. resuming
        on another number of replicas). The rank is not checked (each process loads its own or rank 0's
        copy, the position is the same on all ranks).
        """
        if int(state.get("start_index", 0)) > 0:
            for key in ("length", "shuffle", "num_replicas", "drop_last"):
                if key in state and state[key] != getattr(self, key):
                    raise ValueError(
                        f"cannot resume mid-epoch: sampler state has {key}={state[key]!r}, "
                        f"this sampler has {getattr(self, key)!r}"
                    )
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.start_index = min(int(state.get("start_index", 0)), self.num_samples)
