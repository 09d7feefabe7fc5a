#!/usr/bin/env python
"""Train a CNN from a YAML config: ``python run_train.py --config configs/effnet_b0_proxy.yml [--max-steps 20]``.

Several processes (CPU or GPUs): ``torchrun --nproc_per_node=N run_train.py --config ...``.
See README.md for the configs and flags; ``--help`` lists the flags.
"""

from __future__ import annotations

import sys

from ipu_norm.config.cli import parse_args
from ipu_norm.config.loader import ConfigError, config_to_dict


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

    try:
        result = train_and_finetune(cfg, resume=args.resume, finetune_from=args.finetune_from)
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
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not result.is_main:
        return 0
    metrics = {k: v for k, v in result.final_metrics.items() if k not in ("kind", "time_s")}
    print(f"done: {result.global_step} steps, {result.epoch} epochs; {metrics}; run dir {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
