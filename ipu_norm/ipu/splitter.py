"""Automatic pipeline splitting at block boundaries.

`auto_split(costs, num_stages)` partitions a sequence of per-unit costs into contiguous, non-empty stages so that the
most expensive stage is as cheap as possible (the pipeline's throughput is set by its slowest stage, and its memory
fit by its fullest IPU). It is an exact dynamic programme over prefix sums, not a greedy fill.

`plan_pipeline(model, num_ipus, cost=...)` applies it to a model that follows the MODEL CONTRACT
(ipu_norm/models/registry.py): the units are ``stem``, ``blocks.0`` .. ``blocks.N-1`` and ``head``; the answer is the
list of split names for the execution config's ``pipeline_splits`` (a split named ``'blocks.7'`` means the next
stage starts at block 7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

CostFn = Callable[[nn.Module], list[float]]


def auto_split(costs: Sequence[float], num_stages: int) -> list[int]:
    """Split indices minimising the maximum stage cost.

    Args:
        costs: non-negative cost of each unit, in execution order.
        num_stages: number of contiguous, non-empty stages (1 <= num_stages <= len(costs)).

    Returns:
        ``num_stages - 1`` increasing indices; stage ``k + 1`` starts at unit ``result[k]`` (stage 0 starts at 0).
        Among partitions with the optimal maximum, the most even one (smallest sum of squared stage costs, then
        the lexicographically smallest split points) is returned, so the answer is deterministic.
    """
    n = len(costs)
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages > n:
        raise ValueError(f"cannot split {n} units into {num_stages} non-empty stages")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be non-negative")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][j]: minimal max-stage cost to put units j..n-1 into k stages.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    best[0][n] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(n - k, -1, -1):
            lo = inf
            # The first of the k stages covers units j..e-1; the remaining k-1 stages need >= k-1 units.
            for e in range(j + 1, n - (k - 1) + 1):
                cand = max(prefix[e] - prefix[j], best[k - 1][e])
                if cand < lo:
                    lo = cand
            best[k][j] = lo
    target = best[num_stages][0]
    return _balanced_splits(prefix, num_stages, target)


def _balanced_splits(prefix: list[float], num_stages: int, cap: float) -> list[int]:
    """Among partitions whose every stage costs <= `cap` (the optimal max), the one with the smallest sum of squared
    stage costs; ties go to the lexicographically smallest split points.

    Many partitions share the optimal maximum (e.g. one that leaves a zero-cost stage); minimising the sum of
    squares picks the most even of them, which also evens out memory and idle time on the non-critical stages.
    """
    n = len(prefix) - 1
    inf = float("inf")
    # Tolerance only guards float round-off: `cap` itself was computed from these same prefix differences.
    limit = cap + 1e-12 * max(1.0, abs(cap))
    sq = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    sq[0][n] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(n - k, -1, -1):
            lo = inf
            for e in range(j + 1, n - (k - 1) + 1):
                c = prefix[e] - prefix[j]
                if c <= limit and sq[k - 1][e] < inf:
                    lo = min(lo, c * c + sq[k - 1][e])
            sq[k][j] = lo
    splits: list[int] = []
    j = 0
    for k in range(num_stages, 1, -1):
        goal = sq[k][j]
        for e in range(j + 1, n - (k - 1) + 1):
            c = prefix[e] - prefix[j]
            if c <= limit and sq[k - 1][e] < inf and c * c + sq[k - 1][e] <= goal + 1e-12 * max(1.0, goal):
                splits.append(e)
                j = e
                break
    return splits


def max_stage_cost(costs: Sequence[float], splits: Sequence[int]) -> float:
    """The cost of the most expensive stage of a split (splits as returned by `auto_split`)."""
    bounds = [0, *splits, len(costs)]
    return max(sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


def pipeline_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's pipeline units in order: ('stem', m), ('blocks.0', m), ..., ('head', m)."""
    for attr in ("stem", "blocks", "head"):
        if not hasattr(model, attr):
            raise TypeError(f"model {type(model).__name__} lacks .{attr}; it does not follow the MODEL CONTRACT")
    units: list[tuple[str, nn.Module]] = [("stem", model.stem)]
    units += [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    units.append(("head", model.head))
    return units


def _example_input(model: nn.Module, image_size: int | None, batch_size: int, device: torch.device) -> torch.Tensor:
    cfg = getattr(model, "default_cfg", {}) or {}
    size = image_size or cfg.get("train_size") or 224
    in_chans = cfg.get("in_chans", 3)
    return torch.zeros(batch_size, in_chans, size, size, device=device)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device (shapes only: no memory, no compute)."""
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "meta":
        return model
    # Deep-copying a real model costs its memory once; to('meta') then frees it. Acceptable for cost planning.
    import copy

    return copy.deepcopy(model).to("meta")


def unit_flops(model: nn.Module, image_size: int | None = None) -> list[float]:
    """Forward FLOPs of each pipeline unit for one image, counted on the meta device.

    Uses ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, 2 FLOPs per MAC); element-wise ops
    are not counted, which is the usual convention for CNN FLOP tables.
    """
    from ipu_norm.compat import FlopCounter

    meta = _meta_copy(model)
    was_training = meta.training
    meta.eval()
    x = _example_input(meta, image_size, 1, torch.device("meta"))
    out: list[float] = []
    with torch.no_grad():
        for _, unit in pipeline_units(meta):
            counter = FlopCounter()
            with counter:
                x = unit(x)
            out.append(float(counter.get_total_flops()))
    meta.train(was_training)
    return out


def unit_memory(model: nn.Module, image_size: int | None = None, micro_batch_size: int = 1) -> list[float]:
    """Rough training memory of each unit in bytes: parameters (x3 for weight, gradient and one optimizer slot)
    plus the tensors autograd saves for backward at `micro_batch_size`, measured on the meta device.

    A placeholder cost model for balancing stages; the memory engineer's estimator (ipu_norm.memory) is more
    complete — pass its per-block vector as ``cost=`` to `plan_pipeline` when it is available.
    """
    meta = _meta_copy(model)
    x = _example_input(meta, image_size, micro_batch_size, torch.device("meta"))
    out: list[float] = []
    for _, unit in pipeline_units(meta):
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            # Meta tensors have no storage pointer to deduplicate on; a tensor saved by two ops is the same
            # Python object, so id() catches that common case.
            saved[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = unit(x.detach().requires_grad_(True))
        params = sum(p.numel() * p.element_size() for p in unit.parameters())
        out.append(float(sum(saved.values()) + 3 * params))
    return out


def plan_pipeline(
    model: nn.Module,
    num_ipus: int,
    cost: str | Sequence[float] | CostFn = "flops",
    *,
    image_size: int | None = None,
    micro_batch_size: int = 1,
) -> list[str]:
    """Balanced ``pipeline_splits`` for `model` over `num_ipus` stages.

    Args:
        model: a MODEL CONTRACT model (real or on the meta device).
        num_ipus: number of pipeline stages (one per IPU).
        cost: 'flops' (forward FLOPs per unit), 'memory' (rough bytes per unit, see `unit_memory`), a vector with one
            cost per unit (stem, blocks..., head) or per block (then stem/head cost 0 and are kept with their
            neighbours' stages), or a callable ``model -> list[float]`` returning either form.
        image_size: input side for the FLOP / memory count (default: ``model.default_cfg['train_size']``).
        micro_batch_size: batch used by the 'memory' cost (activations scale with it, weights do not).

    Returns:
        Split names such as ``['blocks.4', 'blocks.11']`` (empty for one IPU).
    """
    units = pipeline_units(model)
    if num_ipus <= 1:
        return []
    if isinstance(cost, str):
        if cost == "flops":
            costs = unit_flops(model, image_size)
        elif cost == "memory":
            costs = unit_memory(model, image_size, micro_batch_size)
        else:
            raise ValueError(f"unknown cost {cost!r}; use 'flops', 'memory', a list of floats or a callable")
    elif callable(cost):
        costs = list(cost(model))
    else:
        costs = [float(c) for c in cost]
    num_blocks = len(units) - 2
    if len(costs) == num_blocks:
        costs = [0.0, *costs, 0.0]
    if len(costs) != len(units):
        raise ValueError(
            f"cost vector has {len(costs)} entries; expected {len(units)} (stem, {num_blocks} blocks, head) "
            f"or {num_blocks} (blocks only)"
        )
    if num_ipus > len(units):
        raise ValueError(f"model has only {len(units)} pipeline units (stem, blocks, head); cannot use {num_ipus}")
    splits = auto_split(costs, num_ipus)
    return [units[i][0] for i in splits]


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: print balanced ``pipeline_splits`` for a registered model.

    ``python -m ipu_norm.ipu --model efficientnet_b0 --norm ln+pn --ipus 2 --image-size 160 [--cost memory]``
    """
    import argparse

    from ipu_norm.models import create_model

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--norm", default=None)
    ap.add_argument("--ipus", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--micro-batch-size", type=int, default=1, help="for --cost memory")
    ap.add_argument("--cost", choices=["flops", "memory"], default="flops")
    args = ap.parse_args(argv)
    kwargs = {"norm": args.norm} if args.norm else {}
    with torch.device("meta"):
        model = create_model(args.model, **kwargs)
    costs = unit_flops(model, args.image_size) if args.cost == "flops" else unit_memory(
        model, args.image_size, args.micro_batch_size)
    splits = plan_pipeline(model, args.ipus, cost=costs, image_size=args.image_size)
    names = [n for n, _ in pipeline_units(model)]
    bounds = [0, *[names.index(s) for s in splits], len(names)]
    total = sum(costs) or 1.0
    print(f"pipeline_splits: [{', '.join(splits)}]")
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        print(f"  IPU{k}: {names[a]} .. {names[b - 1]}  {args.cost} share {sum(costs[a:b]) / total:.1%}")


if __name__ == "__main__":
    main()
