"""IPU execution: the execution plan, automatic pipeline splitting and the PopTorch adapter / backend.

`plan` and `splitter` are pure Python/PyTorch; `poptorch_adapter` and `backend` import poptorch lazily (Graphcore's
Poplar SDK; not on PyPI), so this package imports fine without it. `create_backend(cfg, dist)` is the trainer's entry
point for ``execution.device: ipu``.
"""

from ipu_norm.ipu.backend import PoptorchBackend, create_backend
from ipu_norm.ipu.plan import ExecutionPlan, LossScaling, PlanError, PrecisionSpec, StageSpec, build_plan
from ipu_norm.ipu.splitter import auto_split, plan_pipeline

__all__ = [
    "ExecutionPlan",
    "LossScaling",
    "PlanError",
    "PoptorchBackend",
    "PrecisionSpec",
    "StageSpec",
    "auto_split",
    "build_plan",
    "create_backend",
    "plan_pipeline",
]
