"""Focused A/B of Adaptive Gradient Clipping: backward + clip of one model with vs without backward-hook norms.

    python -m ipu_norm.bench.agc_ab --threads 1 --rounds 20

A = `AGC.clip_` computing every unit-wise norm itself after backward (today's `adaptive_clip_grad_`);
B = the same AGC with `attach()`ed hooks that take the norms during backward (`prefetch_norms`).
One model, one batch; the variants alternate (A B, B A, ...) and each round ends with an untimed SGD step,
so that weights change every step as in training (B's weight norms are then recomputed in every backward,
as they would be). Forward is untimed (identical in both). Reported: medians of backward, clip and
backward + clip per variant, and the median of the per-round paired differences B - A (pairs are adjacent in
time, so a shared machine's slow drift cancels). Before timing, a few untimed check rounds assert that B's
clipped gradients are bitwise those of `adaptive_clip_grad_` on the same gradients.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

from ipu_norm.optim.agc import AGC, adaptive_clip_grad_


def _check_bitwise(model: nn.Module, agc: AGC, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One backward with hooks, clip, and compare with adaptive_clip_grad_ on copies of the unclipped grads."""
    agc.attach()
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    aliases = []
    for p in agc.params:
        q = p.detach().requires_grad_(p.requires_grad)  # shares the weight's storage, no hooks
        if p.grad is not None:
            q.grad = p.grad.clone()
        aliases.append(q)
    agc.clip_()
    n_clip_time = sum(p.grad is not None for p in agc.params) - agc.num_hooked
    if agc.last_recomputed != (n_clip_time, n_clip_time):
        raise AssertionError(f"hooks did not provide their norms: recomputed {agc.last_recomputed}, "
                             f"expected {n_clip_time} of each (tensors without hooks)")
    adaptive_clip_grad_(aliases, agc.clip_factor, agc.eps)
    for p, q in zip(agc.params, aliases):
        if (p.grad is None) != (q.grad is None) or (p.grad is not None and not torch.equal(p.grad, q.grad)):
            raise AssertionError("clipped gradients with hook norms differ from adaptive_clip_grad_")


def run_ab(model: nn.Module, batch: int, resolution: int, num_classes: int, rounds: int, warmup: int,
           clip_factor: float = 0.01, checks: int = 2, log=print) -> dict[str, Any]:  # noqa: ANN001
    """Time backward and clip of `model` with (B) and without (A) hook norms; see the module docstring."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    agc = AGC(model, clip_factor=clip_factor)
    for _ in range(checks):
        _check_bitwise(model, agc, loss_fn, x, y)
        opt.step()
    log(f"  bitwise check: {checks} rounds, hook-norm clip == adaptive_clip_grad_")
    times: dict[str, dict[str, list[float]]] = {v: {"bwd": [], "clip": [], "total": []} for v in "AB"}

    def one(variant: str) -> tuple[float, float]:
        if variant == "B":
            agc.attach()
        else:
            agc.detach()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        t0 = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        agc.clip_()
        t2 = time.perf_counter()
        opt.step()
        return t1 - t0, t2 - t1

    for r in range(warmup + rounds):
        for v in ("AB" if r % 2 == 0 else "BA"):
            bwd, clip = one(v)
            if r >= warmup:
                t = times[v]
                t["bwd"].append(bwd)
                t["clip"].append(clip)
                t["total"].append(bwd + clip)
    agc.detach()
    med = {v: {k: 1e3 * statistics.median(vals) for k, vals in t.items()} for v, t in times.items()}
    paired = {k: 1e3 * statistics.median(b - a for a, b in zip(times["A"][k], times["B"][k]))
              for k in ("bwd", "clip", "total")}
    return {"median_ms": med, "paired_diff_ms": paired, "rounds": rounds,
            "raw_ms": {v: {k: [1e3 * s for s in vals] for k, vals in t.items()} for v, t in times.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m ipu_norm.bench.agc_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="nfnet_f0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=96)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=1000)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ipu_norm.models import create_model  # noqa: PLC0415

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.num_classes, drop_rate=0.0, drop_path_rate=0.0)
    res = run_ab(model, args.batch, args.resolution, args.num_classes, args.rounds, args.warmup)
    m, d = res["median_ms"], res["paired_diff_ms"]
    print(f"{args.model} batch {args.batch} {args.resolution}px, {args.threads} thread(s), {args.rounds} rounds, "
          "medians in ms")
    print("| variant | backward | clip | backward + clip |\n|---|---:|---:|---:|")
    for v, label in (("A", "A: norms at clip time"), ("B", "B: norms in backward hooks")):
        print(f"| {label} | {m[v]['bwd']:.1f} | {m[v]['clip']:.1f} | {m[v]['total']:.1f} |")
    print(f"| paired median B - A | {d['bwd']:+.1f} | {d['clip']:+.1f} | {d['total']:+.1f} |")
    return res


if __name__ == "__main__":
    main()
