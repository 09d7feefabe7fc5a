"""Compare training memory across norms and micro-batch sizes; plan what fits on IPUs.

``python -m ipu_norm.memory --models efficientnet_b0 resnet50 --micro-batch 1 2 4 8 16 32 [--resolution 224]
[--out DIR]`` prints, per architecture:

1. CPU training memory (fp32) per norm and micro-batch: weights, gradients and optimizer state measured after
   one real optimizer step; activations measured with saved-tensor hooks at two micro-batch sizes, fitted as
   a + b * mb per block and checked against a third size (the other sizes are extrapolated - the table says
   which); the measured peak of a real step (live-storage tracker on CPU) without and with recomputation.
2. IPU plan (Mk2, 900 MB): the largest micro-batch that fits on 1, 2, 4, 8 IPUs (pipeline stages balanced by
   memory), without and with recomputation, and which requested sizes fit.
3. The headline: BN at micro-batch 32 against GN+PN at micro-batch 2 with gradient accumulation 16 (same
   global batch 32).

It writes ``memory_compare.md`` (the same tables) and ``memory_compare.png`` (the headline, per-IPU fit, memory vs
micro-batch; see ``figure``)
to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ipu_norm.memory.estimate import (
    IPU_COUNTS,
    MemorySpec,
    assumptions_text,
    best_split,
    default_recompute,
    max_micro_batch,
    min_accumulation,
    plan_fits,
    plan_for_profile,
    read_popvision,
)
from ipu_norm.memory.measure import (
    ActivationProfile,
    fit_activation_scaling,
    measure_peak,
    tensor_bytes,
)

NORMS = ("bn", "gn", "gn+pn", "ln+pn", "nf")
NF_MODELS = {"resnet50": "nf_resnet50"}  # EfficientNet has no normalizer-free counterpart in this project
MB = 1e6


@dataclass(frozen=True)
class IPUScenario:
    """The IPU settings of the tables: precision, memory proportion and the `MemorySpec` (optimizer, budget)."""

    precision: str
    available_memory_proportion: float
    spec: MemorySpec

    @property
    def ipu_memory_bytes(self) -> int:
        return self.spec.ipu_memory_bytes

    def plan(self, profile: ActivationProfile, micro_batch_size: int = 1, num_stages: int = 1, recompute: str = "none",
             gradient_accumulation: int = 1) -> object:
        """The what-if `ExecutionPlan` for `profile` (``ipu_norm.memory.estimate.plan_for_profile``)."""
        return plan_for_profile(profile, micro_batch_size=micro_batch_size, precision=self.precision,
                                num_stages=num_stages, recompute=recompute,
                                available_memory_proportion=self.available_memory_proportion,
                                gradient_accumulation=gradient_accumulation)

    def estimate(self, profile: ActivationProfile, micro_batch_size: int, num_stages: int = 1,
                 recompute: str = "none", gradient_accumulation: int = 1) -> object:
        """The best-split estimate of that plan."""
        return best_split(profile, self.plan(profile, micro_batch_size, num_stages, recompute, gradient_accumulation),
                          self.spec)


def build_model(arch: str, norm: str) -> nn.Module | None:
    """The model for (arch, norm), or None where it is not defined (NF EfficientNet)."""
    from ipu_norm.models import create_model

    if norm == "nf":
        name = NF_MODELS.get(arch)
        return None if name is None else create_model(name)
    return create_model(arch, norm=norm)


@dataclass
class NormResult:
    """Everything measured and estimated for one (architecture, norm)."""

    arch: str
    norm: str
    params: int
    weight_bytes: int
    grad_bytes: int
    opt_bytes: int
    profile: ActivationProfile
    peak_mb: int
    peak: int | None
    peak_rc: int | None
    peak_step: int | None
    peak_method: str
    act_rc_bytes: int | None  # saved bytes with per-block checkpointing at peak_mb
    wall_s: float

    def act_bytes(self, mb: int) -> float:
        return self.profile.total_bytes(mb, 4)

    def train_bytes(self, mb: int) -> float:
        """fp32 training memory on CPU/GPU: weights + gradients + optimizer state + saved activations."""
        return self.weight_bytes + self.grad_bytes + self.opt_bytes + self.act_bytes(mb)


def measure_norm(
    arch: str,
    norm: str,
    resolution: int | None,
    *,
    optimizer: str,
    fit_sizes: tuple[int, int],
    verify_sizes: tuple[int, ...],
    peak_mb: int,
) -> NormResult | None:
    """Build the model and measure it (None when the combination is not defined)."""
    t0 = time.perf_counter()
    model = build_model(arch, norm)
    if model is None:
        return None
    res = resolution or int(getattr(model, "default_cfg", {}).get("train_size", 224))
    # The plain ops PopTorch traces (what the IPU tables need), with the op list for Standard recomputation.
    prof = fit_activation_scaling(model, res, fit_sizes=fit_sizes, verify_sizes=verify_sizes, plain_ops=True,
                                  record_ops=True)
    params = sum(p.numel() for p in model.parameters())
    weights = tensor_bytes(model.parameters())
    peak = peak_rc = act_rc = None
    if peak_mb > 0:
        pk = measure_peak(model, peak_mb, res, optimizer=optimizer)
        # Gradients and optimizer state are the same with recomputation: no optimizer step for that copy.
        pk_rc = measure_peak(model, peak_mb, res, optimizer=None, recompute=True)
        peak, peak_rc, act_rc = pk.peak_fwd_bwd, pk_rc.peak_fwd_bwd, pk_rc.saved_bytes
    else:  # gradients and optimizer state still come from one real step, on a small input (their size
        # does not depend on it); micro-batch 2 keeps BatchNorm's 1x1 final feature map valid in training
        pk = measure_peak(model, 2, 32, optimizer=optimizer)
    return NormResult(
        arch, norm, params, weights, pk.grad_bytes, pk.optimizer_state_bytes, prof, peak_mb, peak, peak_rc,
        pk.peak_step if peak_mb > 0 else None, pk.method, act_rc, time.perf_counter() - t0,
    )


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / MB:,.0f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_table(results: Sequence[NormResult | None], norms: Sequence[str], mbs: Sequence[int]) -> str:
    """Per norm: params, weights/grads/optimizer, activations and total training memory per micro-batch."""
    header = ["norm", "params", "weights", "grads", "optim"]
    header += [f"act@{m}" for m in mbs] + [f"total@{m}" for m in mbs]
    header += ["peak fwd+bwd", "peak rc", "act rc", "peak step", "fit err"]
    rows = []
    for norm, r in zip(norms, results):
        if r is None:
            rows.append([norm, "n/a"] + ["n/a"] * (len(header) - 2))
            continue
        measured = set(r.profile.measured_at) | set(r.profile.verified_at)
        acts = [_mb(r.act_bytes(m)) + ("" if m in measured else "*") for m in mbs]
        tots = [_mb(r.train_bytes(m)) for m in mbs]
        err = "-" if r.profile.max_rel_error is None else f"{100 * r.profile.max_rel_error:.2f}%"
        rows.append(
            [norm, f"{r.params / 1e6:.2f}M", _mb(r.weight_bytes), _mb(r.grad_bytes), _mb(r.opt_bytes)]
            + acts + tots
            + [_mb(r.peak), _mb(r.peak_rc), _mb(r.act_rc_bytes), _mb(r.peak_step), err]
        )
    return _md_table(header, rows)


def ipu_table(
    results: Sequence[NormResult | None], norms: Sequence[str], mbs: Sequence[int], base: IPUScenario,
    ipus: Sequence[int],
) -> str:
    """Per norm and IPU count: largest micro-batch that fits (without / with recompute) and the fitting sizes."""
    header = ["norm"] + [f"{n} IPU{'s' if n > 1 else ''}: max mb (rc)" for n in ipus] + [
        f"fits (of {','.join(map(str, mbs))}) on " + "/".join(map(str, ipus)) + " IPUs"
    ]
    rows = []
    for norm, r in zip(norms, results):
        if r is None:
            rows.append([norm] + ["n/a"] * (len(header) - 1))
            continue
        cells = []
        for n in ipus:
            a = max_micro_batch(r.profile, base.plan(r.profile, recompute="none"), n, base.spec)
            b = max_micro_batch(r.profile, base.plan(r.profile, recompute=default_recompute(n)), n, base.spec)
            cells.append(f"{a} ({b})")
        fits = plan_fits(r.profile, mbs, base.plan(r.profile), base.spec, ipus)
        per_n = []
        for n in ipus:
            ok = [str(f.micro_batch) + ("" if f.status == "fits" else "r") for f in fits
                  if f.num_ipus == n and f.status != "no"]
            per_n.append(",".join(ok) or "none")
        rows.append([norm] + cells + [" / ".join(per_n)])
    return _md_table(header, rows)


def smallest_fit(r: NormResult, base: IPUScenario, mb: int, accumulation: int, ipus: Sequence[int]) -> str:
    """'N IPU(s) (per-IPU max X MB)' for the fewest IPUs that fit mb, or 'none of ...'."""
    for n in ipus:
        for rc in ("none", default_recompute(n)):
            e = base.estimate(r.profile, mb, n, rc, max(accumulation, min_accumulation(n)))
            if e.fits:
                return f"{n} IPU{'s' if n > 1 else ''}{' with recompute' if rc != 'none' else ''} " \
                       f"(largest stage {_mb(e.max_total)} MB)"
    return f"does not fit on {max(ipus)} IPUs"


def headline(
    r_bn: NormResult | None, r_pn: NormResult | None, base: IPUScenario, ipus: Sequence[int],
    big: int = 32, small: int = 2,
) -> str:
    """BN at micro-batch `big` vs GN+PN at micro-batch `small` x accumulation to the same global batch."""
    if r_bn is None or r_pn is None:
        return "headline: n/a (BN or GN+PN model missing)"
    acc = big // small
    one_bn = base.estimate(r_bn.profile, big)
    one_pn = base.estimate(r_pn.profile, small, gradient_accumulation=acc)
    lines = [
        f"**{r_bn.arch}: BN at micro-batch {big} vs GN+PN at micro-batch {small} x {acc} accumulation "
        f"(global batch {big} both)**",
        f"- CPU/GPU fp32 training memory: BN@{big} {_mb(r_bn.train_bytes(big))} MB "
        f"(activations {_mb(r_bn.act_bytes(big))} MB) vs GN+PN@{small} {_mb(r_pn.train_bytes(small))} MB "
        f"(activations {_mb(r_pn.act_bytes(small))} MB): {r_bn.train_bytes(big) / r_pn.train_bytes(small):.1f}x.",
        f"- IPU ({base.precision}, {base.spec.optimizer}) single-IPU estimate: BN@{big} {_mb(one_bn.max_total)} MB vs "
        f"GN+PN@{small} {_mb(one_pn.max_total)} MB (budget {_mb(base.ipu_memory_bytes)} MB).",
        f"- fewest IPUs: BN@{big}: {smallest_fit(r_bn, base, big, 1, ipus)}; "
        f"GN+PN@{small}: {smallest_fit(r_pn, base, small, acc, ipus)}.",
        f"- BN's statistics are computed over the micro-batch, so BN needs the large micro-batch on the device; "
        f"GN+PN is batch-independent, so micro-batch {small} x {acc} accumulation gives the same update "
        f"(up to the sum order) in a fraction of the activation memory.",
    ]
    return "\n".join(lines)


def _stage_memory(r: NormResult, base: IPUScenario, mb: int, accumulation: int, n: int, recompute: str) -> float:
    """Largest pipeline stage (bytes) of ``r`` at micro-batch ``mb`` on ``n`` IPUs (as :func:`smallest_fit` plans)."""
    return base.estimate(r.profile, mb, n, recompute, max(accumulation, min_accumulation(n))).max_total


def figure(results: dict[str, list[NormResult | None]], norms: Sequence[str], mbs: Sequence[int], base: IPUScenario,
           ipus: Sequence[int] = IPU_COUNTS, big: int = 32, small: int = 2) -> Any:
    """The memory picture, one row per architecture (the headline at a glance):

    1. the same global batch ``big``: BN at micro-batch ``big`` against the batch-independent norms (GN+PN, LN+PN,
       NF) at micro-batch ``small`` x ``big/small`` accumulation; CPU/GPU fp32 memory and the 1-IPU estimate, each
       bar labelled with its share of BN's;
    2. per-IPU fit: the largest pipeline stage on 1..8 IPUs against the 900 MB of one IPU (with recompute dashed);
    3. memory vs micro-batch for every norm: per micro-batch they cost the same - the difference is the
       micro-batch each one needs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = big // small
    budget = base.ipu_memory_bytes / MB
    colors = {"bn": "C3", "gn": "C1", "gn+pn": "C0", "ln+pn": "C2", "nf": "C4"}
    archs = list(results)
    fig, axes = plt.subplots(len(archs), 3, figsize=(20, 5.6 * len(archs)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1, 1]})
    for row, arch in enumerate(archs):
        by_norm = {n: r for n, r in zip(norms, results[arch]) if r is not None}
        ax_bar, ax_fit, ax_mb = axes[row]
        # 1. the headline: same global batch, BN at its micro-batch vs the batch-independent norms at `small`
        cases = [("bn", big, 1)] + [(n, small, acc) for n in ("gn+pn", "ln+pn", "nf") if n in by_norm]
        cases = [c for c in cases if c[0] in by_norm]
        width = 0.8 / max(len(cases), 1)
        group_names = ["CPU/GPU training, fp32\n(measured)", f"one IPU, {base.precision}\n(estimate)"]
        for i, (norm, mb, a) in enumerate(cases):
            r = by_norm[norm]
            values = [r.train_bytes(mb) / MB, _stage_memory(r, base, mb, a, 1, "none") / MB]
            label = f"{norm.upper()} at micro-batch {mb}"
            label += f" x {a} accumulation" if a > 1 else ""
            xs = [g + (i - (len(cases) - 1) / 2) * width for g in range(2)]
            bars = ax_bar.bar(xs, values, width * 0.92, color=colors.get(norm, "grey"), label=label)
            bn_values = [by_norm["bn"].train_bytes(big) / MB,
                         _stage_memory(by_norm["bn"], base, big, 1, 1, "none") / MB] if "bn" in by_norm else None
            for b, v, g in zip(bars, values, range(2)):
                text = f"{v:,.0f} MB"
                if bn_values is not None and norm != "bn":
                    text += f"\n1/{bn_values[g] / v:.1f} of BN"
                ax_bar.annotate(text, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7,
                                xytext=(0, 2), textcoords="offset points")
        ax_bar.hlines(budget, 0.55, 1.45, colors="k", linestyles="--", lw=1.2, label=f"one IPU: {budget:.0f} MB")
        ax_bar.set_xticks([0, 1], group_names)
        ax_bar.set_ylabel("memory, MB")
        ax_bar.set_ylim(0, ax_bar.get_ylim()[1] * 1.15)
        ax_bar.set_title(f"{arch}: global batch {big} - BN at micro-batch {big} vs batch-independent norms at "
                         f"{small} x {acc}", fontsize=10)
        ax_bar.legend(fontsize=8, loc="upper right")
        # 2. per-IPU fit
        for norm, mb, a in cases:
            r = by_norm[norm]
            for rc, ls in (("none", "-"), ("recompute", "--")):  # recompute: what PopTorch runs (Standard/Pipeline)
                ys = [_stage_memory(r, base, mb, a, n, rc if rc == "none" else default_recompute(n)) / MB
                      for n in ipus]
                name = f"{norm} @{mb}" + (f"x{a}" if a > 1 else "") + (" + recompute" if rc != "none" else "")
                ax_fit.plot(list(ipus), ys, ls, marker="o", color=colors.get(norm, "grey"), label=name,
                            alpha=1.0 if rc == "none" else 0.6)
        ax_fit.axhline(budget, color="k", ls="--", lw=1.2)
        ax_fit.annotate(f"fits below: {budget:.0f} MB per IPU", (ipus[0], budget), xytext=(2, 3),
                        textcoords="offset points", fontsize=8)
        ax_fit.set_xscale("log", base=2)
        ax_fit.set_xticks(list(ipus), [str(n) for n in ipus])
        ax_fit.set_yscale("log")
        ax_fit.set_xlabel("IPUs per replica (pipeline stages)")
        ax_fit.set_ylabel("largest stage, MB (estimate)")
        ax_fit.set_title(f"{arch}: per-IPU fit ({base.precision}, {base.spec.optimizer})", fontsize=10)
        ax_fit.grid(True, which="both", alpha=0.3)
        ax_fit.legend(fontsize=7, ncol=2)
        # 3. memory vs micro-batch: the same cost per sample, a different micro-batch
        for norm, r in by_norm.items():
            ax_mb.plot(mbs, [r.train_bytes(m) / MB for m in mbs], color=colors.get(norm, "grey"), lw=1.2,
                       alpha=0.8, label=norm)
        if "bn" in by_norm and "gn+pn" in by_norm:
            p_bn = (big, by_norm["bn"].train_bytes(big) / MB)
            p_pn = (small, by_norm["gn+pn"].train_bytes(small) / MB)
            ax_mb.plot(*p_bn, "o", ms=11, mfc="none", mew=2, color=colors["bn"])
            ax_mb.plot(*p_pn, "o", ms=11, mfc="none", mew=2, color=colors["gn+pn"])
            ax_mb.annotate("", p_pn, p_bn, arrowprops={"arrowstyle": "->", "lw": 1.5})
            ax_mb.annotate(f"BN needs micro-batch {big}: {p_bn[1]:,.0f} MB\nGN+PN at {small} x {acc}: "
                           f"{p_pn[1]:,.0f} MB ({p_bn[1] / p_pn[1]:.1f}x less)",
                           (0.03, 0.97), xycoords="axes fraction", va="top", fontsize=8)
        ax_mb.set_xscale("log", base=2)
        ax_mb.set_yscale("log")
        ax_mb.set_xticks(list(mbs), [str(m) for m in mbs])
        ax_mb.set_xlabel("micro-batch")
        ax_mb.set_ylabel("CPU/GPU fp32 training memory, MB")
        ax_mb.set_title(f"{arch}: per micro-batch all norms cost about the same", fontsize=10)
        ax_mb.grid(True, which="both", alpha=0.3)
        ax_mb.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot(results: dict[str, list[NormResult | None]], norms: Sequence[str], mbs: Sequence[int], base: IPUScenario,
         path: str, ipus: Sequence[int] = IPU_COUNTS) -> None:
    """Write :func:`figure` to ``path``."""
    fig = figure(results, norms, mbs, base, ipus)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ipu_norm.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["efficientnet_b0", "resnet50"])
    p.add_argument("--micro-batch", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--norms", nargs="+", default=list(NORMS), help="bn gn gn+pn ln+pn nf")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: model default_cfg train_size)")
    p.add_argument("--optimizer", default="sgd_momentum",
                   help="sgd | sgd_momentum | nesterov | adam | adamw | rmsprop | rmsprop_momentum | lamb")
    p.add_argument("--precision", default="16.32", choices=["32.32", "16.32", "16.16"], help="IPU estimate precision")
    p.add_argument("--available-memory-proportion", type=float, default=0.6)
    p.add_argument("--overhead-fraction", type=float, default=0.15,
                   help="fraction of IPU memory reserved for code/exchange/control (not modelled per op)")
    p.add_argument("--ipus", nargs="+", type=int, default=list(IPU_COUNTS))
    p.add_argument("--fit-sizes", nargs=2, type=int, default=[1, 2], help="micro-batches measured for the fit")
    p.add_argument("--verify-sizes", nargs="*", type=int, default=[3], help="micro-batches measured to check it")
    p.add_argument("--peak-micro-batch", type=int, default=1,
                   help="micro-batch of the measured real step (peak, with and without recompute); 0 = skip")
    p.add_argument("--peak-norms", nargs="*", default=["bn", "gn+pn"],
                   help="norms whose real step is measured at full resolution (the others get weights, gradients "
                        "and optimizer state from a step at 32 px, which does not change them); 'all' = every norm")
    p.add_argument("--popvision", default=None, help="PopVision report directory (needs libpva from the Poplar SDK)")
    p.add_argument("--out", default="docs", help="directory for memory_compare.md / memory_compare.png")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see module docstring)."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    mbs = sorted(set(args.micro_batch))
    norms = [n.lower() for n in args.norms]
    base = IPUScenario(args.precision, args.available_memory_proportion,
                       MemorySpec(optimizer=args.optimizer, overhead_fraction=args.overhead_fraction))
    results: dict[str, list[NormResult | None]] = {}
    for arch in args.models:
        results[arch] = []
        for norm in norms:
            peak_here = "all" in args.peak_norms or norm in args.peak_norms
            r = measure_norm(
                arch, norm, args.resolution, optimizer=args.optimizer, fit_sizes=tuple(args.fit_sizes),
                verify_sizes=tuple(args.verify_sizes), peak_mb=args.peak_micro_batch if peak_here else 0,
            )
            results[arch].append(r)
            took = "n/a" if r is None else f"{r.wall_s:.1f}s"
            print(f"[measured {arch} {norm}: {took}]", file=sys.stderr, flush=True)

    res_txt = f"{args.resolution} px" if args.resolution else "each model's default train_size"
    sections = [
        "# Training memory by norm and micro-batch",
        f"Command: `python -m ipu_norm.memory {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"Resolution {res_txt}; optimizer {args.optimizer}; MB = 1e6 bytes.",
        "CPU table (fp32, measured on CPU): weights, grads and optimizer state after one real optimizer.step; "
        f"activations = saved-for-backward bytes (hooks, dedup by storage), measured at micro-batch "
        f"{' and '.join(map(str, args.fit_sizes))}, fitted a + b*mb per block, checked at "
        f"{','.join(map(str, args.verify_sizes)) or '-'} (fit err = worst relative error there); "
        "'*' = extrapolated from the fit, not measured. total = weights + grads + optim + activations. "
        f"Measured on one real step at micro-batch {args.peak_micro_batch} for {' '.join(args.peak_norms)} "
        "('-' elsewhere, to keep the run short) (live-storage tracker on CPU, "
        "cuda.max_memory_allocated on GPU): peak fwd+bwd = live bytes at the worst point of forward + backward; "
        "peak rc = the same with torch.utils.checkpoint per block; act rc = saved-for-backward bytes with "
        "checkpointing (block inputs only); peak step = worst point including the first optimizer.step.",
        "IPU table: 'max mb (rc)' = largest micro-batch that fits without (with) recompute; in the fits column "
        "'r' marks sizes that fit only with recompute.",
    ]
    for arch, rs in results.items():
        sections.append(f"## {arch}")
        sections.append("### CPU/GPU training memory, MB (fp32)")
        sections.append(cpu_table(rs, norms, mbs))
        sections.append(f"### IPU Mk2 ({args.precision}, {args.optimizer} on chip, AMP "
                        f"{args.available_memory_proportion}) - estimate")
        sections.append(ipu_table(rs, norms, mbs, base, args.ipus))
        by_norm = dict(zip(norms, rs))
        sections.append(headline(by_norm.get("bn"), by_norm.get("gn+pn"), base, args.ipus))
    sections.append("### Assumptions of the IPU estimate")
    first = next((r for rs in results.values() for r in rs if r is not None), None)
    if first is not None:
        text_lines = assumptions_text(base.plan(first.profile), base.spec).splitlines()
        sections.append("\n".join(f"- {line}" for line in text_lines))
    if args.popvision:
        pv = read_popvision(args.popvision)
        if pv is None:
            sections.append(
                f"PopVision: no report read from {args.popvision} (libpva not importable or no profile.pop)."
            )
        else:
            per = ", ".join(f"IPU{i} {_mb(b)} MB" for i, b in enumerate(pv["bytes_per_ipu"]))
            sections.append(f"PopVision actual ({pv['report']}): {per}")
    elapsed = time.perf_counter() - t_start
    sections.append(f"Wall time: {elapsed:.0f} s on {torch.get_num_threads()} CPU thread(s).")
    text = "\n\n".join(sections) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    md_path = os.path.join(args.out, "memory_compare.md")
    png_path = os.path.join(args.out, "memory_compare.png")
    with open(md_path, "w") as f:
        f.write(text)
    plot(results, norms, mbs, base, png_path, args.ipus)
    print(f"wrote {md_path} and {png_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
