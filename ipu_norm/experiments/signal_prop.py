"""Signal propagation at initialisation: per residual block, how the residual stream and branches scale.

    python -m ipu_norm.experiments.signal_prop [--arch resnet50] [--batch 16] [--resolution 64] [--out DIR]

On N(0, 1) inputs, for ResNet-`arch` with each norm ('bn', 'gn', 'ln', 'gn+pn', 'ln+pn') and the
normalizer-free counterpart (NF-ResNet-50 for resnet50), every residual block reports:

- stream channel squared mean: mean over channels c of mu_c^2, mu_c the mean of channel c over (N, H, W);
- stream channel variance: mean over channels of the variance of channel c over (N, H, W);
- branch variance: the same average channel variance of what the residual branch adds to the shortcut.

For the (post-activation) ResNets the residual stream is measured as branch + shortcut *before* the
block's final ReLU (after it every channel has a positive mean by construction, whatever the norm); for
the pre-activation NF networks it is the block output. BN runs in training mode (batch statistics), as it
would in the first training step.

NF networks start with a zero residual branch (NF-ResNet: zero-initialised gain of the last conv; NFNet:
skip gain 0), which would hide the variance law Var(h_{i+1}) = Var(h_i) + alpha^2. By default those gains
are set to 1 for the measurement (`--nf-branch-init one`); `--nf-branch-init default` keeps the
library's init (the branch variance is then 0).

Writes signal_prop.png (log y), signal_prop.md (table) and signal_prop.json to --out.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

NORMS = ("bn", "gn", "ln", "gn+pn", "ln+pn")
NF_DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}


@dataclass
class BlockStats:
    """Statistics of one residual block (see module docstring)."""

    block: int
    stream_sq_mean: float
    stream_var: float
    branch_var: float
    branch_sq_mean: float
    transition: bool
    # Second moments (var + squared mean averaged over channels) of the block input and of the shortcut.
    input_second_moment: float = 0.0
    shortcut_second_moment: float = 0.0


def channel_stats(x: torch.Tensor) -> tuple[float, float]:
    """(mean over channels of the squared channel mean, mean over channels of the channel variance).

    Channel statistics are over (N, H, W) of an (N, C, H, W) tensor; the variance is the population one.
    """
    xd = x.detach().double()
    mu = xd.mean(dim=(0, 2, 3))
    var = xd.var(dim=(0, 2, 3), unbiased=False)
    return float(mu.square().mean()), float(var.mean())


def build_model(name: str, arch: str = "resnet50", nf_branch_init: str = "one") -> nn.Module:
    """The ResNet `arch` with norm `name`, or its normalizer-free counterpart for name 'nf'."""
    from ipu_norm.models import create_model  # noqa: PLC0415

    if name != "nf":
        return create_model(arch, norm=name, num_classes=10)
    if arch == "resnet50":
        model = create_model("nf_resnet50", num_classes=10)
    else:
        from ipu_norm.models.nfnet import NormFreeNet, nf_resnet_cfg  # noqa: PLC0415

        model = NormFreeNet(nf_resnet_cfg(depths=NF_DEPTHS[arch]), num_classes=10, name=f"nf_{arch}")
    if nf_branch_init == "one":
        set_nf_branch_gains(model, 1.0)
    elif nf_branch_init != "default":
        raise ValueError(f"nf_branch_init must be 'one' or 'default', got {nf_branch_init!r}")
    return model


@torch.no_grad()
def set_nf_branch_gains(model: nn.Module, value: float) -> None:
    """Set what zero-initialises NF residual branches (scalar skip gain, or last conv's WS gain) to `value`."""
    for block in model.blocks:
        if getattr(block, "skip_gain", None) is not None:
            block.skip_gain.fill_(value)
        else:
            block.conv3.gain.fill_(value)


def _is_nf_block(block: nn.Module) -> bool:
    return hasattr(block, "alpha") and hasattr(block, "beta") and hasattr(block, "act1")


def _last_branch_norm(block: nn.Module) -> nn.Module:
    # ResNet Bottleneck: norm3; BasicBlock: norm2 (both: the norm just before the residual addition).
    for name in ("norm3", "norm2"):
        if hasattr(block, name):
            return getattr(block, name)
    raise TypeError(f"don't know the residual branch of {type(block).__name__}")


@torch.no_grad()
def measure(model: nn.Module, x: torch.Tensor) -> list[BlockStats]:
    """Per-block statistics of `model` (contract: .stem, .blocks) on input x, in training mode."""
    model.train()
    captured: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        rec = captured.setdefault(i, {})

        def pre_hook(_m, args, rec=rec):  # noqa: ANN001, ANN202
            rec["input"] = args[0]

        def out_hook(_m, _args, out, rec=rec, key="output"):  # noqa: ANN001, ANN202
            rec[key] = out

        handles.append(block.register_forward_pre_hook(pre_hook))
        handles.append(block.register_forward_hook(out_hook))
        if _is_nf_block(block):
            if block.shortcut is not None:
                handles.append(block.shortcut.register_forward_hook(
                    lambda _m, _a, out, rec=rec: rec.__setitem__("shortcut", out)))
        else:
            # A copy: the block adds the shortcut to the branch output in place (ResNet blocks, like timm's).
            handles.append(_last_branch_norm(block).register_forward_hook(
                lambda _m, _a, out, rec=rec: rec.__setitem__("branch", out.clone())))
            if block.downsample is not None:
                handles.append(block.downsample.register_forward_hook(
                    lambda _m, _a, out, rec=rec: rec.__setitem__("shortcut", out)))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    stats = []
    for i, block in enumerate(model.blocks):
        rec = captured[i]
        shortcut = rec.get("shortcut", rec["input"])
        if _is_nf_block(block):
            stream = rec["output"]
            branch = stream - shortcut  # alpha * skip_gain * f(h / beta)
        else:
            branch = rec["branch"]
            stream = branch + shortcut  # before the block's final ReLU
        s_sq, s_var = channel_stats(stream)
        b_sq, b_var = channel_stats(branch)
        transition = "shortcut" in rec
        in_m = sum(channel_stats(rec["input"]))
        sc_m = sum(channel_stats(shortcut))
        stats.append(BlockStats(i, s_sq, s_var, b_var, b_sq, transition, in_m, sc_m))
    return stats


def run(
    arch: str = "resnet50",
    norms: tuple[str, ...] = NORMS,
    include_nf: bool = True,
    batch: int = 16,
    resolution: int = 128,
    seed: int = 0,
    nf_branch_init: str = "one",
) -> dict[str, Any]:
    """Measure every model on the same N(0, 1) batch; returns {'models': {label: [BlockStats dict]}, ...}."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen)
    results: dict[str, list[dict[str, Any]]] = {}
    nf_law: list[dict[str, float]] | None = None
    labels = list(norms) + (["nf"] if include_nf else [])
    for name in labels:
        torch.manual_seed(seed)
        model = build_model(name, arch, nf_branch_init)
        label = name if name != "nf" else ("nf_resnet50" if arch == "resnet50" else f"nf_{arch}")
        results[label] = [asdict(s) for s in measure(model, x)]
        if name == "nf":
            nf_law = nf_law_check(model, results[label])
    return {
        "arch": arch, "batch": batch, "resolution": resolution, "seed": seed, "nf_branch_init": nf_branch_init,
        "models": results, "nf_law": nf_law,
    }


def expected_nf_variance(model: nn.Module) -> list[float]:
    """The analytic variance of the NF residual stream after each block (REFERENCE.md variance law).

    Entering block i the expected variance is model.expected_vars[i]; the block adds alpha^2, and a
    transition block restarts from 1 (its conv shortcut sees a unit-variance input).
    """
    out = []
    for v, block in zip(model.expected_vars, model.blocks):
        base = 1.0 if block.is_transition else v
        out.append(base + block.alpha**2)
    return out


def nf_law_check(model: nn.Module, rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Measured NF stream second moment, relative to its stage's reset value, next to the law.

    The law is scale-free: block i adds alpha^2 * E[h_i^2] / beta_i^-2 (its branch sees h_i * beta_i and
    preserves variance), so within a stage the stream second moment divided by that of the transition
    block's shortcut (the reset value v0; on white-noise inputs the 2x2 average pool of the NF shortcut
    makes v0 < 1) should follow the law 1 (+reset) + k alpha^2. `branch_gain` = branch variance *
    expected_vars[i] / E[h_i^2] should be alpha^2 at every block.
    """
    law = expected_nf_variance(model)
    out = []
    v0 = 1.0
    for r, e, ev in zip(rows, law, model.expected_vars):
        if r["transition"]:
            v0 = r["shortcut_second_moment"]
        out.append({
            "block": r["block"],
            "relative_second_moment": (r["stream_var"] + r["stream_sq_mean"]) / v0,
            "law": e,
            "branch_gain": r["branch_var"] * ev / r["input_second_moment"],
            "alpha_sq": model.blocks[r["block"]].alpha ** 2,
        })
    return out


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: per model, the three statistics at the first block, each stage end, and the last."""
    models = result["models"]
    first = next(iter(models.values()))
    n = len(first)
    # Stage ends = the block before each transition, plus the last block.
    trans = [r["block"] for r in first if r["transition"]]
    picks = sorted({0, n - 1} | {t - 1 for t in trans if t > 0})
    head = "| model | statistic | " + " | ".join(f"block {i}" for i in picks) + " |"
    lines = [head, "|---|---|" + "---:|" * len(picks)]
    for label, rows in models.items():
        for key, desc in (("stream_sq_mean", "stream ch. sq. mean"), ("stream_var", "stream ch. var"),
                          ("branch_sq_mean", "branch ch. sq. mean"), ("branch_var", "branch ch. var")):
            vals = " | ".join(f"{rows[i][key]:.3g}" for i in picks)
            lines.append(f"| {label} | {desc} | {vals} |")
    if result.get("nf_law"):
        law = result["nf_law"]
        lines.append("| NF | stream 2nd moment / stage reset value | "
                     + " | ".join(f"{law[i]['relative_second_moment']:.3g}" for i in picks) + " |")
        lines.append("| NF | law 1 (+reset) + k alpha^2 | " + " | ".join(f"{law[i]['law']:.3g}" for i in picks) + " |")
        lines.append("| NF | branch var x beta^2 / E[h^2] (law: alpha^2) | "
                     + " | ".join(f"{law[i]['branch_gain']:.3g}" for i in picks) + " |")
    return "\n".join(lines)


def summarize(result: dict[str, Any]) -> list[str]:
    """Numeric facts the figure should show (used for the README text and checked by the tests)."""
    m = result["models"]
    facts = []
    last = len(next(iter(m.values()))) - 1
    for base in ("ln", "gn"):
        pn = f"{base}+pn"
        if base in m and pn in m:
            for key, what in (("branch_sq_mean", "branch"), ("stream_sq_mean", "stream")):
                a, b = m[base][last][key], m[pn][last][key]
                facts.append(f"last block {what} channel squared mean: {base} {a:.3g} vs {pn} {b:.3g} "
                             f"({a / max(b, 1e-30):.1f}x lower with PN)")
    nf = [k for k in m if k.startswith("nf")]
    if nf and result.get("nf_law"):
        law = result["nf_law"]
        err = max(abs(r["relative_second_moment"] - r["law"]) / r["law"] for r in law)
        gains = [r["branch_gain"] for r in law]
        raw = [r["stream_var"] + r["stream_sq_mean"] for r in m[nf[0]]]
        facts.append(f"{nf[0]}: stream second moment relative to each stage's reset value follows 1 + k alpha^2 "
                     f"within {100 * err:.1f}% at every block; branch var x beta^2 / E[h^2] = "
                     f"{min(gains):.3f}-{max(gains):.3f} (alpha^2 = {law[0]['alpha_sq']:.3f}); the absolute "
                     f"second moment ranges {min(raw):.3g}-{max(raw):.3g} (stem gain, 2x2 avg-pool shortcuts)")
    return facts


ZERO = 1e-10  # below this a statistic is zero up to float rounding (BN's batch-normalised channel means)


def plot(result: dict[str, Any], path: Path) -> None:
    """Write :func:`figure` to ``path``."""
    fig = figure(result)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(result: dict[str, Any]) -> Any:
    """The figure: stream/branch channel squared mean and variance vs block (log y), and the two NF law panels.

    Values that are zero up to rounding (BN zeroes every channel mean of what it normalises) cannot sit on a log
    axis: they are drawn as triangles on the panel's bottom edge and said so in the legend.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415

    keys = (("stream_sq_mean", "residual stream: channel means", "mean over channels of $\\mu_c^2$"),
            ("stream_var", "residual stream: channel variances", "mean over channels of $\\sigma_c^2$"),
            ("branch_sq_mean", "residual branch: channel means", "mean over channels of $\\mu_c^2$"),
            ("branch_var", "residual branch: channel variances", "mean over channels of $\\sigma_c^2$"))
    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
    axes = axes.ravel()
    handles: dict[str, Any] = {}
    any_zero = False
    for ax, (key, title, ylabel) in zip(axes[:4], keys):
        for i, (label, rows) in enumerate(result["models"].items()):
            color = f"C{i}"
            style = "-" if "+pn" in label else ("--" if label.startswith("nf") else ":")
            blocks = [r["block"] for r in rows]
            ys = [r[key] if r[key] > ZERO else float("nan") for r in rows]
            (line,) = ax.plot(blocks, ys, style, color=color, marker="o", ms=3, label=label)
            handles.setdefault(label, line)
            zeros = [b for b, r in zip(blocks, rows) if r[key] <= ZERO]
            if zeros:
                any_zero = True
                ax.plot(zeros, [0.0] * len(zeros), "v", color=color, ms=7, clip_on=False,
                        transform=ax.get_xaxis_transform())
        first = next(iter(result["models"].values()))
        for r in first:
            if r["transition"] and r["block"] > 0:
                ax.axvline(r["block"] - 0.5, color="grey", lw=0.5, alpha=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("residual block (grey lines: stage transitions)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", which="major", alpha=0.3)
    legend_items = list(handles.values())
    if any_zero:
        legend_items.append(Line2D([], [], ls="", marker="v", color="grey", ms=7,
                                   label="zero (up to rounding): on the bottom edge"))
    fig.legend(handles=legend_items, loc="upper center", ncol=len(legend_items), fontsize=9,
               bbox_to_anchor=(0.5, 0.955), frameon=False)
    if result.get("nf_law"):
        law = result["nf_law"]
        blocks = [r["block"] for r in law]
        ax = axes[4]
        ax.plot(blocks, [r["relative_second_moment"] for r in law], "o--", ms=4, label="measured / stage reset value")
        ax.plot(blocks, [r["law"] for r in law], "k-", lw=1, label="law: 1 (reset) + k alpha^2")
        ax.set_title("NF residual stream second moment vs variance law", fontsize=10)
        ax.set_xlabel("residual block")
        ax.set_ylabel("$E[h^2]$ / stage reset value")
        ax.legend(fontsize=8)
        ax = axes[5]
        ax.plot(blocks, [r["branch_gain"] for r in law], "o--", ms=4, label="branch var x beta^2 / E[h^2]")
        ax.axhline(law[0]["alpha_sq"], color="k", lw=1, label="alpha^2")
        ax.set_ylim(0, 2 * law[0]["alpha_sq"])
        ax.set_title("NF residual branch: variance added per block", fontsize=10)
        ax.set_xlabel("residual block")
        ax.set_ylabel("branch variance x $\\beta^2$ / $E[h^2]$")
        ax.legend(fontsize=8)
    else:
        axes[4].axis("off")
        axes[5].axis("off")
    fig.suptitle(f"Signal propagation at init: {result['arch']} (+NF counterpart), N(0,1) input "
                 f"{result['batch']}x3x{result['resolution']}x{result['resolution']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point (see module docstring)."""
    p = argparse.ArgumentParser(prog="python -m ipu_norm.experiments.signal_prop",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=sorted(NF_DEPTHS))
    p.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    p.add_argument("--no-nf", action="store_true", help="skip the normalizer-free model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=128,
                   help="input side (>= 128 keeps the last stage at >= 4x4, where 3x3 zero padding is not dominant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nf-branch-init", default="one", choices=["one", "default"])
    p.add_argument("--out", default="docs/results", help="output folder")
    args = p.parse_args(argv)
    result = run(args.arch, tuple(args.norms), not args.no_nf, args.batch, args.resolution, args.seed,
                 args.nf_branch_init)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "signal_prop.png")
    table = format_table(result)
    facts = summarize(result)
    (out / "signal_prop.md").write_text(table + "\n\n" + "\n".join(f"- {f}" for f in facts) + "\n")
    (out / "signal_prop.json").write_text(json.dumps(result, indent=1))
    print(table)
    print()
    for f in facts:
        print("-", f)
    print(f"\nwrote {out / 'signal_prop.png'}, {out / 'signal_prop.md'}, {out / 'signal_prop.json'}")
    return result


if __name__ == "__main__":
    main()
