"""Build CPU/GPU stage modules from an `ExecutionPlan`: the same split, recomputation and precision as on the IPU.

- Stage k is an ``nn.Sequential`` of the plan's units for that stage (``stem``, ``blocks.<i>``, ``head``), sharing the
  model's modules (no copy), so ``model.named_parameters()`` still names every weight.
- Recomputation (``plan.recompute_checkpoints``): on the IPU a checkpoint keeps the output of the named module and
  recomputes everything between checkpoints during backward. Here each run of units that ends at a checkpoint is
  wrapped in ``torch.utils.checkpoint`` (non-reentrant): only the run's input — the previous checkpoint's output —
  is saved, and the run is recomputed in backward. The stage's final segment (ending at the stage output, which is
  sent to the next stage anyway) is wrapped too when recomputation is on, matching PopART's per-stage recompute.
- Proxy Norm: each PN layer computes its statistics in its own forward (recomputed with its segment).
- Precision: 16.x / bf16 run the stage under ``torch.autocast`` (weights stay fp32: PyTorch AMP); 32.32 runs as is.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ipu_norm.core.plan import ExecutionPlan


def unit_module(model: nn.Module, name: str) -> nn.Module:
    """The module of a pipeline unit name ('stem', 'blocks.3', 'head')."""
    return model.get_submodule(name)


class CheckpointedSegment(nn.Module):
    """Runs `segment` under non-reentrant activation checkpointing while gradients are being recorded."""

    def __init__(self, segment: nn.Module) -> None:
        super().__init__()
        self.segment = segment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.training:
            return checkpoint(self.segment, x, use_reentrant=False)
        return self.segment(x)


class AutocastModule(nn.Module):
    """Runs `module` under ``torch.autocast(device_type, dtype)``; the output is returned as produced."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.module(x)


def autocast_dtype(plan: ExecutionPlan) -> torch.dtype | None:
    """The autocast dtype for the plan's precision on CPU/GPU (None for fp32)."""
    return None if plan.precision.compute_dtype == torch.float32 else plan.precision.compute_dtype


def autocast_context(plan: ExecutionPlan, device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the plan's precision, or a null context for 32.32."""
    dtype = autocast_dtype(plan)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def _segments(units: tuple[str, ...], checkpoints: set[str], recompute: bool) -> list[tuple[list[str], bool]]:
    """Split a stage's units into (names, checkpointed?) runs; a run ends after each checkpoint unit."""
    if not recompute:
        return [(list(units), False)]
    runs: list[tuple[list[str], bool]] = []
    current: list[str] = []
    for name in units:
        current.append(name)
        if name in checkpoints:
            runs.append((current, True))
            current = []
    if current:
        runs.append((current, True))
    return runs


def build_stage_module(model: nn.Module, plan: ExecutionPlan, stage: int, *, device_type: str = "cpu",
                       autocast: bool = True) -> nn.Sequential:
    """The ``nn.Sequential`` that runs stage `stage` of `plan` (recomputation and autocast applied)."""
    units = plan.stages[stage].units
    recompute = plan.training and plan.recompute != "none"
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    for names, ckpt in _segments(units, set(plan.recompute_checkpoints), recompute):
        seq = nn.Sequential(OrderedDict((n.replace(".", "_"), unit_module(model, n)) for n in names))
        key = f"{names[0]}-{names[-1]}".replace(".", "_")
        parts[key] = CheckpointedSegment(seq) if ckpt else seq
    module: nn.Module = nn.Sequential(parts)
    dtype = autocast_dtype(plan) if autocast else None
    if dtype is not None:
        module = AutocastModule(module, device_type, dtype)
    stage_module = nn.Sequential(OrderedDict([(f"stage{stage}", module)]))
    return stage_module


def build_stage_modules(model: nn.Module, plan: ExecutionPlan, **kwargs: object) -> list[nn.Sequential]:
    """One module per stage of `plan` (see `build_stage_module`)."""
    return [build_stage_module(model, plan, k, **kwargs) for k in range(plan.num_stages)]


def build_local_model(model: nn.Module, plan: ExecutionPlan, **kwargs: object) -> nn.Sequential:
    """All stages chained in one process: the plan's recomputation and precision on a single device.

    Equivalent to ``model`` in forward (same modules), for a backend that wants the IPU's recompute points without
    pipelining.
    """
    return nn.Sequential(*build_stage_modules(model, plan, **kwargs))
