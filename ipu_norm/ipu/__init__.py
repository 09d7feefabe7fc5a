"""IPU execution: the execution plan, automatic pipeline splitting and the PopTorch adapter / backend.

`plan` and `splitter` are pure Python/PyTorch and always importable; `poptorch_adapter` and `backend` import
poptorch lazily (Graphcore's Poplar SDK; not on PyPI), so this package imports fine without it.
"""

from ipu_norm.ipu.plan import ExecutionPlan, LossScaling, PlanError, PrecisionSpec, StageSpec, build_plan
from ipu_norm.ipu.splitter import auto_split, plan_pipeline

__all__ = [
    "ExecutionPlan",
    "LossScaling",
    "PlanError",
    "PrecisionSpec",
    "StageSpec",
    "auto_split",
    "build_plan",
    "plan_pipeline",
]
