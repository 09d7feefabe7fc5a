"""`python -m ipu_norm.models --list [--norm ln+pn] [--filter 'efficientnet*']`: the model table.

For every registered model (built on the meta device, so it is fast and allocates nothing): name, family,
norm, parameters (millions), GMACs (multiply-accumulates, what the papers call "FLOPs", see flops.py) at the
test resolution and train/test resolutions from default_cfg.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence

import torch

from ipu_norm.models.flops import count_flops, count_params
from ipu_norm.models.registry import _MODELS, list_models, model_family


def _accepts_norm(name: str) -> bool:
    # Normalizer-free builders have no `norm` argument; they are listed with their own norm ('nf').
    params = inspect.signature(_MODELS[name]).parameters
    return "norm" in params


def model_rows(pattern: str = "*", norm: str | None = None, flops: bool = True) -> list[dict]:
    """One dict per registered model matching `pattern` (built on the meta device)."""
    rows = []
    for name in list_models(pattern):
        kwargs = {}
        if norm is not None:
            if not _accepts_norm(name):
                continue
            kwargs["norm"] = norm
        with torch.device("meta"):
            model = _MODELS[name](**kwargs)
        cfg = getattr(model, "default_cfg", {})
        test_size = cfg.get("test_size", 224)
        row = {
            "name": name,
            "family": cfg.get("family", model_family(name)),
            "norm": cfg.get("norm", norm or "?"),
            "params_m": count_params(model) / 1e6,
            "gmacs": count_flops(model, test_size).gflops if flops else float("nan"),
            "train_size": cfg.get("train_size", "?"),
            "test_size": test_size,
        }
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of model_rows()."""
    head = "| name | family | norm | params (M) | GMACs (test res) | train/test res |"
    lines = [head, "|---|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['family']} | {r['norm']} | {r['params_m']:.2f} | {r['gmacs']:.2f} "
            f"| {r['train_size']}/{r['test_size']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m ipu_norm.models", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the table of registered models (default)")
    parser.add_argument("--norm", default=None,
                        help="build with this norm (bn, gn, ln, gn+pn, ln+pn); models without a norm are skipped")
    parser.add_argument("--filter", default="*", help="glob on model names, e.g. 'efficientnet*'")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    args = parser.parse_args(argv)
    rows = model_rows(args.filter, args.norm, flops=not args.no_flops)
    if not rows:
        print(f"no registered model matches {args.filter!r}" + (f" with norm {args.norm!r}" if args.norm else ""))
        return 1
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
