"""torch.distributed set-up for ``torchrun --nproc_per_node=N run_train.py ...`` (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; ``enabled`` is False for a plain single-process run."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints progress."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun/torch.distributed launcher environment variables are set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device: str, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group from torchrun's env vars (no-op when not launched by it).

    ``device`` is the resolved execution device: nccl for 'cuda', gloo otherwise.
    """
    if device == "ipu":
        return _poprun_instance()
    if not launched_by_torchrun():
        return DistInfo()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if not torch_dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(local)
        torch_dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(enabled=True, rank=rank, world_size=world, local_rank=local)


def _poprun_instance() -> DistInfo:
    """This host process's place among ``poprun --num-instances=I`` instances (rank = instance index).

    PopTorch/popdist reduce gradients across replicas themselves, so no torch process group is created
    (``enabled`` stays False): the instance index and count only shard the data and pick the writing process.
    Metrics are each instance's own (instance 0 logs and checkpoints).
    """
    from ipu_norm.core.launch import popdist_rank_and_size, under_poprun

    if not under_poprun():
        return DistInfo()
    rank, instances = popdist_rank_and_size()
    return DistInfo(enabled=False, rank=rank, world_size=instances, local_rank=0)


def cleanup_distributed(dist: DistInfo) -> None:
    """Destroy the process group created by ``init_distributed``."""
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    """Wait for all ranks (no-op single-process)."""
    if dist.enabled:
        torch_dist.barrier()


def all_reduce_sum(values: list[float], dist: DistInfo, device: torch.device | None = None) -> list[float]:
    """Sum a few floats over ranks (metric totals); identity single-process."""
    if not dist.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any, dist: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (e.g. RNG states for a checkpoint); ``[obj]`` single-process."""
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, dist: DistInfo, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not dist.enabled:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]
