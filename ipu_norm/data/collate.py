"""Collation without per-sample object churn: uint8 samples are copied straight into one batch tensor.

Datasets of this package fetch whole batches (``__getitems__``, which torch's DataLoader calls when present) and
write each decoded sample into a ``(N, 3, H, W)`` uint8 tensor allocated once per batch, in shared memory when
running in a loader worker (so handing it to the main process copies nothing, as ``default_collate`` does).
:func:`collate_batch` passes such batches through and collates anything else with ``default_collate``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate, get_worker_info


class Batch(tuple):
    """``(images, targets)`` already collated by the dataset."""

    __slots__ = ()


def _empty_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor, in shared memory inside a loader worker."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    numel = 1
    for s in shape:
        numel *= s
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # pragma: no cover - torch builds without it: share after allocation (one copy)
        return torch.empty(shape, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(numel)).view(shape)


def collate_into(samples: Iterable[tuple[torch.Tensor, int]], count: int, image_shape: Sequence[int]) -> Batch:
    """Copy ``count`` ``(uint8 image, int target)`` samples of ``image_shape`` into one :class:`Batch` as they come."""
    images = _empty_uint8((count, *image_shape))
    targets = torch.empty(count, dtype=torch.int64)
    j = -1
    for j, (image, target) in enumerate(samples):
        images[j].copy_(image)  # raises on a sample of another shape
        targets[j] = int(target)
    if j + 1 != count:
        raise ValueError(f"collate_into expected {count} samples, got {j + 1}")
    return Batch((images, targets))


def collate_batch(data: Any) -> Any:
    """The loader's collate function: a :class:`Batch` passes as ``(images, targets)``, else ``default_collate``."""
    if isinstance(data, Batch):
        return tuple(data)
    return default_collate(data)
