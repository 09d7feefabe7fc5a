"""IPU execution: the PopTorch adapter, the IPU backend and the dry run.

`poptorch_adapter` and `backend` import poptorch lazily (Graphcore's Poplar SDK; not on PyPI), so this package imports
fine without it. Importing it registers `create_backend` as the backend for ``execution.device: ipu``
(ipu_norm/core/backend.py). The plan and the split algorithm are in ``ipu_norm.core`` (re-exported here).
"""

from ipu_norm.core.backend import register_backend
from ipu_norm.core.plan import ExecutionPlan, LossScaling, PlanError, PrecisionSpec, StageSpec, build_plan
from ipu_norm.core.splitter import auto_split, plan_pipeline
from ipu_norm.ipu.backend import PoptorchBackend, create_backend

register_backend("ipu", create_backend)

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
