"""Micro-benchmarks behind the overhead figures: what one AGC call and one Proxy Norm layer cost.

    python -m ipu_norm.bench.micro agc [--model nfnet_f0] [--reps 5]
    python -m ipu_norm.bench.micro pn [--batch 8] [--channels 256] [--size 24] [--reps 20]

`agc`: the clip call alone on a model's real parameter shapes with random gradients, two ways, timed
interleaved: ipu_norm.optim.agc.adaptive_clip_grad_ (the library: on CPU per-tensor row norms of reshaped
views, then a multiply of the clipped units) and timm.utils.adaptive_clip_grad (one norm + where per
parameter). Their results are checked equal before timing. The random gradients make every unit clip: the
worst case for the multiply (in training few units clip, see README Results).

`pn`: forward+backward of one norm+activation layer at an activation shape, GN vs GN+PN (the library's
GroupNormAct), and the two parts of PN's extra cost: the proxy statistics (C x 200 values, independent of
batch and image size) and the extra per-channel affine over the full tensor.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def _median_ms(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time (ms) of each callable, timed round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_agc(model_name: str = "nfnet_f0", reps: int = 5, clip_factor: float = 0.01) -> dict[str, float]:
    """Time the three AGC implementations on `model_name`'s parameters (classifier excluded)."""
    from timm.utils import adaptive_clip_grad  # noqa: PLC0415

    from ipu_norm.models import create_model  # noqa: PLC0415
    from ipu_norm.optim.agc import adaptive_clip_grad_, agc_parameters  # noqa: PLC0415

    torch.manual_seed(0)
    model = create_model(model_name)
    params = agc_parameters(model)
    grads0 = [torch.randn_like(p) * 1e-2 for p in params]

    def with_fresh_grads(fn: Callable[[list[nn.Parameter]], None]) -> Callable[[], None]:
        def call() -> None:
            for p, g in zip(params, grads0):
                p.grad = g.clone()  # not timed separately: same copy for both, subtracted below
            fn(params)

        return call

    impls = {
        "ipu_norm adaptive_clip_grad_": lambda ps: adaptive_clip_grad_(ps, clip_factor),
        "timm adaptive_clip_grad": lambda ps: adaptive_clip_grad(ps, clip_factor),
    }
    results = []
    for fn in impls.values():  # correctness first: both clip identically
        with_fresh_grads(fn)()
        results.append([p.grad.clone() for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)
    del results
    fns = {k: with_fresh_grads(fn) for k, fn in impls.items()}
    fns["(gradient reset copy only)"] = with_fresh_grads(lambda ps: None)
    ms = _median_ms(fns, reps)
    base = ms.pop("(gradient reset copy only)")
    n = sum(p.numel() for p in params)
    print(f"AGC on {model_name}: {len(params)} tensors, {n / 1e6:.1f}M parameters (classifier excluded); "
          f"median of {reps}, gradient-reset copy ({base:.1f} ms) subtracted")
    out = {}
    for k, v in ms.items():
        out[k] = v - base
        print(f"  {k:32s} {v - base:8.1f} ms")
    return out


def bench_pn(batch: int = 8, channels: int = 256, size: int = 24, reps: int = 20, act: str = "relu") -> dict:
    """Forward+backward of one GN vs GN+PN layer, and the proxy-statistics part of PN alone."""
    from ipu_norm.layers.norm_act import GroupNormAct  # noqa: PLC0415

    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    gn = GroupNormAct(channels, act=act)
    pn = GroupNormAct(channels, act=act, proxy=True)
    gy = torch.randn_like(x)

    def fb(layer: nn.Module) -> Callable[[], None]:
        def call() -> None:
            layer(x).backward(gy)

        return call

    def stats_only() -> None:
        scale, shift = pn.proxy_affine()
        (scale.sum() + shift.sum()).backward()

    def extra_affine() -> None:
        y = torch.relu(x)
        s = torch.ones(1, channels, 1, 1, requires_grad=True)
        torch.addcmul(s, y, s).backward(gy)

    fns = {"gn": fb(gn), "gn+pn": fb(pn), "proxy stats (fwd+bwd)": stats_only,
           "relu + per-channel affine (fwd+bwd)": extra_affine}
    ms = _median_ms(fns, reps, warmup=2)
    print(f"one GroupNormAct({channels}, act={act}) on {batch}x{channels}x{size}x{size}, fwd+bwd, median of {reps}:")
    for k, v in ms.items():
        print(f"  {k:38s} {v:8.3f} ms")
    print(f"  PN overhead on this layer: {100 * (ms['gn+pn'] / ms['gn'] - 1):+.1f}%")
    return ms


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (see module docstring)."""
    p = argparse.ArgumentParser(prog="python -m ipu_norm.bench.micro", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("agc")
    a.add_argument("--model", default="nfnet_f0")
    a.add_argument("--reps", type=int, default=5)
    b = sub.add_parser("pn")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--channels", type=int, default=256)
    b.add_argument("--size", type=int, default=24)
    b.add_argument("--act", default="relu")
    b.add_argument("--reps", type=int, default=20)
    for sp in (a, b):
        sp.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "agc":
        bench_agc(args.model, args.reps)
    else:
        bench_pn(args.batch, args.channels, args.size, args.reps, args.act)


if __name__ == "__main__":
    main()
