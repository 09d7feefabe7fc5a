"""Graphcore's published IPU training configs, expressed as this project's plans and estimated.

Source: graphcore/examples ``vision/cnns/pytorch/train/configs.yml`` (commit 09b7c672cf2dd700894b11d765a532b7f2e5e11d).
Those configs trained on IPU-POD16/64 systems, so they are ground truth for the planner: each one that this project can
express must build (``ipu_norm.core.plan.build_plan``) and fit (``ipu_norm.memory.estimate``); tests/test_graphcore_
configs.py checks that. ``python -m ipu_norm.memory.graphcore --out docs/graphcore_configs.md`` writes the table of
Graphcore's layout next to our per-IPU estimate.

How a configs.yml entry maps here:
- ``pipeline_splits`` name modules of Graphcore's model (``blocks/3/0/conv_pw``: stage 3, block 0 of timm's nested
  EfficientNet, its first conv); a stage starting at that block's first conv starts at the flat block here
  (``blocks.<sum of the earlier stages' depths + index>``).
- ``recompute_mode: manual`` with ``recompute_checkpoints`` (ResNet-50: the residual ``add``s, i.e. block outputs, plus
  every conv/bn of layer4): ``recompute: checkpoints`` at the listed block outputs (one IPU: PopART RecomputeAll with
  explicit recomputation, as Graphcore's utils/ipu_settings.py sets it); layer4's per-op checkpoints cannot be named at
  block granularity, so blocks 13..15 are checkpointed at their outputs and rebuilt one at a time.
- pipelined entries leave ``autoRecomputation`` unset, so PopTorch runs Pipeline recomputation
  (popart_compiler/source/Compiler.cpp:572-578 at sdk/poptorch/3.4.0): ``recompute: pipeline``.
- precision: Graphcore's application casts the model to fp16 only for '.16' precisions (models/models.py); this
  project's adapter casts it for 16.32 as well, so our 16.32 estimate has fp16 weights where Graphcore's has fp32.
- resolution: the model's native size (ResNet-50 and EfficientNet-B0 224 px, EfficientNet-B4 380 px): these entries
  do not set half-resolution training.
Not expressible here: the MobileNetV3 entries (no MobileNetV3 in the model zoo).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

CONFIGS_YML = ("graphcore/examples vision/cnns/pytorch/train/configs.yml "
               "@ 09b7c672cf2dd700894b11d765a532b7f2e5e11d")
IPU_BYTES = 900 * 10**6


@dataclass(frozen=True)
class GraphcoreConfig:
    """One configs.yml entry: Graphcore's values and their expression in this project."""

    name: str  # the configs.yml key
    model: str  # our registry name
    norm: str
    norm_groups: int | None
    resolution: int
    precision: str
    micro_batch: int  # configs.yml batch_size
    replicas: int
    accumulation: int
    device_iterations: int
    graphcore_splits: tuple[str, ...]  # as written in configs.yml
    splits: tuple[str, ...]  # the same stage starts in our module names
    recompute: str  # our plan's mode (see module docstring)
    available_memory_proportion: float
    optimizer: str  # configs.yml optimizer
    momentum: float
    loss_scaling: float
    recompute_checkpoints: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def ipus_per_replica(self) -> int:
        return len(self.splits) + 1


_RN50_CHECKPOINTS = tuple(f"blocks.{i}" for i in (0, 1, 2, 3, 5, 6, 7, 9, 11, 12, 13, 14, 15))
_EFFNET_G16_GN = {"norm": "gn", "norm_groups": 4, "precision": "16.32", "available_memory_proportion": 0.15,
                  "optimizer": "rmsprop_tf", "momentum": 0.9, "loss_scaling": 128.0, "recompute": "pipeline"}

GRAPHCORE_CONFIGS: tuple[GraphcoreConfig, ...] = (
    GraphcoreConfig(
        "resnet50", "resnet50", "bn", None, 224, "16.16", micro_batch=18, replicas=16, accumulation=57,
        device_iterations=1, graphcore_splits=(), splits=(), recompute="checkpoints",
        available_memory_proportion=0.16, optimizer="sgd_combined", momentum=0.9, loss_scaling=128.0,
        recompute_checkpoints=_RN50_CHECKPOINTS,
        notes=("recompute_mode manual: add, add_1, add_2, add_3, add_5, add_6, add_7, add_9, add_11, add_12, "
               "add_13..15 (+ every conv/bn of layer4, avgpool, fc)",),
    ),
    GraphcoreConfig(
        "resnet50-pod64", "resnet50", "bn", None, 224, "16.16", micro_batch=18, replicas=64, accumulation=14,
        device_iterations=1, graphcore_splits=(), splits=(), recompute="checkpoints",
        available_memory_proportion=0.16, optimizer="sgd_combined", momentum=0.9, loss_scaling=128.0,
        recompute_checkpoints=_RN50_CHECKPOINTS, notes=("resnet50 on 64 replicas",),
    ),
    GraphcoreConfig(
        "efficientnet-b0-g16-gn-pod16", "efficientnet_b0_g16", resolution=224, micro_batch=20, replicas=8,
        accumulation=5, device_iterations=1, graphcore_splits=("blocks/3/0/conv_pw",), splits=("blocks.5",),
        **_EFFNET_G16_GN,
    ),
    GraphcoreConfig(
        "efficientnet-b4-g16-gn-pod16", "efficientnet_b4_g16", resolution=380, micro_batch=6, replicas=4,
        accumulation=32, device_iterations=4,
        graphcore_splits=("blocks/1/1/conv_pw", "blocks/3/0/conv_pw", "blocks/4/5/conv_pw"),
        splits=("blocks.3", "blocks.10", "blocks.21"), **_EFFNET_G16_GN,
    ),
)

NOT_EXPRESSIBLE = {
    "mobilenet-v3-small": "no MobileNetV3 in the model zoo",
    "mobilenet-v3-small-pod4": "no MobileNetV3 in the model zoo",
    "mobilenet-v3-large": "no MobileNetV3 in the model zoo",
    "mobilenet-v3-large-pod16": "no MobileNetV3 in the model zoo",
}


def execution_section(gc: GraphcoreConfig) -> dict[str, Any]:
    """The ``execution:`` config section of the entry."""
    return {
        "device": "ipu", "precision": gc.precision, "replicas": gc.replicas,
        "ipus_per_replica": gc.ipus_per_replica, "pipeline_splits": list(gc.splits),
        "gradient_accumulation": gc.accumulation, "device_iterations": gc.device_iterations,
        "recompute": gc.recompute, "recompute_checkpoints": list(gc.recompute_checkpoints),
        "available_memory_proportion": gc.available_memory_proportion, "loss_scaling": gc.loss_scaling,
    }


def build(gc: GraphcoreConfig, *, meta: bool = False) -> tuple[torch.nn.Module, Any]:
    """(model, ExecutionPlan) of the entry; raises PlanError if the planner refuses it."""
    from ipu_norm.core.plan import build_plan
    from ipu_norm.models import create_model

    kw: dict[str, Any] = {"norm": gc.norm}
    if gc.norm_groups is not None:
        kw["norm_groups"] = gc.norm_groups
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = create_model(gc.model, **kw)
    else:
        model = create_model(gc.model, **kw)
    plan = build_plan(execution_section(gc), model, {"micro_batch_size": gc.micro_batch}, available_ipus=None)
    return model, plan


def memory_spec(gc: GraphcoreConfig) -> Any:
    """The estimate's `MemorySpec` (optimizer state slots) of the entry."""
    from ipu_norm.memory.estimate import MemorySpec, optimizer_kind

    name = "sgd" if gc.optimizer == "sgd_combined" else gc.optimizer
    return MemorySpec(optimizer=optimizer_kind(name, gc.momentum))


def estimate(gc: GraphcoreConfig, profile: Any = None) -> tuple[Any, Any]:
    """(plan, PlanEstimate) of the entry; the profile is measured (plain ops, CPU) unless given."""
    from ipu_norm.memory.estimate import estimate_plan, profile_model

    model, plan = build(gc)
    profile = profile or profile_model(model, gc.resolution)
    return plan, estimate_plan(profile, plan, memory_spec(gc))


def table(rows: Sequence[tuple[GraphcoreConfig, Any, Any]]) -> str:
    """Markdown: Graphcore's layout beside our plan and per-IPU estimate."""
    head = ("| configs.yml entry | Graphcore's layout | our plan | estimate per IPU (MiB of 858) | fits |\n"
            "|---|---|---|---|---|")
    lines = [head]
    for gc, plan, est in rows:
        gc_split = ", ".join(gc.graphcore_splits) or "-"
        layout = (f"{gc.precision}, mb {gc.micro_batch}, {gc.replicas} x {gc.ipus_per_replica} IPUs, acc "
                  f"{gc.accumulation}, dev. it. {gc.device_iterations}, splits {gc_split}, amp "
                  f"{gc.available_memory_proportion:g}")
        ours = (f"splits {', '.join(plan.pipeline_splits) or '-'}, recompute {plan.recompute}"
                + (f" ({len(plan.recompute_checkpoints)} checkpoints)" if plan.recompute_checkpoints else "")
                + f", stable_norm {plan.stable_norm}, global batch {plan.global_batch_size}")
        per_ipu = ", ".join(f"{s.total / 2**20:,.0f} (act {s.activations / 2**20:,.0f} x{s.in_flight})"
                            for s in est.stages)
        lines.append(f"| {gc.name} | {layout} | {ours} | {per_ipu} | {'yes' if est.fits else 'NO'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Estimate every expressible entry and write the markdown table (module docstring)."""
    from ipu_norm.memory.estimate import assumptions_text

    ap = argparse.ArgumentParser(prog="python -m ipu_norm.memory.graphcore", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    ap.add_argument("--only", nargs="*", default=None, help="configs.yml keys to include")
    args = ap.parse_args(argv)
    rows = []
    for gc in GRAPHCORE_CONFIGS:
        if args.only and gc.name not in args.only:
            continue
        plan, est = estimate(gc)
        rows.append((gc, plan, est))
    parts = [
        "# Graphcore's published configs: the planner's ground truth",
        f"Source: {CONFIGS_YML}. Generated by `python -m ipu_norm.memory.graphcore --out docs/graphcore_configs.md`; "
        "checked by tests/test_graphcore_configs.py (every entry must build and fit).",
        table(rows),
        "Estimate per IPU: total bytes of each pipeline stage (weights, optimizer state, gradients and accumulators, "
        "activations with their in-flight copies, temporary memory, 15 % fixed overhead) on the plain ops PopTorch "
        "traces; `act A xN` = activations in MiB and the copies of one micro-batch's stash held by that stage.",
        "Not expressible here: " + "; ".join(f"{k} ({v})" for k, v in NOT_EXPRESSIBLE.items()) + ".",
        "Differences from Graphcore's runs: ResNet-50's layer4 per-op checkpoints are block outputs here; Graphcore's "
        "16.32 keeps fp32 weights on the IPU (it casts the model to fp16 only for .16), ours casts it to fp16.",
    ]
    if rows:
        parts.append("Assumptions (first entry's precision):\n" + "\n".join(
            f"- {line}" for line in assumptions_text(rows[0][1], memory_spec(rows[0][0])).splitlines()))
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
