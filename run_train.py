#!/usr/bin/env python
"""Train a CNN from a YAML config: ``python run_train.py --config configs/effnet_b0_proxy.yml [--max-steps 20]``.

Several processes (CPU or GPUs): ``torchrun --nproc_per_node=N run_train.py --config ...``.
See README.md for the configs and flags; ``--help`` lists the flags.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

from ipu_norm.config.cli import parse_args
from ipu_norm.config.loader import ConfigError, config_to_dict

if TYPE_CHECKING:
    from ipu_norm.train.trainer import RunResult


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    try:
        args, cfg, _ = parse_args(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.dry_run:
        from ipu_norm.ipu.dry_run import dry_run

        return dry_run(cfg)
    from ipu_norm.train.checkpoint import CheckpointError
    from ipu_norm.train.finetune import train_and_finetune
    from ipu_norm.train.interrupt import TrainingInterrupted
    from ipu_norm.train.trainer import NonFiniteTrainingError

    is_main = os.environ.get("RANK", "0") == "0"  # torchrun: errors that every rank hits are printed once
    if args.resume_any and args.resume is None:
        print("error: --resume-any only applies with --resume", file=sys.stderr)
        return 2
    try:
        result = train_and_finetune(
            cfg,
            resume=args.resume,
            finetune_from=args.finetune_from,
            overwrite=args.overwrite,
            resume_any=args.resume_any,
        )
    except TrainingInterrupted as exc:  # SIGINT/SIGTERM: a checkpoint was written at a step boundary
        if exc.is_main:  # one line per job, not per rank
            print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except (RuntimeError, ValueError, FileNotFoundError, NonFiniteTrainingError) as exc:
        # Start-up problems (missing SDK, bad dataset path, unusable checkpoint, inconsistent batch sizes), a
        # checkpoint that cannot be written (disk full, read-only) and a training stopped by persistent non-finite
        # losses get one clear line; other errors keep their traceback.
        expected = isinstance(exc, (ValueError, FileNotFoundError, CheckpointError, NonFiniteTrainingError)) or any(
            s in str(exc) for s in ("Poplar SDK", "execution.device")
        )
        if not expected:
            raise
        if is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    if not result.is_main:
        return 0
    print_summary(result)
    return 0


def print_summary(result: RunResult) -> None:
    """The closing table: accuracies (final, best, EMA), throughput, wall time, where the files are."""
    from ipu_norm.train.metrics import read_jsonl
    from ipu_norm.train.progress import summary_table

    final_path = result.run_dir / "final_metrics.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else dict(result.final_metrics)
    metrics_path = result.run_dir / "metrics.jsonl"
    records = read_jsonl(metrics_path) if metrics_path.exists() else []
    print(
        summary_table(
            final,
            run_dir=result.run_dir,
            checkpoint=result.last_checkpoint,
            records=records,
            tensorboard=(result.run_dir / "tb").is_dir(),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
