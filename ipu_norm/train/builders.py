"""Builders from config sections: model, optimizer, learning-rate schedule, loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ipu_norm.config.schema import Config, DataConfig, ModelConfig, OptimConfig
from ipu_norm.optim.param_groups import param_groups_weight_decay


def build_model(mcfg: ModelConfig) -> nn.Module:
    """``create_model(name, ...)`` with the config's non-null model options."""
    from ipu_norm.models import create_model

    kwargs: dict[str, Any] = {"num_classes": mcfg.num_classes, **mcfg.kwargs}
    for key in ("norm", "norm_groups", "drop_rate", "drop_path_rate", "zero_init_last"):
        value = getattr(mcfg, key)
        if value is not None:
            kwargs[key] = value
    try:
        return create_model(mcfg.name, **kwargs)
    except TypeError as exc:
        given = ", ".join(f"model.{k}" for k in kwargs if k != "num_classes" and k not in mcfg.kwargs)
        given += "".join(f", model.kwargs.{k}" for k in mcfg.kwargs)
        raise ValueError(
            f"model {mcfg.name!r} rejected its options ({exc}); remove (or null) the unsupported one of [{given}]"
        ) from exc


def image_sizes(dcfg: DataConfig, model: nn.Module) -> tuple[int, int]:
    """(train, test) image sizes: ``data.train_size`` / ``data.test_size``, else the model's ``default_cfg``
    sizes, else 224 (the test size falls back to the train size)."""
    default_cfg = getattr(model, "default_cfg", {}) or {}
    train_size = dcfg.train_size or default_cfg.get("train_size") or 224
    return train_size, dcfg.test_size or default_cfg.get("test_size") or train_size


def effective_lr(ocfg: OptimConfig, global_batch_size: int) -> float:
    """Learning rate given to the optimizer: ``lr * global_batch / lr_reference_batch`` (or ``lr`` if absolute)."""
    if ocfg.lr_reference_batch is None:
        return ocfg.lr
    return ocfg.lr * global_batch_size / ocfg.lr_reference_batch


def build_optimizer(ocfg: OptimConfig, model: nn.Module, global_batch_size: int) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov) / RMSprop / AdamW / RMSpropTF over ``param_groups_weight_decay`` groups.

    Weight decay goes to conv/linear weights and Proxy Norm's proxy parameters only. ``rmsprop`` uses
    PyTorch's definition (``eps`` outside the square root, mean square from 0); ``rmsprop_tf`` TensorFlow's
    (``ipu_norm.optim.rmsprop_tf``: eps inside the root, mean square from 1, lr in the momentum buffer), the
    update of ``poptorch.optim.RMSprop(use_tf_variant=True)`` on IPUs.
    """
    lr = effective_lr(ocfg, global_batch_size)
    groups = [g for g in param_groups_weight_decay(model, ocfg.weight_decay) if g["params"]]
    if ocfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov)
    if ocfg.name == "rmsprop":
        eps = 1e-8 if ocfg.eps is None else ocfg.eps
        return torch.optim.RMSprop(groups, lr=lr, alpha=ocfg.alpha, eps=eps, momentum=ocfg.momentum)
    if ocfg.name == "rmsprop_tf":
        from ipu_norm.optim.rmsprop_tf import RMSpropTF

        eps = 1e-10 if ocfg.eps is None else ocfg.eps
        return RMSpropTF(groups, lr=lr, alpha=ocfg.alpha, eps=eps, momentum=ocfg.momentum)
    if ocfg.name == "adamw":
        eps = 1e-8 if ocfg.eps is None else ocfg.eps
        return torch.optim.AdamW(groups, lr=lr, betas=(ocfg.betas[0], ocfg.betas[1]), eps=eps)
    raise ValueError(f"unknown optim.name {ocfg.name!r}")


def build_scheduler(
    ocfg: OptimConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step LambdaLR: linear warmup (from 0) then cosine / exponential / step / constant.

    The schedule spans ``epochs * steps_per_epoch`` steps whatever ``train.max_steps`` says, so a capped
    run is a prefix of the full one (and resuming it continues the same curve).
    """
    from ipu_norm.optim.schedulers import build_lr_lambda

    total = max(1, epochs * steps_per_epoch)
    warmup = round(ocfg.warmup_epochs * steps_per_epoch)
    base_lr = optimizer.param_groups[0]["lr"]
    fn = build_lr_lambda(
        ocfg.schedule,
        total_steps=total,
        warmup_steps=warmup,
        min_factor=min(1.0, ocfg.min_lr / base_lr) if base_lr > 0 else 0.0,
        decay_rate=ocfg.decay_rate,
        decay_every_steps=max(1e-9, ocfg.decay_epochs * steps_per_epoch),
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def build_criterion(cfg: Config) -> tuple[nn.Module, bool]:
    """(training loss, uses soft targets?). Soft targets when mixup/cutmix or label smoothing is on."""
    t = cfg.train
    if t.mixup_alpha > 0 or t.cutmix_alpha > 0 or t.label_smoothing > 0:
        from ipu_norm.data import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy(), True
    return nn.CrossEntropyLoss(), False
