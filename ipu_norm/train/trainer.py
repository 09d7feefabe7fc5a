"""The training loop, independent of the device: data, steps, schedule, EMA, validation, checkpoints.

``train(cfg, resume=...)`` runs one training job as configured (``run_train.py`` calls it) and returns
the final metrics. Device work goes through a ``Backend`` (``backend.py``); data comes from
``ipu_norm.data`` (resumable sampler, per-sample seeded augmentation, Mixup/CutMix with its own generator),
so a run interrupted and resumed reproduces an uninterrupted one on CPU.

One optimizer step consumes ``gradient_accumulation`` micro-batches of ``micro_batch_size`` on each of
the ``world_size`` processes (torchrun) - the global batch. An epoch is ``floor(micro-batches per
process / gradient_accumulation)`` steps; the leftover micro-batches of an epoch are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ipu_norm.config.loader import config_to_dict, dump_config
from ipu_norm.config.schema import Config
from ipu_norm.data.datasets import IGNORE_TARGET
from ipu_norm.data.mixup import mix_keeping_dtype
from ipu_norm.train.backend import Backend, TrainSpec, get_backend, resolve_device
from ipu_norm.train.builders import (
    build_criterion,
    build_model,
    build_optimizer,
    build_scheduler,
    image_sizes,
)
from ipu_norm.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_latest_good,
    restore_rng_state,
    save_checkpoint,
)
from ipu_norm.train.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from ipu_norm.train.interrupt import StopRequest, TrainingInterrupted, shield_loader_workers, starting_workers
from ipu_norm.train.metrics import MetricsLogger, topk_correct
from ipu_norm.train.progress import RunBar, validation_progress
from ipu_norm.train.run_dir import check_new_run, check_resume, move_aside, new_run_id, read_run_id, write_run_info
from ipu_norm.train.tracking import Tracker


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped: the loss/gradients stayed non-finite, or the weights became non-finite (nothing saved)."""


@dataclasses.dataclass
class RunResult:
    """What a finished ``train`` call reports."""

    global_step: int
    epoch: int  # epochs completed
    final_metrics: dict[str, Any]
    run_dir: Path
    last_checkpoint: Path | None
    is_main: bool = True  # rank 0 (the process that writes files and prints)
    wall_s: float | None = None  # seconds since the run started (over all its resumed parts)
    train_img_per_s: float | None = None  # training throughput of this process's part of the run (all ranks)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing python/numpy/torch(CPU) RNG states (evaluation must not perturb training)."""
    py, nps = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(nps)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Holds the objects of one run; ``fit()`` trains. Use ``train(cfg)`` unless you need the pieces."""

    def __init__(
        self,
        cfg: Config,
        *,
        resume: str | None = None,
        log: Callable[[str], None] | None = None,
        backend: Backend | None = None,
        model_hook: Callable[[nn.Module], None] | None = None,
        overwrite: bool = False,
        resume_any: bool = False,
    ) -> None:
        """``overwrite``: a new run may replace (move aside) a run in the output dir; ``resume_any``: accept a
        checkpoint of another run or config (see ``run_dir.py``)."""
        from ipu_norm.core.plan import build_plan
        from ipu_norm.data import DeviceInput, MixupCutmix, ResumableSampler, build_dataset, build_loader, mix_seed

        self.cfg = cfg = dataclasses.replace(cfg)  # shallow copy: the device/precision may be resolved below
        cfg.execution = dataclasses.replace(cfg.execution, device=resolve_device(cfg.execution.device))
        self.dist: DistInfo = init_distributed(cfg.execution.device)
        self.is_main = self.dist.is_main
        self._log = log or (lambda msg: print(msg, flush=True))
        t, d = cfg.train, cfg.data
        self.run_dir = Path(t.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._t_start, self._elapsed_before = time.perf_counter(), 0.0
        self._resume_any = resume_any
        # A new run never writes into another run's directory (checked before anything is built or written).
        self._move_old_run = resume is None and check_new_run(self.run_dir, overwrite=overwrite)
        barrier(self.dist)  # every rank has checked before rank 0 writes anything there
        self.run_id = new_run_id()

        if cfg.execution.device == "cpu" and cfg.execution.precision in ("16.32", "16.16"):
            self.log(
                f"NOTE: execution.precision={cfg.execution.precision} is an fp16 IPU/GPU setting; running fp32 "
                "(32.32) on CPU. Use 'bf16' for reduced precision on CPU."
            )
            cfg.execution = dataclasses.replace(cfg.execution, precision="32.32")
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

        # ---------------------------------------------------------------- model (same init on every rank)
        seed_everything(t.seed)
        self.backend: Backend = backend or get_backend(cfg, self.dist)
        self.model: nn.Module = build_model(cfg.model)
        if model_hook is not None:  # e.g. load weights and freeze layers (fine-tuning), before anything wraps it
            model_hook(self.model)
        self.train_size, self.test_size = image_sizes(d, self.model)

        # ---------------------------------------------------------------- batch arithmetic / execution plan
        # On CPU/GPU the data-parallel size is the torchrun world size (execution.replicas is IPU-only).
        replicas = cfg.execution.replicas if cfg.execution.device == "ipu" else self.dist.world_size
        if cfg.execution.device != "ipu" and cfg.execution.replicas not in (1, self.dist.world_size):
            self.log(
                f"NOTE: execution.replicas={cfg.execution.replicas} applies to IPUs; on {cfg.execution.device} the "
                f"data-parallel size is the torchrun world size ({self.dist.world_size})"
            )
        self.plan = build_plan(dataclasses.replace(cfg.execution, replicas=replicas), self.model, t, seed=t.seed)
        self.accum = self.plan.gradient_accumulation
        self.micro = t.micro_batch_size
        self.global_batch = self.plan.global_batch_size
        if cfg.execution.device != "ipu" and self.plan.pipelined:
            self.log("NOTE: pipeline_splits are an IPU feature; the CPU/GPU backend runs the whole model per device")

        # ---------------------------------------------------------------- data
        if d.dataset == "generated":
            self.log(
                "NOTE: using GENERATED data (random images with a weak class pattern; no dataset on disk). "
                "Accuracy numbers are not meaningful. Set data.dataset: imagefolder and data.root (or --data / "
                "--data-root) to train on real images."
            )
        common = dict(
            root=d.root,
            image_size=self.train_size,
            test_size=self.test_size,
            num_classes=cfg.model.num_classes,
            seed=t.seed,
            digits_image_size=d.digits_image_size,
        )
        num_workers = min(d.num_workers, os.cpu_count() or 1)
        if num_workers < d.num_workers:
            self.log(f"NOTE: data.num_workers={d.num_workers} > {num_workers} CPU cores; using {num_workers} workers")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.train_set = build_dataset(
                d.dataset, "train", generated_samples=d.generated_samples, train_augment=d.train_augment, **common
            )
            self.val_set = build_dataset(d.dataset, "val", generated_samples=d.generated_val_samples, **common)
        self._report_dataset_warnings(caught)
        self.sampler = ResumableSampler(
            len(self.train_set),
            shuffle=True,
            seed=t.seed,
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
            drop_last=True,
        )
        self.train_loader = build_loader(
            self.train_set,
            batch_size=self.micro,
            sampler=self.sampler,
            num_workers=num_workers,
            drop_last=True,
            seed=mix_seed(t.seed, 1, self.dist.rank),
            pin_memory=cfg.execution.device == "cuda",
        )
        val_sampler = ResumableSampler(
            len(self.val_set),
            shuffle=False,
            seed=t.seed,
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
            drop_last=False,
        )
        self.val_loader = build_loader(
            self.val_set,
            batch_size=d.val_batch_size or self.micro,
            sampler=val_sampler,
            num_workers=num_workers,
            drop_last=False,
            seed=mix_seed(t.seed, 2, self.dist.rank),
            pin_memory=cfg.execution.device == "cuda",
        )
        for loader in (self.train_loader, self.val_loader):
            shield_loader_workers(loader)  # a signal to the process group is the main process's to handle
            if d.worker_start_method is not None and num_workers > 0:
                loader.multiprocessing_context = d.worker_start_method
        # One backend call consumes `micro_per_call` micro-batches of this process and makes `steps_per_call`
        # optimizer steps: 1 step of `accum` micro-batches on CPU/GPU; on IPUs, device_iterations steps over
        # this process's replicas (PopTorch runs the whole loop on the device).
        if cfg.execution.device == "ipu":
            self.steps_per_call = self.plan.device_iterations
            local_replicas = max(1, self.plan.replicas // self.dist.world_size)
            self.micro_per_call = self.accum * local_replicas * self.steps_per_call
        else:
            self.steps_per_call, self.micro_per_call = 1, self.accum
        self.calls_per_epoch = (self.sampler.num_samples // self.micro) // self.micro_per_call
        self.steps_per_epoch = self.calls_per_epoch * self.steps_per_call
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training set ({len(self.train_set)} samples) is smaller than one global batch "
                f"({self.global_batch} = micro {self.micro} x accumulation {self.accum} x {replicas} workers); "
                "use a smaller train.global_batch_size / micro_batch_size or more data"
            )
        self.total_steps = t.epochs * self.steps_per_epoch

        # ---------------------------------------------------------------- optimisation
        criterion, self.soft_targets = build_criterion(cfg)
        self.mixup = None
        if self.soft_targets:
            self.mixup = MixupCutmix(
                mixup_alpha=t.mixup_alpha,
                cutmix_alpha=t.cutmix_alpha,
                label_smoothing=t.label_smoothing,
                num_classes=cfg.model.num_classes,
                seed=mix_seed(t.seed, 3, self.dist.rank),
            )
        self.model.to(self.backend.device)
        # uint8 image batches are normalised on the device (a backend that takes 8-bit input normalises them itself).
        self.device_input = DeviceInput(self.backend.device, keep_uint8=getattr(self.backend, "accepts_uint8", False))
        self._data_wait = 0.0  # seconds blocked on the loader since the last metrics row
        self.optimizer = build_optimizer(cfg.optim, self.model, self.global_batch)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.steps_per_epoch, t.epochs)
        step_agc = cfg.optim.agc_clip if cfg.optim.agc_scope == "step" else None
        if cfg.optim.agc_clip is not None and cfg.optim.agc_scope == "micro_batch":
            self._enable_micro_batch_agc()
        spec = TrainSpec(criterion=criterion, agc_clip=step_agc, agc_eps=cfg.optim.agc_eps)
        self.backend.prepare(self.model, self.optimizer, self.plan, spec)
        expected = getattr(self.backend, "micro_batches_per_step", self.micro_per_call)
        if expected != self.micro_per_call:
            raise RuntimeError(
                f"backend {self.backend.name} consumes {expected} micro-batches per call but the trainer computed "
                f"{self.micro_per_call} (accumulation {self.accum}, {self.dist.world_size} processes)"
            )
        self.ema = None
        if t.ema_decay is not None:
            from ipu_norm.train.ema import ModelEma

            self.ema = ModelEma(self.model, t.ema_decay, warmup=t.ema_warmup)

        # Training randomness (dropout, stochastic depth) differs per rank; the model init above did not.
        if self.dist.enabled:
            torch.manual_seed(mix_seed(t.seed, 4, self.dist.rank))

        # ---------------------------------------------------------------- progress / resume
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of `epoch` this process has consumed
        self.samples_seen = 0
        self.last_checkpoint: Path | None = None
        self._train_samples, self._train_seconds = 0, 0.0  # this process's training throughput (summary)
        self._last_saved_step = -1
        self._bad_steps: list[int] = []  # the current run of consecutive non-finite / skipped steps
        self._metrics_offsets: dict[str, int] | None = None  # what this run dir had logged at the resumed checkpoint
        self._last_validation: dict[str, Any] = {}  # the newest validation record (saved in checkpoints)
        if resume is not None:
            self._resume(resume)
        if self._move_old_run and self.is_main:
            self.log(f"--overwrite: moved the previous run in {self.run_dir} to {move_aside(self.run_dir)}")
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main)
        if self._metrics_offsets is not None:
            self.metrics.truncate(self._metrics_offsets)  # rows after the checkpoint are logged again below
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_info(self.run_dir, self.run_id)
            dump_config(cfg, self.run_dir / "config.yaml")
        self.tracker = Tracker(
            self.run_dir,
            tensorboard=t.tensorboard,
            wandb=t.wandb,
            wandb_project=t.wandb_project,
            run_id=self.run_id,
            config=config_to_dict(cfg),
            purge_step=self.global_step if resume is not None else None,
            enabled=self.is_main,
            log=self.log,
        )
        norm = (getattr(self.model, "default_cfg", None) or {}).get("norm", cfg.model.norm)
        self.log(
            f"model {cfg.model.name} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, "
            f"norm {norm}) on {self.backend.name} | train {self.train_size}px / "
            f"test {self.test_size}px | {len(self.train_set)} train, {len(self.val_set)} val samples | "
            f"global batch {self.global_batch} = micro {self.micro} x accum {self.accum} x {replicas} | "
            f"{self.steps_per_epoch} steps/epoch x {t.epochs} epochs"
            + (f" (capped at {t.max_steps} steps)" if t.max_steps else "")
            + f" | lr {self.optimizer.param_groups[0]['initial_lr']:.4g} | run dir {self.run_dir}"
        )
        if cfg.execution.device == "ipu":
            self.log(f"plan: {self.plan.describe()}")
        else:
            self.log(f"device: {_describe_device(self.backend.device, cfg.execution.precision)}")

    def _elapsed(self) -> float:
        """Seconds since the run started, over all its resumed parts (the metrics' ``time_s``)."""
        return self._elapsed_before + time.perf_counter() - self._t_start

    def _record(self, record: dict[str, Any]) -> None:
        """Log one metrics record to the files and the trackers."""
        self.metrics.log(record)
        self.tracker.log(record)

    def _report_dataset_warnings(self, caught: list[warnings.WarningMessage]) -> None:
        """Class-count warnings of the datasets as one NOTE line; other warnings shown as usual."""
        notes = []
        for w in caught:
            if "num_classes" in str(w.message):
                notes.append(str(w.message))
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if notes:
            self.log(
                "NOTE: " + "; ".join(dict.fromkeys(notes)) + " (the outputs of the missing classes are never a target)"
            )

    # ---------------------------------------------------------------------------------- helpers

    def log(self, msg: str) -> None:
        """Print on rank 0 only."""
        if self.is_main:
            self._log(msg)

    def _enable_micro_batch_agc(self) -> None:
        """``optim.agc_scope: micro_batch``: the Scaled-WS convs clip each micro-batch's gradient (ops.agc_micro)."""
        from ipu_norm.optim.agc_scope import enable_micro_batch_agc, micro_batch_loss_scale

        o, ex = self.cfg.optim, self.cfg.execution
        loss_scale = micro_batch_loss_scale(ex.device, ex.precision, self.plan.loss_scaling, self.micro_per_call)
        layers = enable_micro_batch_agc(self.model, o.agc_clip, o.agc_eps, loss_scale)
        self.log(f"AGC per micro-batch (clip {o.agc_clip}) on the parameters of {len(layers)} Scaled-WS convs")

    def _resume(self, resume: str) -> None:
        """Restore a checkpoint: 'latest' (this run's directory), a run/checkpoint directory, or a file."""
        if resume == "latest" or Path(resume).is_dir():
            where = self.ckpt_dir if resume == "latest" else Path(resume)
            if (where / "checkpoints").is_dir():
                where = where / "checkpoints"
            found = load_latest_good(where, report=self.log)
            if found is None:
                if resume != "latest":
                    raise CheckpointError(f"--resume {resume}: no usable checkpoint in {where}")
                self.log(f"NOTE: --resume: no usable checkpoint in {where}; starting from scratch")
                self._metrics_offsets = {"metrics.jsonl": 0, "metrics.csv": 0}  # rows of steps done again
                self.run_id = read_run_id(self.run_dir) or self.run_id
                return
            path, state = found
        else:
            path = Path(resume)
            state = load_checkpoint(path)
        self.run_id = check_resume(
            state, path, run_dir=self.run_dir, config=config_to_dict(self.cfg), resume_any=self._resume_any
        )
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.backend.load_state_dict(state.get("backend") or {})
        if self.ema is not None:
            if state.get("ema") is None:
                raise CheckpointError(f"{path}: has no EMA state but train.ema_decay is set")
            self.ema.module.load_state_dict(state["ema"])
        progress = state["progress"]
        self.global_step = int(progress["global_step"])
        self.epoch = int(progress["epoch"])
        self.batch_in_epoch = int(progress["batch_in_epoch"])
        self.samples_seen = int(progress.get("samples_seen", 0))
        ranks = state.get("rank_states") or []
        if len(ranks) == self.dist.world_size:
            mine = ranks[self.dist.rank]
            restore_rng_state(mine["rng"])
            if self.mixup is not None and mine.get("mixup") is not None:
                self.mixup.load_state_dict(mine["mixup"])
        else:
            self.log(
                f"NOTE: checkpoint was written by {len(ranks)} processes, this run has {self.dist.world_size}: RNG "
                "streams are re-seeded (training continues correctly but not bit-identically)"
            )
        self.last_checkpoint = path
        self._last_saved_step = self.global_step
        if path.parent.resolve() == self.ckpt_dir.resolve():
            self._metrics_offsets = state.get("metrics_offsets")
        self._last_validation = dict(state.get("last_validation") or {})
        self.log(
            f"resumed from {path}: step {self.global_step}, epoch {self.epoch}, "
            f"micro-batch {self.batch_in_epoch} of the epoch"
        )

    def _check_finite_weights(self) -> None:
        """Refuse to checkpoint nan/inf weights: that would replace the last good checkpoint with a useless one."""
        bad = [n for n, p in self.model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteTrainingError(
                f"model weights are non-finite at step {self.global_step} ({len(bad)} tensors, e.g. {bad[0]}); "
                f"not saving a checkpoint; the last good one is kept: {self.last_checkpoint or 'none yet'}"
            )

    def _note_bad_step(self, loss: float) -> None:
        """Count a step with a non-finite loss or a skipped update; stop after train.max_nonfinite_steps in a row."""
        self._bad_steps.append(self.global_step)
        limit = self.cfg.train.max_nonfinite_steps
        if limit is not None and len(self._bad_steps) >= limit:
            raise NonFiniteTrainingError(
                f"training stopped: {len(self._bad_steps)} consecutive steps ({self._bad_steps[0]}-{self.global_step}) "
                f"had a non-finite loss or inf/nan gradients (last loss {loss}); no checkpoint was written since; "
                f"last good checkpoint: {self.last_checkpoint or 'none'} "
                "(train.max_nonfinite_steps; try a lower optim.lr, AGC, or fp32)"
            )
        what = f"loss {loss}" if not math.isfinite(loss) else "inf/nan gradients"
        why = " (fp16 loss scaling lowers its scale)" if self.backend_uses_loss_scaling else ""
        self.log(f"NOTE: step {self.global_step}: {what}, update skipped{why}")

    @property
    def backend_uses_loss_scaling(self) -> bool:
        """Whether the backend runs a GradScaler (its overflow skips are routine, not faults)."""
        return getattr(self.backend, "scaler", None) is not None

    def save(self) -> Path | None:
        """Write a checkpoint of the current state (collective: every rank must call it)."""
        rank_state = {"rng": capture_rng_state(), "mixup": self.mixup.state_dict() if self.mixup else None}
        rank_states = all_gather_object(rank_state, self.dist)
        self.backend.sync_to_host()
        self._check_finite_weights()  # after the device->host copy; the same weights (and verdict) on every rank
        path = None
        if self.is_main:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "backend": self.backend.state_dict(),
                "rank_states": rank_states,
                "progress": {
                    "global_step": self.global_step,
                    "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch,
                    "samples_seen": self.samples_seen,
                },
                "sampler": self.sampler.state_dict(),
                "metrics_offsets": self.metrics.offsets(),
                "last_validation": self._last_validation,
                "world_size": self.dist.world_size,
                "config": config_to_dict(self.cfg),
                "run_id": self.run_id,
                "elapsed_s": self._elapsed(),
            }
            path = save_checkpoint(state, self.ckpt_dir, self.global_step, self.cfg.train.keep_checkpoints)
            self.last_checkpoint = path
        self._last_saved_step = self.global_step
        barrier(self.dist)
        return path

    # ---------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, models: list[tuple[str, nn.Module | None]] | None = None) -> dict[str, float]:
        """Top-1/top-5 (and loss) on the validation set, for the model and its EMA; summed over ranks.

        ``models``: (metric prefix, module) pairs to evaluate instead (None = the trained model).

        Under torchrun each rank evaluates its shard; like DistributedSampler, the shards are padded to equal
        length by repeating a few samples when the set does not divide evenly (a bias of < world_size samples).
        """
        self.backend.sync_to_host()
        if models is None:
            models = [("", None)] + ([("ema_", self.ema.module)] if self.ema is not None else [])
        totals = {prefix: [0.0, 0.0, 0.0] for prefix, _ in models}  # top1, top5, loss sum
        count = unreadable = 0
        # One model at a time over the whole set: the IPU backend swaps each model's weights into its one inference
        # executor once per evaluation, not once per batch.
        show_bar = self.is_main and self.cfg.train.progress_bar
        for prefix, module in models:
            with preserved_rng():
                self.val_loader.sampler.set_epoch(0)
                with starting_workers():  # workers started here ignore a signal to the process group
                    batches = iter(self.val_loader)
                label = "validate" + (f" {prefix.rstrip('_')}" if prefix else "")  # "validate", "validate ema"
                for images, labels in validation_progress(batches, len(self.val_loader), bar=show_bar, log=self.log,
                                                          label=label):
                    images = self.device_input(images)
                    if prefix == models[0][0]:
                        # Stand-ins for unreadable files carry IGNORE_TARGET: out of the count (never correct in
                        # topk_correct, ignored by cross_entropy's default ignore_index).
                        bad = int((labels == IGNORE_TARGET).sum())
                        unreadable += bad
                        count += labels.shape[0] - bad
                    logits = self.backend.eval_step(images, module).cpu()
                    c1, c5 = topk_correct(logits, labels, (1, 5))
                    loss = nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                    totals[prefix][0] += c1
                    totals[prefix][1] += c5
                    totals[prefix][2] += loss
        flat = [count, unreadable] + [v for prefix, _ in models for v in totals[prefix]]
        flat = all_reduce_sum(flat, self.dist)
        n = max(flat[0], 1.0)
        out: dict[str, float] = {}
        if flat[1]:
            self.log(f"WARNING: validation skipped {int(flat[1])} unreadable image(s) (see the log for their paths)")
        for i, (prefix, _) in enumerate(models):
            c1, c5, loss = flat[2 + 3 * i : 5 + 3 * i]
            out[f"{prefix}top1"] = 100.0 * c1 / n
            out[f"{prefix}top5"] = 100.0 * c5 / n
            out[f"{prefix}val_loss"] = loss / n
        if flat[1]:
            out["val_unreadable"] = flat[1]  # only when it happened: the usual record keeps its keys
        return out

    # ---------------------------------------------------------------------------------- training

    def _micro_batches(self, it: Iterator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`micro_per_call` micro-batches from `it`, whose batches are micro-batches or (the IPU backend's
        poptorch.DataLoader) whole host calls, split here into micro-batch views."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        while len(out) < self.micro_per_call:
            t0 = time.perf_counter()
            images, labels = next(it)
            self._data_wait += time.perf_counter() - t0
            for x, y in zip(images.split(self.micro), labels.split(self.micro)):
                x = self.device_input(x)
                if self.mixup is not None:
                    x, y = mix_keeping_dtype(self.mixup, x, y)
                out.append((x, y))
        return out

    def fit(self) -> RunResult:
        """Train to ``train.epochs`` (or ``train.max_steps``); validate, log and checkpoint on the way."""
        t = self.cfg.train
        max_steps = t.max_steps
        stop = max_steps is not None and self.global_step >= max_steps
        interrupted = False  # SIGINT/SIGTERM: checkpoint at the next step boundary, then TrainingInterrupted
        stop_request = StopRequest()
        stop_request.install()
        run_steps = min(self.total_steps, max_steps) if max_steps is not None else self.total_steps
        bar = RunBar(run_steps, min(self.global_step, run_steps), t.epochs, enabled=self.is_main and t.progress_bar)
        try:
            while self.epoch < t.epochs and not stop and not interrupted:
                epoch = self.epoch
                self.sampler.set_epoch(epoch)
                self.sampler.set_start_batch(self.batch_in_epoch, self.micro)
                start_call = self.batch_in_epoch // self.micro_per_call
                # The IPU backend loads each epoch through its own poptorch.DataLoader (whole host calls); its
                # loading process starts when it is built.
                epoch_loader = getattr(self.backend, "epoch_loader", None)
                with starting_workers():  # workers started here ignore a signal to the process group
                    loader = epoch_loader(self.train_loader) if epoch_loader is not None else self.train_loader
                    it = iter(loader)
                window_loss, window_steps, window_samples, window_t0 = 0.0, 0, 0, time.perf_counter()
                self._data_wait = 0.0
                save_after_validation = False
                for call in range(start_call, self.calls_per_epoch):
                    step_t0 = time.perf_counter()
                    micro_batches = self._micro_batches(it)
                    result = self.backend.train_step(micro_batches)
                    for _ in range(self.steps_per_call):
                        self.scheduler.step()
                    self.backend.lr_changed()
                    prev_step = self.global_step
                    self.global_step += self.steps_per_call
                    self.batch_in_epoch = (call + 1) * self.micro_per_call
                    self.samples_seen += result.samples * self.dist.world_size
                    if self.ema is not None:
                        self.backend.sync_to_host()
                        self.ema.update(self.model, self.global_step - 1)  # ModelEma counts steps from 0
                    if result.skipped or not math.isfinite(result.loss):
                        self._note_bad_step(result.loss)
                    else:
                        self._bad_steps.clear()
                    if math.isfinite(result.loss):
                        window_loss += result.loss
                        window_steps += 1
                    window_samples += result.samples * self.dist.world_size
                    self._train_samples += result.samples * self.dist.world_size
                    self._train_seconds += time.perf_counter() - step_t0
                    elapsed = time.perf_counter() - window_t0
                    ips = window_samples / elapsed if elapsed > 0 else 0.0
                    lr = self.optimizer.param_groups[0]["lr"]
                    wait_frac = self._data_wait / elapsed if elapsed > 0 else 0.0  # input-bound when large
                    bar.update(self.steps_per_call, epoch=epoch + 1, loss=result.loss, lr=lr, img_s=ips,
                               data_wait=wait_frac)
                    last_in_epoch = call + 1 == self.calls_per_epoch
                    stop = max_steps is not None and self.global_step >= max_steps
                    if _crossed(prev_step, self.global_step, t.log_every_steps) or last_in_epoch or stop:
                        avg_loss = window_loss / window_steps if window_steps else float("nan")  # all skipped: nan
                        record = {
                            "kind": "train",
                            "epoch": epoch + 1,  # 1-based, like the progress bar and the log lines
                            "step": self.global_step,
                            "loss": avg_loss,
                            "lr": lr,
                            "img_per_s": ips,
                            # per optimizer step (window_samples / global_batch steps in this window)
                            "data_wait_s": self._data_wait * self.global_batch / max(window_samples, 1),
                            "data_wait_frac": wait_frac,
                            "samples": self.samples_seen,
                            "time_s": round(self._elapsed(), 3),  # seconds since the run started
                            "unix_time": round(time.time(), 3),  # when (jsonl only: to match other logs)
                        }
                        if self.backend_uses_loss_scaling:
                            record["loss_scale"] = float(self.backend.scaler.get_scale())
                        clip_fraction = getattr(result, "agc_clip_fraction", None)  # when the backend reports it
                        if clip_fraction is not None:
                            record["agc_clip_fraction"] = float(clip_fraction)
                        self._record(record)
                        if not bar.enabled:
                            self.log(
                                f"epoch {epoch + 1}/{t.epochs} step {self.global_step}/{run_steps} "
                                f"loss {avg_loss:.4f} lr {lr:.4g} {ips:.1f} img/s data wait {wait_frac:.0%}"
                            )
                        window_loss, window_steps, window_samples, window_t0 = 0.0, 0, 0, time.perf_counter()
                        self._data_wait = 0.0
                    if last_in_epoch:
                        self.epoch, self.batch_in_epoch = epoch + 1, 0
                    interrupted = stop_request.should_stop(self.dist) and not stop  # collective under torchrun
                    due = (
                        t.checkpoint_every_steps
                        and _crossed(prev_step, self.global_step, t.checkpoint_every_steps)
                        and not self._bad_steps  # no scheduled checkpoint in the middle of a non-finite streak
                    )
                    if (due or interrupted) and last_in_epoch:
                        save_after_validation = True  # after the epoch's validation, which a resume would skip
                    elif due or interrupted:
                        self.save()
                    if stop or interrupted:
                        break
                epoch_done = self.epoch > epoch
                if epoch_done:
                    final_epoch = self.epoch == t.epochs
                    if (t.val_every_epochs and self.epoch % t.val_every_epochs == 0) or final_epoch or stop:
                        self._validate(epoch)
                    no_schedule = t.checkpoint_every_steps is None and not self._bad_steps
                    if (no_schedule or save_after_validation) and self._last_saved_step != self.global_step:
                        self.save()
            if interrupted:
                if self._last_saved_step != self.global_step:
                    self.save()
                raise TrainingInterrupted(
                    stop_request.signum or 0, self.global_step, self.last_checkpoint, is_main=self.is_main
                )
            # _last_validation is restored on resume: a finished run is not validated again.
            if self._last_validation.get("step") != self.global_step:
                self._validate(self.epoch - 1 if self.batch_in_epoch == 0 else self.epoch)
            if self._last_saved_step != self.global_step:
                self.save()
            if t.weight_avg_strategy != "none":
                self._validate_weight_average()
        finally:
            bar.close()
            stop_request.uninstall()
            self.tracker.close()
            self.backend.close()
        ips = self._train_samples / self._train_seconds if self._train_seconds > 0 else None
        return RunResult(
            self.global_step,
            self.epoch,
            self._last_validation,
            self.run_dir,
            self.last_checkpoint,
            self.is_main,
            wall_s=self._elapsed(),
            train_img_per_s=ips,
        )

    def _validate(self, epoch: int) -> dict[str, Any]:
        """Evaluate and log after (0-based) epoch ``epoch``; records and lines say epoch ``epoch + 1``."""
        metrics = self.evaluate()
        record = {
            "kind": "val",
            "epoch": epoch + 1,
            "step": self.global_step,
            **metrics,
            "time_s": round(self._elapsed(), 3),
            "unix_time": round(time.time(), 3),
        }
        self._record(record)
        self._last_validation = record
        msg = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        when = f"after epoch {epoch + 1}" if self.batch_in_epoch == 0 else f"in epoch {epoch + 1}"
        self.log(f"validation {when} (step {self.global_step}): {msg}")
        return record

    def _validate_weight_average(self) -> None:
        """Average the saved checkpoints (``train.weight_avg_*``), save the average, validate it once."""
        import copy

        from ipu_norm.train.weight_avg import average_checkpoints, describe

        t = self.cfg.train
        weights, path, info = average_checkpoints(
            self.ckpt_dir, t.weight_avg_strategy, decay=t.weight_avg_exp_decay, last_n=t.weight_avg_N,
            save=self.is_main,
        )
        describe(info, self.log)
        averaged = copy.deepcopy(self.model)
        averaged.load_state_dict(weights)
        metrics = self.evaluate(models=[("", averaged)])
        epoch = self.epoch - 1 if self.batch_in_epoch == 0 else self.epoch
        self._record({"kind": "val_avg", "epoch": epoch + 1, "step": self.global_step, **metrics,
                      "time_s": round(self._elapsed(), 3), "unix_time": round(time.time(), 3)})
        self._last_validation = {**self._last_validation, **{f"avg_{k}": v for k, v in metrics.items()}}
        self.log(f"averaged weights ({path.name}): " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        barrier(self.dist)  # the averaged checkpoint is on disk before anyone reads it

    def close(self) -> None:
        """Stop the loaders' persistent workers and tear down the process group (if this trainer created it)."""
        for loader in (getattr(self, "train_loader", None), getattr(self, "val_loader", None)):
            shutdown = getattr(loader, "shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        cleanup_distributed(self.dist)


def _describe_device(device: torch.device, precision: str) -> str:
    """``cpu (2 threads), precision 32.32`` / ``cuda:0 (NVIDIA H100), precision bf16``."""
    if device.type == "cuda":
        what = f"{device} ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        what = f"cpu ({torch.get_num_threads()} threads)"
    else:
        what = str(device)
    return f"{what}, precision {precision}"


def _crossed(before: int, after: int, every: int) -> bool:
    """True when a multiple of ``every`` lies in (before, after] (steps may advance by more than 1 per call)."""
    return after // every > before // every


def train(
    cfg: Config,
    *,
    resume: str | None = None,
    log: Callable[[str], None] | None = None,
    model_hook: Callable[[nn.Module], None] | None = None,
    overwrite: bool = False,
    resume_any: bool = False,
) -> RunResult:
    """Run one training job: build everything from ``cfg``, optionally resume, train, return the result.

    ``model_hook(model)`` runs on the freshly built model before the optimizer and the backend see it.
    ``overwrite`` / ``resume_any``: see :class:`Trainer` and ``run_dir.py``.
    """
    trainer = Trainer(
        cfg, resume=resume, log=log, model_hook=model_hook, overwrite=overwrite, resume_any=resume_any
    )
    try:
        result = trainer.fit()
        if trainer.is_main:
            final = {**result.final_metrics, "global_step": result.global_step, "epochs_completed": result.epoch}
            final.update(wall_s=round(result.wall_s or 0.0, 3), train_img_per_s=result.train_img_per_s)
            (trainer.run_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        return result
    finally:
        trainer.close()
