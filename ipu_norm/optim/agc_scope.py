"""Where Adaptive Gradient Clipping acts: ``optim.agc_scope``.

- ``step`` (default): exact AGC, ``ipu_norm.optim.agc``, once per optimizer step on the fully accumulated,
  all-reduced, unscaled gradient of every parameter but the classifier's. CPU/GPU only.
- ``micro_batch``: ``ipu_norm.ops.agc_micro``, in the backward pass of every micro-batch (per replica, before
  accumulation and all-reduce), on the parameters of the Scaled-WS convolutions (weight, gain, bias): the only
  AGC an IPU graph can hold (PopTorch 3.4 has no hook between accumulation and the weight update). The SE
  convolutions and scalar skip gains of NFNets and the classifier are not clipped in this scope. Identical to
  ``step`` over the same parameters when gradient accumulation and replicas are 1.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ipu_norm.layers.weight_std import ScaledStdConv2d
from ipu_norm.ops.agc_micro import MicroBatchAGC

AGC_SCOPES = ("step", "micro_batch")


def enable_micro_batch_agc(model: nn.Module, clip: float | None, eps: float = 1e-3,
                           loss_scale: float = 1.0) -> list[str]:
    """Set (``clip`` > 0) or clear (``None``) the micro-batch clip of every Scaled-WS conv of ``model``.

    Returns the names of the layers it applies to. The classifier (``model.get_classifier()``) is never clipped.
    """
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    skip = {id(m) for m in classifier.modules()} if isinstance(classifier, nn.Module) else set()
    agc = None if clip is None else MicroBatchAGC(float(clip), float(eps), float(loss_scale))
    names = []
    for name, module in model.named_modules():
        if isinstance(module, ScaledStdConv2d) and id(module) not in skip:
            module.micro_batch_agc = agc
            names.append(name)
    if clip is not None and not names:
        raise ValueError(
            f"optim.agc_scope: micro_batch clips the Scaled-WS convolutions, and {type(model).__name__} has none "
            "(use agc_scope: step, or an NF model)"
        )
    return names


def micro_batch_loss_scale(device: str, precision: str, loss_scaling: Any, micro_batches_per_step: int) -> float:
    """The factor each micro-batch's gradient carries into the clip, so that it clips the micro-batch's own
    mean-loss gradient; ValueError (one line) where no fixed factor exists.

    IPU: the static loss scale (``loss_scaling``: the plan's, with ``auto``, ``value``, ``enabled``); PopART 3.4
    divides by accumulation and replicas only after accumulating (``MeanReductionStrategy::Post``, popart
    ``sessionoptions.hpp:666-690,1024``), so the backward carries the loss scale alone. CPU/GPU: 1 / micro-batches
    (the torch backend backpropagates loss / n); CUDA fp16's GradScaler scale changes at run time: refused.
    """
    if device == "ipu":
        if loss_scaling.auto:
            raise ValueError("optim.agc_scope: micro_batch on IPUs clips loss-scaled gradients and needs a static "
                             "loss scale: set execution.loss_scaling to a number (e.g. 128)")
        return float(loss_scaling.value) if loss_scaling.enabled else 1.0
    if device == "cuda" and precision in ("16.32", "16.16"):
        raise ValueError("optim.agc_scope: micro_batch does not follow the GradScaler's dynamic loss scale: use "
                         "execution.precision bf16 or 32.32 on GPUs, or optim.agc_scope: step")
    return 1.0 / micro_batches_per_step
