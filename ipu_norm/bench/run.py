"""`python -m ipu_norm.bench`: training-step throughput of ipu_norm models against timm, PN and AGC overheads.

Example (the Goals tables: 1 thread and the default thread count, eager and torch.compile'd):

    python -m ipu_norm.bench --device cpu --batch 8 --resolution 96 224 --json bench.json
    python -m ipu_norm.bench --short        # a few steps per variant: a quick look on a busy machine

Every figure is the median over `--steps` timed training steps (forward, backward, clip where
configured, SGD step) after `--warmup` untimed ones; the variants of a group are stepped interleaved, and
the tables are printed once per (thread count, eager/compiled) run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch

from ipu_norm.bench.cases import GROUP_NAMES, Group, build_groups
from ipu_norm.bench.harness import (
    TrainStep,
    forward_flops,
    free_memory,
    gemm_peak_flops,
    profile_step,
    time_interleaved,
)

GOALS = {"ratio": 1.0, "pn_overhead": 0.05, "agc_share": 0.02}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
    }
    try:
        import timm  # noqa: PLC0415

        info["timm"] = timm.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg_start"] = list(__import__("os").getloadavg())
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_group(group: Group, args: argparse.Namespace, device: torch.device, log,  # noqa: ANN001
              resolution: int) -> dict[str, Any]:
    """Build, time and summarise one group at `resolution` px; a variant that cannot be built is reported as
    skipped."""
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    rows: list[dict[str, Any]] = []
    steps: list[TrainStep] = []
    for v in group.variants:
        row: dict[str, Any] = {"group": group.name, "variant": v.name, "source": v.source, "note": v.note,
                               "clips": v.clip is not None}
        try:
            torch.manual_seed(0)
            model = v.build()
            fwd_flops, flops_src = forward_flops(model, resolution)
            row.update(params=sum(p.numel() for p in model.parameters()), fwd_flops_per_img=fwd_flops,
                       flops_source=flops_src)
            step = TrainStep(
                model, None, args.batch, resolution, args.num_classes, device,
                channels_last=args.channels_last, amp_dtype=amp_dtype, compile_model=args.compile,
            )
            # The clip is built after the model moved to the device: it may capture parameters.
            step.clip = v.clip(step.model) if v.clip is not None else None
        except Exception as e:  # noqa: BLE001 - a missing model/API is reported, the rest still runs
            row["skipped"] = f"{type(e).__name__}: {e}"
            log(f"  skip {v.name}: {row['skipped']}")
            rows.append(row)
            continue
        rows.append(row)
        steps.append(step)
    live = [r for r in rows if "skipped" not in r]
    if steps:
        log(f"  timing {len(steps)} variants x {args.steps} steps (+{args.warmup} warm-up), interleaved")
        times = time_interleaved(steps, args.steps, args.warmup, progress=lambda m: log(f"    {m}"))
        for row, t in zip(live, times):
            step_s = t.median()
            q1, q3 = t.iqr()
            row.update(
                step_ms=1e3 * step_s, step_ms_min=1e3 * min(t.step), step_ms_q1=1e3 * q1, step_ms_q3=1e3 * q3,
                fwd_bwd_ms=1e3 * t.median("fwd_bwd"), clip_ms=1e3 * t.median("clip"), opt_ms=1e3 * t.median("opt"),
                img_per_s=args.batch / step_s, steps_raw_ms=[1e3 * s for s in t.step],
                fwd_bwd_raw_ms=[1e3 * s for s in t.fwd_bwd], clip_raw_ms=[1e3 * s for s in t.clip],
                # Training FLOPs ~ 3x forward (backward = grad wrt inputs + grad wrt weights).
                achieved_flops=3.0 * row["fwd_flops_per_img"] * args.batch / step_s,
            )
        if args.profile:
            for row, step in zip(live, steps):
                if args.profile in row["variant"]:
                    log(f"\n  torch.profiler: {row['variant']}\n" + profile_step(step, row_limit=args.profile_rows))
    del steps
    free_memory(device)
    by_name = {r["variant"]: r for r in live}
    summary: dict[str, Any] = {"ratios": [], "pn_overhead": None, "agc": None}
    for num, den, label, goal in group.ratios:
        if num in by_name and den in by_name:
            ratio = by_name[num]["img_per_s"] / by_name[den]["img_per_s"]
            # Best-step ratio: on a shared machine the fastest step is the least disturbed one.
            ratio_min = by_name[den]["step_ms_min"] / by_name[num]["step_ms_min"]
            summary["ratios"].append({"label": label, "ratio": ratio, "ratio_min": ratio_min,
                                      "ratio_paired": paired_ratio(by_name[den], by_name[num]), "goal": goal,
                                      "met": ratio >= GOALS["ratio"]})
    summary["pn_overheads"] = []
    for pair in ([group.pn_pair] if group.pn_pair else []) + list(group.extra_pn_pairs):
        if not all(n in by_name for n in pair):
            continue
        with_pn, without = (by_name[n]["step_ms"] for n in pair)
        ovh = with_pn / without - 1.0
        ovh_min = by_name[pair[0]]["step_ms_min"] / by_name[pair[1]]["step_ms_min"] - 1.0
        ovh_paired = paired_ratio(by_name[pair[0]], by_name[pair[1]]) - 1.0
        summary["pn_overheads"].append({"pair": list(pair), "overhead": ovh, "overhead_min": ovh_min,
                                        "overhead_paired": ovh_paired, "goal": "<=5%",
                                        "met": ovh <= GOALS["pn_overhead"]})
    summary["pn_overhead"] = summary["pn_overheads"][0] if summary["pn_overheads"] else None
    if group.agc_pair and all(n in by_name for n in group.agc_pair):
        r_with, r_without = (by_name[n] for n in group.agc_pair)
        share = r_with["clip_ms"] / r_with["step_ms"]
        summary["agc"] = {
            "pair": list(group.agc_pair), "clip_ms": r_with["clip_ms"], "share_of_step": share,
            "step_with_vs_without": r_with["step_ms"] / r_without["step_ms"] - 1.0,
            "goal": "<=2% of step", "met": share <= GOALS["agc_share"],
        } | agc_step_overhead(r_with, r_without)
    for r in live:
        if r["clips"] and r["source"] == "timm":
            summary.setdefault("timm_agc_share", r["clip_ms"] / r["step_ms"])
    summary["extra_agc"] = [{"row": n, "clip_ms": by_name[n]["clip_ms"],
                             "share_of_step": by_name[n]["clip_ms"] / by_name[n]["step_ms"]}
                            for n in group.extra_agc_rows if n in by_name]
    return {"name": group.name, "resolution": resolution, "rows": rows, "summary": summary}


def paired_ratio(r_a: dict[str, Any], r_b: dict[str, Any]) -> float:
    """Median over rounds of row a's step time / row b's in the same round.

    The rows are stepped interleaved, so one round's steps are adjacent in time: a shared machine's slow phases
    (other tenants' memory traffic) hit both and cancel in the ratio, where the ratio of the two medians mixes
    steps from different phases.
    """
    return statistics.median(a / b for a, b in zip(r_a["steps_raw_ms"], r_b["steps_raw_ms"]))


def agc_step_overhead(r_with: dict[str, Any], r_without: dict[str, Any]) -> dict[str, float]:
    """AGC's cost read off the step times of the rows with and without it, not only off the clip call.

    Work AGC does outside the clip call (e.g. norms taken in backward hooks) shows only here. ``overhead_ms``
    = median step with - median step without; ``paired_overhead_ms`` = median over rounds of the two rows'
    step difference within the round (the rows are stepped interleaved, so a round's two steps are adjacent in
    time and a shared machine's drift largely cancels); shares are of the median step with AGC. Likewise for
    forward + backward alone (``fwd_bwd_*``: where work moved into backward appears).
    """
    def paired(key: str) -> float:
        return statistics.median(a - b for a, b in zip(r_with[key], r_without[key]))

    step_with = r_with["step_ms"]
    out = {
        "overhead_ms": step_with - r_without["step_ms"],
        "paired_overhead_ms": paired("steps_raw_ms"),
        "fwd_bwd_overhead_ms": r_with["fwd_bwd_ms"] - r_without["fwd_bwd_ms"],
        "fwd_bwd_paired_overhead_ms": paired("fwd_bwd_raw_ms"),
    }
    out["overhead_share"] = out["overhead_ms"] / step_with
    out["paired_overhead_share"] = out["paired_overhead_ms"] / step_with
    return out


def format_report(result: dict[str, Any]) -> str:
    """Markdown tables (per-variant figures, then the goal checks) from a run's result dict."""
    peak = result["gemm_peak_flops"]
    lines = [
        "| group | variant | img/s | step ms median (IQR) | best step ms | fwd+bwd ms | clip ms | opt ms "
        "| GFLOP/img | achieved GFLOP/s | % of GEMM peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in result["groups"]:
        for r in g["rows"]:
            if "skipped" in r:
                lines.append(f"| {_group_label(g)} | {r['variant']} | skipped: {r['skipped'][:80]} | | | | | | | | |")
                continue
            lines.append(
                f"| {_group_label(g)} | {r['variant']} | {r['img_per_s']:.1f} | {r['step_ms']:.0f} "
                f"({r['step_ms_q1']:.0f}-{r['step_ms_q3']:.0f}) | {r['step_ms_min']:.0f} | {r['fwd_bwd_ms']:.0f} | "
                f"{r['clip_ms']:.1f} | "
                f"{r['opt_ms']:.1f} | {r['fwd_flops_per_img'] / 1e9:.2f} | {r['achieved_flops'] / 1e9:.1f} | "
                f"{100 * r['achieved_flops'] / peak:.0f}% |"
            )
    lines += ["", "| check | median-based | paired per round | best-step-based | goal | met (median) |",
              "|---|---:|---:|---:|---|---|"]
    for g in result["groups"]:
        s = g["summary"]
        at = f" @ {g['resolution']} px" if "resolution" in g else ""
        for rt in s["ratios"]:
            lines.append(f"| {rt['label']}{at} (throughput ratio) | {rt['ratio']:.2f}x | {rt['ratio_paired']:.2f}x "
                         f"| {rt['ratio_min']:.2f}x | {rt['goal']} | {_yn(rt['met'])} |")
        for p in s.get("pn_overheads", []):
            lines.append(f"| PN overhead: {p['pair'][0]} vs {p['pair'][1]}{at} (step time) "
                         f"| {100 * p['overhead']:+.1f}% | {100 * p['overhead_paired']:+.1f}% "
                         f"| {100 * p['overhead_min']:+.1f}% | {p['goal']} | {_yn(p['met'])} |")
        if s["agc"]:
            a = s["agc"]
            lines.append(f"| AGC clip call share of step ({a['pair'][0]}){at} | {100 * a['share_of_step']:.2f}% "
                         f"({a['clip_ms']:.1f} ms) | | | {a['goal']} | {_yn(a['met'])} |")
            lines.append(f"| step with vs without AGC ({a['pair'][0]} vs {a['pair'][1]}) | "
                         f"{100 * a['step_with_vs_without']:+.1f}% | | | (noise-limited) | |")
            lines.append(f"| AGC overhead from step difference, (with - without) / with "
                         f"| {100 * a['overhead_share']:+.2f}% ({a['overhead_ms']:+.1f} ms) "
                         f"| {100 * a['paired_overhead_share']:+.2f}% ({a['paired_overhead_ms']:+.1f} ms) "
                         f"| | <=2% of step (noise-limited) "
                         f"| {_yn(a['paired_overhead_share'] <= GOALS['agc_share'])} |")
            lines.append(f"| of which forward+backward difference "
                         f"| {a['fwd_bwd_overhead_ms']:+.1f} ms | {a['fwd_bwd_paired_overhead_ms']:+.1f} ms | | | |")
        for a in s.get("extra_agc", []):
            met = _yn(a["share_of_step"] <= GOALS["agc_share"])
            lines.append(f"| AGC clip call share of step ({a['row']}) | {100 * a['share_of_step']:.2f}% "
                         f"({a['clip_ms']:.1f} ms) | | | <=2% of step | {met} |")
        if s.get("timm_agc_share") is not None:
            lines.append(f"| timm adaptive_clip_grad share of step (reference) | {100 * s['timm_agc_share']:.2f}% "
                         "| | | | |")
    lines.append("")
    lines.append(f"GEMM peak (torch.mm {result['config']['gemm_size']}^2, {result['config']['gemm_dtype']}): "
                 f"{peak / 1e9:.1f} GFLOP/s. Achieved = 3 x forward FLOPs x batch / median step time.")
    return "\n".join(lines)


def _group_label(g: dict[str, Any]) -> str:
    return f"{g['name']} @ {g['resolution']} px" if "resolution" in g else g["name"]


def _yn(met: bool) -> str:
    return "yes" if met else "**no**"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ipu_norm.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="+", default=None, choices=GROUP_NAMES, metavar="GROUP",
                   help=f"benchmark groups to run (default: all of {', '.join(GROUP_NAMES)})")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, nargs="+", default=[96],
                   help="image sizes to run each group at (default 96; nfnet_f0_agc always runs at its training "
                        "resolution, 192)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for every variant")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                   help="eager and/or torch.compile'd variants (compiled: the warm-up absorbs the compilation)")
    p.add_argument("--compile", action="store_true", help="shorthand for --modes compiled")
    p.add_argument("--short", action="store_true",
                   help="quick run: 3 timed steps and 1 warm-up per variant (2 when compiled)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--gemm-size", type=int, default=None, help="matrix side for the GEMM peak (default 2048 cpu, "
                                                               "8192 cuda)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                   help="CPU thread counts to run at, 0 = the default count (default: 1 and the default)")
    p.add_argument("--profile", default=None, metavar="SUBSTR",
                   help="print a torch.profiler table for variants whose name contains SUBSTR")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--json", default=None, help="write all figures (incl. raw step times) to this file")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables; return (and optionally write) the result dict."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.compile:
        args.modes = ["compiled"]
    if args.short:
        args.steps, args.warmup = 3, 1
    default_threads = torch.get_num_threads()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    gemm_size = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    gemm_dtype = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    t0 = time.perf_counter()
    peak = gemm_peak_flops(device, gemm_size, gemm_dtype)
    log(f"GEMM peak: {peak / 1e9:.1f} GFLOP/s")
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {"gemm_size": gemm_size,
                                                                        "gemm_dtype": str(gemm_dtype)},
        "machine": machine_info(device),
        "gemm_peak_flops": peak,
        "runs": [],
    }
    base_warmup = args.warmup
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        for mode in args.modes:
            args.compile = mode == "compiled"
            args.warmup = base_warmup + (1 if args.compile else 0)
            run = {"threads": torch.get_num_threads(), "mode": mode, "groups": []}
            for group in build_groups(args.num_classes, args.models):
                # A group with its own resolution runs once per (threads, mode), the others at each --resolution.
                for res in [group.resolution] if group.resolution else args.resolution:
                    log(f"[{group.name} @ {res} px, {run['threads']} thread(s), {mode}]")
                    run["groups"].append(run_group(group, args, device, log, res))
            result["runs"].append(run)
            # Printed as each run ends: a long run interrupted later keeps the tables of the finished ones.
            print(f"\n## {run['threads']} thread(s), {mode}\n")
            print(format_report(result | {"groups": run["groups"]}), flush=True)
    torch.set_num_threads(default_threads)
    result["groups"] = result["runs"][0]["groups"]  # the first run's, as before several runs were made
    # Peak again at the end, keep the larger: on a shared machine one measurement can land in a busy moment.
    peak_end = gemm_peak_flops(device, gemm_size, gemm_dtype)
    result["gemm_peak_flops_start_end"] = [peak, peak_end]
    result["gemm_peak_flops"] = max(peak, peak_end)
    result["wall_s"] = time.perf_counter() - t0
    try:
        result["machine"]["loadavg_end"] = list(__import__("os").getloadavg())
    except OSError:
        pass
    print(f"\n(total {result['wall_s']:.0f} s; {result['machine']['cpu']}, {result['machine']['threads']} threads"
          + (f", {result['machine']['gpu']}" if "gpu" in result["machine"] else "") + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
