"""Pipeline splitting at block boundaries: the project's one split algorithm.

`split_stages(n, num_stages, stage_cost)` partitions n units into contiguous, non-empty stages so that the most
expensive stage is as cheap as possible (the pipeline's throughput is set by its slowest stage, and its memory fit by
its fullest IPU); among the optimal partitions it returns the most even one. It is an exact dynamic programme, not a
greedy fill, and the cost of a stage may depend on the stage's position (``stage_cost(k, i, j)`` for units i..j-1 on
stage k): the IPU memory estimate uses that, since stage k holds more micro-batches in flight than stage k+1.
`auto_split(costs, num_stages)` is the additive case (a stage costs the sum of its units' costs, e.g. FLOPs).

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


StageCost = Callable[[int, int, int], float]


def split_stages(n: int, num_stages: int, stage_cost: StageCost) -> list[int]:
    """Split indices of n units into `num_stages` contiguous non-empty stages minimising the most expensive stage.

    Args:
        n: number of units (in execution order).
        num_stages: 1 <= num_stages <= n.
        stage_cost: ``stage_cost(k, i, j)`` = cost of units i..j-1 placed on stage k (0-based); non-negative.

    Returns:
        ``num_stages - 1`` increasing indices; stage ``k + 1`` starts at unit ``result[k]``. Among partitions with the
        optimal maximum, the one with the smallest sum of squared stage costs (then the lexicographically smallest
        split points) is returned, so the answer is deterministic and the non-critical stages are as even as possible.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages > n:
        raise ValueError(f"cannot split {n} units into {num_stages} non-empty stages")
    memo: dict[tuple[int, int, int], float] = {}

    def cost(k: int, i: int, j: int) -> float:
        key = (k, i, j)
        if key not in memo:
            memo[key] = float(stage_cost(k, i, j))
        return memo[key]

    inf = float("inf")
    # best[r][j]: minimal max-stage cost to put units j..n-1 on the last r stages (stage index num_stages - r ..).
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    best[0][n] = 0.0
    for r in range(1, num_stages + 1):
        k = num_stages - r
        for j in range(n - r, -1, -1):
            # Stage k covers units j..e-1; the remaining r-1 stages need >= r-1 units.
            best[r][j] = min(max(cost(k, j, e), best[r - 1][e]) for e in range(j + 1, n - (r - 1) + 1))
    cap = best[num_stages][0]
    # Tolerance only guards float round-off: `cap` itself was computed from these same stage costs.
    limit = cap + 1e-12 * max(1.0, abs(cap))
    sq = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    sq[0][n] = 0.0
    for r in range(1, num_stages + 1):
        k = num_stages - r
        for j in range(n - r, -1, -1):
            for e in range(j + 1, n - (r - 1) + 1):
                c = cost(k, j, e)
                if c <= limit and sq[r - 1][e] < inf:
                    sq[r][j] = min(sq[r][j], c * c + sq[r - 1][e])
    splits: list[int] = []
    j = 0
    for r in range(num_stages, 1, -1):
        k = num_stages - r
        goal = sq[r][j]
        for e in range(j + 1, n - (r - 1) + 1):
            c = cost(k, j, e)
            if c <= limit and sq[r - 1][e] < inf and c * c + sq[r - 1][e] <= goal + 1e-12 * max(1.0, goal):
                splits.append(e)
                j = e
                break
    return splits


def auto_split(costs: Sequence[float], num_stages: int) -> list[int]:
    """Split indices minimising the maximum stage cost when a stage costs the sum of its units' `costs`.

    Args:
        costs: non-negative cost of each unit, in execution order.
        num_stages: number of contiguous, non-empty stages (1 <= num_stages <= len(costs)).

    Returns:
        As `split_stages`: ``num_stages - 1`` increasing indices, the most even optimal partition.
    """
    if any(c < 0 for c in costs):
        raise ValueError("costs must be non-negative")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    return split_stages(len(costs), num_stages, lambda _k, i, j: prefix[j] - prefix[i])


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

    Uses ``ipu_norm.compat.flop_counter_mode`` (convolutions and matmuls, 2 FLOPs per MAC); element-wise ops
    are not counted, which is the usual convention for CNN FLOP tables.
    """
    from ipu_norm.compat import flop_counter_mode

    meta = _meta_copy(model)
    was_training = meta.training
    meta.eval()
    x = _example_input(meta, image_size, 1, torch.device("meta"))
    out: list[float] = []
    with torch.no_grad():
        for _, unit in pipeline_units(meta):
            counter = flop_counter_mode()
            with counter:
                x = unit(x)
            out.append(float(counter.get_total_flops()))
    meta.train(was_training)
    return out


def plan_pipeline(
    model: nn.Module,
    num_ipus: int,
    cost: str | Sequence[float] | CostFn = "flops",
    *,
    image_size: int | None = None,
) -> list[str]:
    """Balanced ``pipeline_splits`` for `model` over `num_ipus` stages.

    Args:
        model: a MODEL CONTRACT model (real or on the meta device).
        num_ipus: number of pipeline stages (one per IPU).
        cost: 'flops' (forward FLOPs per unit), a vector with one cost per unit (stem, blocks..., head) or per block
            (then stem/head cost 0 and are kept with their neighbours' stages), or a callable ``model ->
            list[float]`` returning either form. Memory-balanced splits (stage-dependent in-flight micro-batches
            included) come from ``ipu_norm.memory.estimate.memory_balanced_splits``.
        image_size: input side for the FLOP count (default: ``model.default_cfg['train_size']``).

    Returns:
        Split names such as ``['blocks.4', 'blocks.11']`` (empty for one IPU).
    """
    units = pipeline_units(model)
    if num_ipus <= 1:
        return []
    if isinstance(cost, str):
        if cost != "flops":
            raise ValueError(f"unknown cost {cost!r}; use 'flops', a list of floats or a callable")
        costs = unit_flops(model, image_size)
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
