"""Fine-tuning at the test resolution: the last stage of Graphcore's half-resolution recipe.

EfficientNets trained at half resolution (B0: 160 px, evaluated at 224 px) end with a short fine-tuning stage
at the test resolution (Masters et al. 2021; REFERENCE.md: "then 2 epochs of fine-tuning at test
resolution"). It fixes the train/test mismatch of image statistics that the resolution change causes
(Touvron et al., "Fixing the train-test resolution discrepancy"). Graphcore's PyTorch application does it
as: start from the (weight-averaged) weights of the main run; SGD without momentum, cosine schedule, no
warmup; no mixup/cutmix; training images preprocessed like validation images (resize + centre crop at the
test size, no flip); every parameter registered before a "first trainable layer" frozen, and the BatchNorm
and dropout layers before it kept in eval mode.

Here the stage is one more ordinary training run (same trainer, backend, checkpoints, metrics and resume
logic) with a derived config (:func:`finetune_config`) and a model hook (:func:`prepare_model`) that loads
the main run's weights and freezes the early layers. It writes to ``<run dir>/finetune``. Two ways to run it:
``finetune.enabled: true`` (after the main training, same command) or ``run_train.py --config C
--finetune-from RUN_DIR`` (on a finished run; ``--resume`` continues an interrupted fine-tuning).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ipu_norm.config.schema import Config
from ipu_norm.layers.drop_path import DropPath
from ipu_norm.train.checkpoint import CheckpointError, load_checkpoint, load_latest_good
from ipu_norm.train.trainer import RunResult, train
from ipu_norm.train.weight_avg import find_averaged

FINETUNE_SUBDIR = "finetune"

# Layers whose train mode differs from eval mode (batch statistics, random masks): kept in eval when frozen.
_EVAL_PINNED: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    DropPath,
)


def resolve_image_size(cfg: Config) -> int:
    """The fine-tuning resolution: ``finetune.image_size``, else ``data.test_size``, else the model's test size."""
    if cfg.finetune.image_size is not None:
        return cfg.finetune.image_size
    if cfg.data.test_size is not None:
        return cfg.data.test_size
    from ipu_norm.train.builders import build_model, image_sizes

    return int(image_sizes(cfg.data, build_model(cfg.model))[1])  # the trainer's test size


def finetune_config(cfg: Config, run_dir: str | Path) -> Config:
    """The config of the fine-tuning stage of the run in ``run_dir`` (see the module docstring).

    Changed from ``cfg``: train and test size = :func:`resolve_image_size`; evaluation transform for the
    training images; optimizer, lr (per ``optim.lr_reference_batch``), momentum from ``finetune``, cosine to 0
    without warmup; no mixup/cutmix, no EMA, no weight averaging; epochs / max_steps / batch sizes from
    ``finetune``; output in ``run_dir/finetune``. ``finetune.enabled`` is cleared so that the stage does not
    chain itself.
    """
    f = cfg.finetune
    size = resolve_image_size(cfg)
    t = cfg.train
    train_cfg = dataclasses.replace(
        t,
        epochs=f.epochs,
        max_steps=f.max_steps,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        ema_decay=None,
        weight_avg_strategy="none",  # the main run's averaging already happened; the stage starts from it
        micro_batch_size=f.micro_batch_size or t.micro_batch_size,
        global_batch_size=f.global_batch_size or t.global_batch_size,
        output_dir=str(Path(run_dir) / FINETUNE_SUBDIR),
    )
    execution = cfg.execution
    if f.micro_batch_size is not None or f.global_batch_size is not None:
        # New batch sizes: let the accumulation be derived from them rather than clash with a fixed one.
        execution = dataclasses.replace(execution, gradient_accumulation=None)
    optim = dataclasses.replace(
        cfg.optim,
        name=f.optimizer,
        lr=f.lr,
        momentum=f.momentum,
        nesterov=False,
        schedule="cosine",
        warmup_epochs=0.0,
        min_lr=0.0,
    )
    data = dataclasses.replace(cfg.data, train_size=size, test_size=size, train_augment=False)
    return dataclasses.replace(
        cfg,
        train=train_cfg,
        optim=optim,
        data=data,
        execution=execution,
        finetune=dataclasses.replace(f, enabled=False),
    )


def find_source_checkpoint(source: str | Path, report: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to fine-tune from: a checkpoint file, or the latest good one of a run directory."""
    path = Path(source)
    if path.is_file():
        return path, load_checkpoint(path, resume=False)
    if not path.is_dir():
        raise CheckpointError(f"--finetune-from {source}: no such run directory or checkpoint file")
    where = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = load_latest_good(where, report=report, resume=False)
    if found is None:
        raise CheckpointError(f"--finetune-from {source}: no usable checkpoint in {where}")
    averaged = find_averaged(found[0])  # Graphcore fine-tunes from the averaged weights (train.weight_avg_*)
    return (averaged, load_checkpoint(averaged)) if averaged is not None else found


def _module_order(model: nn.Module, name: str) -> tuple[dict[str, int], int]:
    """(module name -> position in ``named_modules`` order, position of ``name``); a clear error for a bad name."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    if name not in order:
        close = difflib.get_close_matches(name, list(order), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        top = ", ".join(n for n, _ in model.named_children())
        raise ValueError(
            f"finetune.first_trainable: {type(model).__name__} has no module {name!r}{hint}; "
            f"its top-level modules are {top}"
        )
    return order, order[name]


def _pin_eval(module: nn.Module) -> None:
    """Keep ``module`` in eval mode through later ``model.train()`` calls (which recurse into children)."""
    module.eval()
    module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)


def freeze_before(model: nn.Module, first_trainable: str | None) -> list[str]:
    """Freeze the parameters registered before module ``first_trainable``; returns the frozen parameter names.

    Order is the registration order of ``named_parameters`` (Graphcore's rule: everything up to the first
    parameter of that module). The BatchNorm, dropout and DropPath layers before it are pinned to eval mode,
    so frozen BatchNorms keep their running statistics. ``None`` freezes nothing.
    """
    if first_trainable is None:
        return []
    order, first = _module_order(model, first_trainable)
    # named_parameters lists parameters by owning module in named_modules order: "registered before" = owned
    # by a module that comes before `first_trainable` (which may itself own no parameter, e.g. a Dropout).
    frozen = []
    for name, p in model.named_parameters():
        if order[name.rpartition(".")[0]] < first:
            p.requires_grad_(False)
            frozen.append(name)
    for name, module in model.named_modules():
        if order[name] < first and isinstance(module, _EVAL_PINNED):
            _pin_eval(module)
    return frozen


def prepare_model(
    state: dict[str, Any], path: Path, cfg: Config, log: Callable[[str], None]
) -> Callable[[nn.Module], None]:
    """The trainer's model hook: load the source weights (EMA when asked and present), then freeze."""

    def hook(model: nn.Module) -> None:
        use_ema = cfg.finetune.from_ema and state.get("ema") is not None
        weights = state["ema"] if use_ema else state["model"]
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                f"{path}: its weights do not fit model {cfg.model.name!r} of this config ({first}); fine-tune "
                "with the config the run was trained with"
            ) from None
        frozen = freeze_before(model, cfg.finetune.first_trainable)
        n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        share = n_frozen / max(n_all, 1)
        log(
            f"fine-tuning from {path} ({'EMA' if use_ema else 'model'} weights, step "
            f"{state['progress']['global_step']}): {len(frozen)} parameter tensors frozen ({share:.0%} of the "
            f"weights) before {cfg.finetune.first_trainable or '-'}"
        )

    return hook


def finetune(
    cfg: Config,
    source: str | Path,
    *,
    resume: str | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
    resume_any: bool = False,
) -> RunResult:
    """Fine-tune the run ``source`` (run directory or checkpoint file) as ``cfg.finetune`` says.

    Output goes to ``<run dir>/finetune`` (checkpoints, metrics.jsonl/csv, config.yaml, final_metrics.json).
    ``resume`` ('latest' or a path) continues an interrupted fine-tuning from that directory's checkpoints;
    the source weights are loaded first and then replaced by the resumed state.
    """
    # The hook runs on every torchrun rank; like Trainer.log, only rank 0 prints.
    say = log or (lambda msg: print(msg, flush=True) if os.environ.get("RANK", "0") == "0" else None)
    path, state = find_source_checkpoint(source, report=say)
    run_dir = Path(source) if Path(source).is_dir() else path.parent.parent
    ft_cfg = finetune_config(cfg, run_dir)
    src_cfg = state.get("config") or {}
    src_epochs = (src_cfg.get("train") or {}).get("epochs")
    done = state["progress"]["epoch"]
    if src_epochs is not None and done < src_epochs:
        say(f"NOTE: {path} is from epoch {done} of {src_epochs}: the main training did not finish")
    return train(
        ft_cfg,
        resume=resume,
        log=log,
        model_hook=prepare_model(state, path, ft_cfg, say),
        overwrite=overwrite,
        resume_any=resume_any,
    )


def train_and_finetune(
    cfg: Config,
    *,
    resume: str | None = None,
    finetune_from: str | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
    resume_any: bool = False,
) -> RunResult:
    """What ``run_train.py`` runs: the main training and/or the fine-tuning stage.

    - ``finetune_from`` set: only the fine-tuning of that run (``resume`` applies to the fine-tuning).
    - else the main training (``resume`` applies to it), then, when ``finetune.enabled`` and the training
      completed ``train.epochs`` (not cut short by ``train.max_steps``), the fine-tuning of its output
      (resumed from its own latest checkpoint when ``resume`` was given).

    ``overwrite`` / ``resume_any`` apply to the run started (or resumed) first (see ``run_dir.py``).
    """
    if finetune_from is not None:
        return finetune(cfg, finetune_from, resume=resume, log=log, overwrite=overwrite, resume_any=resume_any)
    if cfg.finetune.enabled and cfg.finetune.first_trainable is not None:
        from ipu_norm.train.builders import build_model

        _module_order(build_model(cfg.model), cfg.finetune.first_trainable)  # a typo fails now, not after training
    result = train(cfg, resume=resume, log=log, overwrite=overwrite, resume_any=resume_any)
    if not cfg.finetune.enabled:
        return result
    if result.epoch < cfg.train.epochs:
        # A run capped by train.max_steps (a quick look) is not a finished run: 2 full epochs would surprise.
        if result.is_main:
            (log or print)(
                f"NOTE: the main training stopped after {result.epoch} of {cfg.train.epochs} epochs (train.max_steps); "
                f"skipping the fine-tuning stage (run it later with --finetune-from {result.run_dir})"
            )
        return result
    return finetune(cfg, result.run_dir, resume=None if resume is None else "latest", log=log)
