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
