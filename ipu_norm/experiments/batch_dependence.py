"""Batch dependence: validation accuracy vs micro-batch size at a fixed global batch, per norm.

    python -m ipu_norm.experiments.batch_dependence [--quick] [--out DIR]

Data: scikit-learn's real 8x8 handwritten digits (1,797 images shipped with scikit-learn), exported as
PNG images by `ipu_norm.data` and read back at 16x16 (RGB, ImageNet normalisation), stratified 80/20
train/val split. The whole set is decoded once and kept in memory; no augmentation (identical inputs for
every run).

Models (built from the library's blocks): a tiny ResNet (`ipu_norm.models.resnet.ResNet` with BasicBlocks,
depths 1-1-1, widths 16-32-64, a 3x3 stem instead of the 7x7/2 + max-pool stem that would shrink a 16 px
image to 4 px) with norm 'bn', 'gn', 'gn+pn', 'ln+pn' (and optionally 'ln'); and a tiny NF-ResNet
(`ipu_norm.models.nfnet.NormFreeNet` with the NF-ResNet layout, depths 1-1-1, widths 32-64-128, bottleneck
ratio 0.5 so its 3x3 convs have the same 16-32-64 widths, 3x3 stem) trained with AGC.

Protocol: for micro-batch m in (1, 2, 8, 32), gradient accumulation over 32 / m micro-batches gives the
same global batch of 32; the same seed gives every run the same initial weights and the same sequence of
global batches; every run makes the same number of optimizer steps (SGD Nesterov momentum 0.9, cosine
LR with warm-up, peak LR 0.1 for the normalised nets and 0.4 for the NF net with AGC clip 0.04 (picked on a
100-step sweep over LR {0.1, 0.2, 0.4} x clip {0.04, 0.16, none} at micro-batch 32; no clipping reached 70%),
weight decay on conv/linear weights and PN proxy params). BatchNorm in training mode
normalises with the statistics of the current micro-batch (that is the batch dependence under test); at
evaluation it uses the running statistics accumulated from those micro-batches. AGC clips once per
optimizer step, on the accumulated gradient; for 'nf_micro' (not in the default set) it clips each
micro-batch's gradient in the backward pass instead (`optim.agc_scope: micro_batch`, the IPU's AGC), which
equals the step clip at micro-batch 32 (no accumulation).

Writes batch_dependence.png, batch_dependence.md and batch_dependence.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("bn", "gn", "gn+pn", "ln+pn", "nf")
# nf_micro: the same NF-ResNet with AGC applied to every micro-batch's gradient in the backward pass
# (optim.agc_scope: micro_batch, what an IPU can run) instead of once to the accumulated gradient.
ALL_NORMS = ("bn", "gn", "ln", "gn+pn", "ln+pn", "nf", "nf_micro")
LABELS = {"nf": "NF-ResNet + AGC", "nf_micro": "NF-ResNet + AGC per micro-batch"}
MICRO_BATCHES = (1, 2, 8, 32)
GLOBAL_BATCH = 32
NUM_CLASSES = 10


@dataclass
class Digits:
    """The digits split, decoded into tensors (N, 3, S, S) float and (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def load_digits(image_size: int = 16, limit_per_class: int | None = None, root: str | None = None) -> Digits:
    """sklearn digits through ipu_norm.data (PNG export + image folder), decoded once, no augmentation."""
    from ipu_norm.data import build_dataset, build_digits_eval_transform  # noqa: PLC0415

    out = []
    for split in ("train", "val"):
        ds = build_dataset(
            "digits", split, root=root, image_size=image_size, test_size=image_size, num_classes=NUM_CLASSES,
            generated_samples=0, seed=0, digits_limit_per_class=limit_per_class,
        )
        # Same deterministic transform for both splits: augmentation is not what this experiment varies.
        ds.transform = build_digits_eval_transform(image_size)
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        out += [torch.stack(xs), torch.tensor(ys, dtype=torch.int64)]
    return Digits(*out)


def tiny_resnet(norm: str, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (16, 32, 64)) -> nn.Module:
    """ResNet with one BasicBlock per stage and a 3x3 stride-1 stem (for 16 px inputs), any norm string."""
    from ipu_norm.layers.norm_act import create_norm_act  # noqa: PLC0415
    from ipu_norm.models.resnet import BasicBlock, ResNet  # noqa: PLC0415

    model = ResNet(BasicBlock, depths=(1,) * len(widths), widths=widths, norm=norm, num_classes=num_classes,
                   stem_width=widths[0])
    conv = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as ResNet._init_weights
    model.stem = nn.Sequential(conv, create_norm_act(norm, widths[0], "relu"))
    return model


def tiny_nf_resnet(num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (32, 64, 128)) -> nn.Module:
    """NF-ResNet (timm layout: ReLU, gamma in the convs, zero-init last gain) with one block per stage."""
    from ipu_norm.layers.weight_std import ScaledStdConv2d  # noqa: PLC0415
    from ipu_norm.models.nfnet import NormFreeNet, nf_resnet_cfg  # noqa: PLC0415

    cfg = nf_resnet_cfg(depths=(1,) * len(widths), channels=widths, strides=(1,) + (2,) * (len(widths) - 1),
                        stem_chs=16, bottle_ratio=0.5)
    model = NormFreeNet(cfg, num_classes=num_classes, name="nf_resnet_tiny")
    old = model.stem.conv
    model.stem = ScaledStdConv2d(3, cfg.stem_chs, 3, padding=1, form=old.form, eps=old.eps, gamma=old.gamma)
    return model


def build_model(norm: str) -> nn.Module:
    """The experiment's model for a norm string ('nf', 'nf_micro' = the NF-ResNet)."""
    return tiny_nf_resnet() if norm in ("nf", "nf_micro") else tiny_resnet(norm)


def batch_order(n: int, steps: int, global_batch: int, seed: int) -> torch.Tensor:
    """(steps, global_batch) sample indices: epochs of seeded permutations, identical for every run."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = n // global_batch  # drop the last partial batch of each epoch
    epochs = math.ceil(steps / max(per_epoch, 1))
    rows = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        if per_epoch == 0:  # tiny smoke-test sets: sample with replacement
            rows.append(torch.randint(0, n, (1, global_batch), generator=gen))
            continue
        rows.append(perm[: per_epoch * global_batch].view(per_epoch, global_batch))
    return torch.cat(rows)[:steps]


def lr_at(step: int, steps: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i: i + batch])
        loss += F.cross_entropy(logits, y[i: i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i: i + batch]).sum().item()
    return correct / len(x), loss / len(x)


def train_one(
    norm: str,
    micro_batch: int,
    data: Digits,
    steps: int,
    *,
    seed: int = 0,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    warmup: int = 10,
    agc_clip: float = 0.04,
    nf_lr: float | None = 0.4,
    global_batch: int = GLOBAL_BATCH,
) -> dict[str, Any]:
    """Train one model for `steps` optimizer steps at the given micro-batch; return its metrics.

    The NF model uses its own peak learning rate `nf_lr` (None: `lr`): without normalisation its best LR
    differs, and AGC is what keeps the larger LR stable (REFERENCE.md).
    """
    from ipu_norm.optim.agc import AGC  # noqa: PLC0415
    from ipu_norm.optim.param_groups import param_groups_weight_decay  # noqa: PLC0415

    if global_batch % micro_batch:
        raise ValueError(f"micro-batch {micro_batch} does not divide the global batch {global_batch}")
    accum = global_batch // micro_batch
    if norm in ("nf", "nf_micro") and nf_lr is not None:
        lr = nf_lr
    torch.manual_seed(seed)
    model = build_model(norm)
    opt = torch.optim.SGD(param_groups_weight_decay(model, weight_decay), lr=lr, momentum=0.9, nesterov=True)
    agc = AGC(model, clip_factor=agc_clip) if norm == "nf" else None
    if norm == "nf_micro":
        from ipu_norm.optim.agc_scope import enable_micro_batch_agc  # noqa: PLC0415

        # Each micro-batch's loss is divided by accum below: the clip sees that factor as its loss scale.
        enable_micro_batch_agc(model, agc_clip, loss_scale=1.0 / accum)
    order = batch_order(len(data.x_train), steps, global_batch, seed)
    losses = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        idx = order[step]
        total = 0.0
        for j in range(accum):
            sl = idx[j * micro_batch: (j + 1) * micro_batch]
            loss = F.cross_entropy(model(data.x_train[sl]), data.y_train[sl]) / accum
            loss.backward()
            total += loss.item()
        if agc is not None:
            agc.clip_()  # once per optimizer step, on the accumulated gradient
        opt.step()
        losses.append(total)
        if not math.isfinite(total):
            break
    train_s = time.perf_counter() - t0
    acc, val_loss = evaluate(model, data.x_val, data.y_val)
    tail = losses[-max(1, len(losses) // 10):]
    return {"norm": norm, "micro_batch": micro_batch, "accum": accum, "steps": len(losses), "seed": seed,
            "val_acc": acc, "val_loss": val_loss, "train_loss_end": sum(tail) / len(tail), "train_s": train_s}


_WORKER_DATA: dict[tuple, Digits] = {}


def _run_job(job: tuple) -> dict[str, Any]:
    # One (norm, micro-batch, seed) run in a worker process: one thread each, digits decoded once per worker.
    norm, mb, seed, steps, image_size, limit_per_class, threads, train_kw = job
    torch.set_num_threads(threads)
    key = (image_size, limit_per_class)
    if key not in _WORKER_DATA:
        _WORKER_DATA[key] = load_digits(image_size, limit_per_class)
    return train_one(norm, mb, _WORKER_DATA[key], steps, seed=seed, **train_kw)


def run(
    norms: tuple[str, ...] = NORMS,
    micro_batches: tuple[int, ...] = MICRO_BATCHES,
    steps: int = 400,
    seeds: tuple[int, ...] = (0,),
    image_size: int = 16,
    limit_per_class: int | None = None,
    log=print,  # noqa: ANN001
    workers: int = 1,
    threads: int = 1,
    **train_kw: Any,
) -> dict[str, Any]:
    """Every (norm, micro-batch, seed) run; returns the config and a list of per-run metrics.

    The runs are independent (same seed => same init and batch sequence whatever the process), so with
    workers > 1 they are spread over processes of `threads` threads each. One thread per run is much faster
    than two for these tiny models: per-op thread synchronisation dominates at micro-batch 1.
    """
    data = load_digits(image_size, limit_per_class)  # also creates the PNG export once, before any worker
    log(f"digits: {len(data.x_train)} train / {len(data.x_val)} val images at {image_size}px")
    # Longest jobs first (small micro-batches, PN) so the pool ends evenly.
    jobs = [(norm, mb, seed, steps, image_size, limit_per_class, threads, train_kw)
            for mb in sorted(micro_batches) for norm in norms for seed in seeds]

    def report(r: dict[str, Any]) -> None:
        log(f"  {r['norm']:6s} micro-batch {r['micro_batch']:2d} (x{r['accum']:2d} accumulation) seed {r['seed']}: "
            f"val acc {100 * r['val_acc']:.1f}%  train loss {r['train_loss_end']:.3f}  ({r['train_s']:.0f} s)")

    runs = []
    if workers <= 1:
        torch.set_num_threads(threads)
        for job in jobs:
            norm, mb, seed = job[:3]
            runs.append(train_one(norm, mb, data, steps, seed=seed, **train_kw))
            report(runs[-1])
    else:
        import multiprocessing as mp  # noqa: PLC0415
        from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: PLC0415

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_job, job) for job in jobs]
            for fut in as_completed(futures):
                runs.append(fut.result())
                report(runs[-1])
    order = {(n, m, s): i for i, (n, m, s, *_) in enumerate(jobs)}
    runs.sort(key=lambda r: order[(r["norm"], r["micro_batch"], r["seed"])])
    return {"config": {"norms": list(norms), "micro_batches": list(micro_batches), "steps": steps,
                       "seeds": list(seeds), "global_batch": GLOBAL_BATCH, "image_size": image_size,
                       "limit_per_class": limit_per_class, "n_train": len(data.x_train), "n_val": len(data.x_val),
                       **train_kw},
            "runs": runs}


def _mean_acc(result: dict[str, Any], norm: str, mb: int) -> tuple[float, float]:
    accs = [r["val_acc"] for r in result["runs"] if r["norm"] == norm and r["micro_batch"] == mb]
    mean = sum(accs) / len(accs)
    std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
    return mean, std


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: validation accuracy (%) per norm (rows) and micro-batch (columns)."""
    cfg = result["config"]
    mbs = cfg["micro_batches"]
    lines = ["| norm | " + " | ".join(f"micro-batch {m} (x{cfg['global_batch'] // m})" for m in mbs) + " |",
             "|---|" + "---:|" * len(mbs)]
    multi = len(cfg["seeds"]) > 1
    for norm in cfg["norms"]:
        cells = []
        for m in mbs:
            mean, std = _mean_acc(result, norm, m)
            cells.append(f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if multi else ""))
        label = LABELS.get(norm, norm.upper())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Validation accuracy vs micro-batch (log2 x axis), one line per norm."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cfg = result["config"]
    mbs = cfg["micro_batches"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for norm in cfg["norms"]:
        stats = [_mean_acc(result, norm, m) for m in mbs]
        label = LABELS.get(norm, norm.upper())
        ax.errorbar(mbs, [100 * s[0] for s in stats], yerr=[100 * s[1] for s in stats] if len(cfg["seeds"]) > 1
                    else None, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(mbs)
    ax.set_xticklabels([str(m) for m in mbs])
    ax.set_xlabel(f"micro-batch size (gradient accumulation to global batch {cfg['global_batch']})")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"sklearn digits, {cfg['steps']} optimizer steps, {len(cfg['seeds'])} seed(s)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point (see module docstring)."""
    p = argparse.ArgumentParser(prog="python -m ipu_norm.experiments.batch_dependence",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (a few minutes)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 400, --quick 100)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--norms", nargs="+", default=list(NORMS), choices=ALL_NORMS)
    p.add_argument("--micro-batches", type=int, nargs="+", default=list(MICRO_BATCHES))
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--agc-clip", type=float, default=0.04, help="AGC clip factor of the NF model (batch 32)")
    p.add_argument("--nf-lr", type=float, default=0.4, help="peak LR of the NF model (AGC-stabilised)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--limit-per-class", type=int, default=None, help="use only N digits per class (smoke tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest for these models)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (processes); 1 = in this process")
    p.add_argument("--out", default="docs/results")
    args = p.parse_args(argv)
    steps = args.steps or (100 if args.quick else 400)
    t0 = time.perf_counter()
    result = run(tuple(args.norms), tuple(args.micro_batches), steps, tuple(args.seeds), args.image_size,
                 args.limit_per_class, workers=args.workers, threads=args.threads, lr=args.lr,
                 agc_clip=args.agc_clip, nf_lr=args.nf_lr)
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "batch_dependence.png")
    table = format_table(result)
    (out / "batch_dependence.md").write_text(table + "\n")
    (out / "batch_dependence.json").write_text(json.dumps(result, indent=1))
    print(table)
    print(f"\n({result['wall_s']:.0f} s) wrote {out / 'batch_dependence.png'}, {out / 'batch_dependence.md'}, "
          f"{out / 'batch_dependence.json'}")
    return result


if __name__ == "__main__":
    main()
