"""Training-memory footprints: measure on CPU/GPU, estimate per IPU pipeline stage, compare norms, check budgets.

- measure.py: weights / gradients / optimizer state / saved activations (per block) and the measured peak.
- estimate.py: per-stage IPU (Mk2, 900 MB) estimate of an ``ExecutionPlan``, memory-balanced splits, what fits, and
  ``check_fits_ipu(model, plan, config=cfg)`` raising ``MemoryBudgetError`` before compiling.
- graphcore.py: Graphcore's published IPU configs, planned and estimated (``python -m ipu_norm.memory.graphcore``).
- compare.py: ``python -m ipu_norm.memory`` tables and plot across norms and micro-batch sizes.
"""

from ipu_norm.memory.estimate import (
    IPU_MEMORY_BYTES,
    MemoryBudgetError,
    MemorySpec,
    PlanEstimate,
    StageEstimate,
    check_fits_ipu,
    estimate_plan,
    max_micro_batch,
    memory_balanced_splits,
    plan_fits,
    unit_memory_costs,
)
from ipu_norm.memory.measure import (
    ActivationProfile,
    fit_activation_scaling,
    measure_activations,
    measure_peak,
    measure_step,
)

__all__ = [
    "IPU_MEMORY_BYTES", "ActivationProfile", "MemoryBudgetError", "MemorySpec", "PlanEstimate", "StageEstimate",
    "check_fits_ipu", "estimate_plan", "fit_activation_scaling", "max_micro_batch", "measure_activations",
    "measure_peak", "measure_step", "memory_balanced_splits", "plan_fits", "unit_memory_costs",
]
