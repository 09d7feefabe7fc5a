"""The floor every executor stands on: the one `ExecutionPlan` type, the `Backend` interface with its registry by
device name, the one stage-split algorithm, and where compiled helpers are built (`core.build`). Imports nothing
above itself (train/, ipu/, memory/, parallel/)."""

from ipu_norm.core.backend import (
    Backend,
    StepResult,
    TrainSpec,
    get_backend,
    register_backend,
    registered_backends,
    resolve_device,
)
from ipu_norm.core.plan import ExecutionPlan, LossScaling, PlanError, PrecisionSpec, StageSpec, build_plan

__all__ = [
    "Backend",
    "ExecutionPlan",
    "LossScaling",
    "PlanError",
    "PrecisionSpec",
    "StageSpec",
    "StepResult",
    "TrainSpec",
    "build_plan",
    "get_backend",
    "register_backend",
    "registered_backends",
    "resolve_device",
]
