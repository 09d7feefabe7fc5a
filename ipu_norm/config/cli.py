"""Command line of run_train.py: ``--config``, ``--set section.key=value`` and dedicated flags.

Precedence, lowest to highest: schema defaults < YAML files (``base:`` chain) < ``--set`` < dedicated flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ipu_norm.config.loader import Sources, load_config_with_sources
from ipu_norm.config.schema import Config

# Dedicated flag (argparse dest) -> dotted config key it overrides.
FLAG_KEYS: dict[str, str] = {
    "device": "execution.device",
    "precision": "execution.precision",
    "max_steps": "train.max_steps",
    "epochs": "train.epochs",
    "micro_batch_size": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size",
    "output_dir": "train.output_dir",
    "seed": "train.seed",
    "data": "data.dataset",
    "data_root": "data.root",
    "num_workers": "data.num_workers",
    "worker_start_method": "data.worker_start_method",
    "wandb": "train.wandb",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of run_train.py."""
    p = argparse.ArgumentParser(
        prog="run_train.py",
        description="Train a CNN with batch-independent normalisation (GN/LN + Proxy Norm, NFNets + AGC, BN "
        "baselines) on CPU, CUDA GPUs (torchrun for several) or Graphcore IPUs.",
    )
    p.add_argument("--config", required=True, help="YAML config file (may inherit others with 'base:')")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.1 --set model.norm=gn+pn (value parsed as YAML)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "ipu"], help="execution.device")
    p.add_argument("--precision", help="execution.precision: 32.32, 16.32, 16.16 or bf16")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (train.max_steps)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--micro-batch-size", type=int, help="train.micro_batch_size")
    p.add_argument("--global-batch-size", type=int, help="train.global_batch_size")
    p.add_argument("--output-dir", help="run directory for checkpoints and metrics (train.output_dir)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--data", choices=["generated", "imagefolder", "digits"], help="data.dataset")
    p.add_argument(
        "--data-root",
        help="data.root; alone (no --data) on a config with generated data it means --data imagefolder",
    )
    p.add_argument("--num-workers", type=int, help="data.num_workers")
    p.add_argument(
        "--worker-start-method",
        choices=["fork", "spawn", "forkserver"],
        help="data.worker_start_method: how DataLoader workers start (default: the platform's)",
    )
    p.add_argument(
        "--wandb",
        action="store_const",
        const=True,
        default=None,
        help="also log to Weights & Biases (train.wandb; needs `pip install wandb`; WANDB_MODE=offline for local)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run even if the output dir holds one: the old run is renamed to <dir>.old-<date>-<time>",
    )
    p.add_argument(
        "--resume-any",
        action="store_true",
        help="with --resume: accept a checkpoint of another run or of a run with another config",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="resume from a checkpoint file or the latest good one in a run directory; without PATH: the latest "
        "good checkpoint in the output dir (a fresh start if there is none)",
    )
    p.add_argument(
        "--finetune-from",
        metavar="RUN_DIR",
        default=None,
        help="run only the fine-tuning stage at test resolution (the config's `finetune` section) on the finished "
        "run RUN_DIR (or a checkpoint file); output in RUN_DIR/finetune, --resume continues it",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="IPU configs: print the poptorch option calls, pipeline stages with estimated memory, optimizer, data "
        "path and batch arithmetic; with the Poplar SDK also compile; then exit without training",
    )
    return p


def config_from_args(args: argparse.Namespace) -> tuple[Config, Sources]:
    """Resolve the config of parsed arguments (YAML, then --set, then dedicated flags)."""
    flags: dict[str, Any] = {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            flags[key] = (value, "--" + dest.replace("_", "-"))
    if getattr(args, "data_root", None) is not None and getattr(args, "data", None) is None:
        # --data-root names a folder of images: on a config with generated data it means imagefolder (a digits or
        # imagefolder config keeps its dataset).
        peek, _ = load_config_with_sources(args.config, args.overrides, validate=False)
        if peek.data.dataset == "generated":
            flags["data.dataset"] = ("imagefolder", "--data-root")
    return load_config_with_sources(args.config, args.overrides, flags)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Config, Sources]:
    """Parse a command line into (args, validated config, key sources)."""
    args = build_parser().parse_args(argv)
    cfg, sources = config_from_args(args)
    return args, cfg, sources
