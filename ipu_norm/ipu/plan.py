"""Old import path of the execution plan, kept for callers outside this package's own modules (tests, the
PopTorch adapter and backend): the plan lives in ``ipu_norm.core.plan``."""

from ipu_norm.core.plan import (  # noqa: F401
    DEFAULT_INITIAL_LOSS_SCALE,
    PRECISIONS,
    ExecutionPlan,
    LossScaling,
    PlanError,
    PrecisionSpec,
    StageSpec,
    build_plan,
)
