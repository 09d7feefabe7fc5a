"""The one split algorithm (core/splitter.py) is exact (checked against brute force, additive and stage-dependent
costs) and plan_pipeline names valid block boundaries."""

import itertools
import random

import pytest
import torch
from torch import nn

from ipu_norm.core.splitter import (
    auto_split,
    max_stage_cost,
    pipeline_units,
    plan_pipeline,
    split_stages,
    unit_flops,
)


def brute_force(costs: list[float], num_stages: int) -> float:
    n = len(costs)
    best = float("inf")
    for splits in itertools.combinations(range(1, n), num_stages - 1):
        best = min(best, max_stage_cost(costs, list(splits)))
    return best


@pytest.mark.parametrize("seed", range(60))
def test_auto_split_optimal_vs_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    s = rng.randint(1, n)
    # Mix integer and float costs, with zeros, so ties and degenerate stages are exercised.
    costs = [rng.choice([0, rng.randint(1, 9), rng.random() * 10]) for _ in range(n)]
    splits = auto_split(costs, s)
    assert len(splits) == s - 1
    assert splits == sorted(set(splits)) and all(0 < i < n for i in splits)
    assert max_stage_cost(costs, splits) == pytest.approx(brute_force(costs, s))


def test_auto_split_beats_greedy_example() -> None:
    # A greedy "fill up to the average" would put 5+1 on stage 0 and leave 1+5 ... here the optimum is 6.
    costs = [5, 1, 1, 5]
    splits = auto_split(costs, 2)
    assert max_stage_cost(costs, splits) == 6
    assert auto_split([1, 1, 1, 1], 4) == [1, 2, 3]
    assert auto_split([3.0], 1) == []


def brute_force_sumsq(costs: list[float], num_stages: int, cap: float) -> float:
    n = len(costs)
    best = float("inf")
    for splits in itertools.combinations(range(1, n), num_stages - 1):
        bounds = [0, *splits, n]
        stage = [sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        if max(stage) <= cap + 1e-9:
            best = min(best, sum(c * c for c in stage))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_auto_split_most_even_among_optimal(seed: int) -> None:
    rng = random.Random(100 + seed)
    n = rng.randint(2, 9)
    s = rng.randint(2, n)
    costs = [rng.choice([0, 1, 2, 3]) for _ in range(n)]
    splits = auto_split(costs, s)
    bounds = [0, *splits, n]
    stage = [sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    opt = brute_force(costs, s)
    assert max(stage) == opt
    assert sum(c * c for c in stage) == brute_force_sumsq(costs, s, opt)


def test_auto_split_ties() -> None:
    # Both [1] and [2] give max 2 and the same squares; the smallest split index is returned.
    assert auto_split([2, 0, 2], 2) == [1]
    # Max 2 is reachable by (0 | 1,1 | 1,1,0) too (squares 8); (0,1 | 1 | 1,1,0) and (0,1 | 1,1 | 1,0) both have
    # squares 6, and the first has the smaller split points.
    assert auto_split([0, 1, 1, 1, 1, 0], 3) == [2, 3]


def test_auto_split_errors() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        auto_split([1, 2], 3)
    with pytest.raises(ValueError, match="non-negative"):
        auto_split([1, -2], 2)
    with pytest.raises(ValueError):
        auto_split([1, 2], 0)


class TinyNet(nn.Module):
    """MODEL CONTRACT model: stem, flat blocks, head; blocks get wider so FLOPs differ per block."""

    def __init__(self, widths=(4, 4, 8, 8, 16)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks.append(nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(1, b), nn.ReLU()))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 10))
        self.default_cfg = {"train_size": 8, "test_size": 8, "num_classes": 10, "norm": "ln", "family": "tiny"}

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def test_unit_flops_match_hand_count() -> None:
    m = TinyNet()
    flops = unit_flops(m, image_size=8)
    hw = 8 * 8
    expected_stem = 2 * hw * 4 * 3 * 9
    widths = (4, 4, 8, 8, 16)
    expected_blocks = [2 * hw * b * a * 9 for a, b in zip(widths[:-1], widths[1:])]
    assert flops[0] == expected_stem
    assert flops[1:-1] == expected_blocks
    assert flops[-1] == 2 * 16 * 10
    # The real model is untouched (the count runs on a meta copy).
    assert next(m.parameters()).device.type == "cpu"


def test_plan_pipeline_flops_and_vectors() -> None:
    m = TinyNet()
    names = [n for n, _ in pipeline_units(m)]
    splits = plan_pipeline(m, 2, image_size=8)
    assert len(splits) == 1 and splits[0] in names[1:]
    # Independent check: the chosen split minimises the max stage FLOPs among all single splits.
    costs = unit_flops(m, image_size=8)
    best = min(max(sum(costs[:i]), sum(costs[i:])) for i in range(1, len(costs)))
    i = names.index(splits[0])
    assert max(sum(costs[:i]), sum(costs[i:])) == best
    # A per-block vector (stem/head cost 0) and a callable are accepted.
    assert plan_pipeline(m, 2, cost=[1, 1, 1, 5]) == ["blocks.3"]
    assert plan_pipeline(m, 3, cost=lambda model: [0, 1, 1, 1, 1, 0]) == ["blocks.1", "blocks.2"]
    assert plan_pipeline(m, 1) == []
    with pytest.raises(ValueError, match="expected 6"):
        plan_pipeline(m, 2, cost=[1, 2, 3])


def test_plan_pipeline_flops_runs_on_meta_and_rejects_unknown_cost() -> None:
    with torch.device("meta"):
        m = TinyNet()
    assert len(plan_pipeline(m, 2, image_size=8)) == 1
    with pytest.raises(ValueError, match="unknown cost 'memory'"):
        plan_pipeline(m, 2, cost="memory")


@pytest.mark.parametrize("seed", range(6))
def test_split_stages_with_stage_dependent_cost_vs_brute_force(seed: int) -> None:
    """Stage k's cost depends on k (as the IPU memory estimate's in-flight copies do): the answer is still the
    exhaustive minimax, and the most even (sum of squares) among the optimal splits."""
    rng = random.Random(100 + seed)
    n, s = rng.randint(3, 8), rng.randint(1, 3)
    w = [rng.randint(0, 9) for _ in range(n)]
    weight = [s - k for k in range(s)]  # earlier stages hold more, like 2(S-k) stash copies

    def cost(k: int, i: int, j: int) -> float:
        return weight[k] * sum(w[i:j]) + 1

    def stage_costs(cuts: tuple[int, ...]) -> list[float]:
        b = [0, *cuts, n]
        return [cost(k, b[k], b[k + 1]) for k in range(s)]

    got = split_stages(n, s, cost)
    every = [stage_costs(c) for c in itertools.combinations(range(1, n), s - 1)]
    best = min(max(c) for c in every)
    assert max(stage_costs(tuple(got))) == best
    assert sum(x * x for x in stage_costs(tuple(got))) == min(sum(x * x for x in c) for c in every if max(c) == best)


def test_cli_prints_splits(capsys: pytest.CaptureFixture) -> None:
    from ipu_norm.ipu.__main__ import main

    main(["--model", "resnet18", "--ipus", "2", "--image-size", "32"])
    out = capsys.readouterr().out
    assert out.startswith("pipeline_splits: [blocks.") and "IPU1:" in out
