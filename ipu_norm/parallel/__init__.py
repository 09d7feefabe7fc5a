"""The IPU execution plan on CPU/GPU: pipeline stages (torch.distributed.pipelining), replicas (DDP),
recomputation (torch.utils.checkpoint) and precision (autocast), built from the same `ExecutionPlan`."""

from ipu_norm.parallel.pipeline import ParallelLayout, ParallelRunner
from ipu_norm.parallel.stages import (
    AutocastModule,
    CheckpointedSegment,
    autocast_context,
    build_local_model,
    build_stage_module,
    build_stage_modules,
)

__all__ = [
    "AutocastModule",
    "CheckpointedSegment",
    "ParallelLayout",
    "ParallelRunner",
    "autocast_context",
    "build_local_model",
    "build_stage_module",
    "build_stage_modules",
]
