"""``python -m ipu_norm.ipu``: print balanced ``pipeline_splits`` for a registered model.

``python -m ipu_norm.ipu --model efficientnet_b0 --norm ln+pn --ipus 2 --image-size 160 [--cost memory
--micro-batch-size 24 --precision 16.32]``: 'flops' balances forward FLOPs per stage; 'memory' minimises the fullest
IPU of the memory estimate (ipu_norm.memory.estimate, in-flight micro-batches per stage included).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (see module docstring)."""
    from ipu_norm.core.plan import build_plan
    from ipu_norm.core.splitter import pipeline_units, plan_pipeline, unit_flops
    from ipu_norm.models import create_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--norm", default=None)
    ap.add_argument("--ipus", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--micro-batch-size", type=int, default=1, help="for --cost memory")
    ap.add_argument("--precision", default="16.32", help="for --cost memory")
    ap.add_argument("--cost", choices=["flops", "memory"], default="flops")
    args = ap.parse_args(argv)
    kwargs = {"norm": args.norm} if args.norm else {}
    names: list[str]
    if args.cost == "flops":
        with torch.device("meta"):
            model = create_model(args.model, **kwargs)
        costs = unit_flops(model, args.image_size)
        splits = plan_pipeline(model, args.ipus, cost=costs, image_size=args.image_size)
        names = [n for n, _ in pipeline_units(model)]
        bounds = [0, *[names.index(s) for s in splits], len(names)]
        total = sum(costs) or 1.0
        print(f"pipeline_splits: [{', '.join(splits)}]")
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            print(f"  IPU{k}: {names[a]} .. {names[b - 1]}  flops share {sum(costs[a:b]) / total:.1%}")
        return
    from ipu_norm.memory.estimate import estimate_plan, memory_balanced_splits, profile_model, with_splits

    model = create_model(args.model, **kwargs)
    size = args.image_size or int((getattr(model, "default_cfg", None) or {}).get("train_size", 224))
    plan = build_plan({"device": "ipu", "precision": args.precision, "recompute": "auto"}, model,
                      {"micro_batch_size": args.micro_batch_size, "global_batch_size": None,
                       "seed": 0}, global_batch_size=args.micro_batch_size * (2 * args.ipus - 1))
    profile = profile_model(model, size)
    splits = memory_balanced_splits(model, plan, args.ipus, profile=profile)
    est = estimate_plan(profile, with_splits(plan, splits))
    print(f"pipeline_splits: [{', '.join(splits)}]")
    for st in est.stages:
        print(f"  {st.label}: est. {st.total / 2**20:,.0f} MiB of {st.budget / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
