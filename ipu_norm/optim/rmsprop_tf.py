"""TensorFlow-variant RMSprop on CPU/GPU: the update of ``poptorch.optim.RMSprop(use_tf_variant=True)``.

Graphcore's EfficientNet recipe uses ``optimizer: rmsprop_tf`` (graphcore/examples ``vision/cnns/pytorch/train/
train.py:362-371``: ``poptorch.optim.RMSprop(..., alpha=rmsprop_decay, eps=optimizer_eps, use_tf_variant=True)``).
This class is that update for the torch backends, so that the same config trains the same way everywhere.

Per parameter ``w`` with gradient ``g`` (``lr`` the group's current learning rate)::

    s   = g + weight_decay * w                  # L2 regularisation, added to the gradient
    ms  = alpha * ms + (1 - alpha) * s**2       # ms starts at 1, not 0
    x   = s / sqrt(ms + eps)                    # eps inside the square root
    momentum > 0:  mom = momentum * mom + lr * x ;  w -= mom      # lr enters the momentum buffer
    momentum = 0:  w -= lr * x

Where each choice comes from (SDK 3.4 tags: graphcore/poptorch ``sdk/poptorch/3.4.0``, graphcore/popart
``sdk/poplar/3.4.0``):

- ms initialised to 1: popart ``willow/src/patterns/adaptivedecompose.cpp:84-87`` (``addStateTensor(..., 1.0)`` when
  ``rmspropTFVariant``); poptorch ``python/optim.py:555`` ("The average squared gradients buffer is initialized to
  ones"); TF1 ``tf.compat.v1.train.RMSPropOptimizer`` (ones initializer for ``rms``); timm
  ``timm/optim/rmsprop_tf.py:124`` (``torch.ones_like``). (Keras/TF2's RMSprop starts at 0; PyTorch's too.)
- eps inside the square root: popart ``willow/src/popx/op/rmspropupdaterx.cpp:69-71`` (``Sqrt(Add(rms, eps))``),
  ``willow/include/popart/adaptive.hpp:98-99``; TF ``ApplyRMSProp`` (``lr * grad / sqrt(ms + epsilon)``); timm
  ``rmsprop_tf.py:155``.
- lr in the momentum buffer, ``w -= mom``: popart ``adaptive.hpp:116-117,129-131`` and ``adaptivedecompose.cpp:
  319-408`` (the updater is scaled by lr before the ``DecayAdd`` accumulator; ``ScaledVarUpdateOp`` with
  ``lrInUpdater``); poptorch ``python/optim.py:557``; TF ``ApplyRMSProp`` (``mom <- momentum * mom + lr * grad /
  sqrt(ms + epsilon); var <- var - mom``); timm ``rmsprop_tf.py:168-172`` (``lr_in_momentum=True``). A learning-rate
  change therefore reaches the weights gradually, through the momentum buffer, in all four.
- Without momentum PopART's accumulator is the updater itself and the step is ``w -= lr * x``
  (``adaptive.hpp:114,127``).
- Weight decay is L2 regularisation added to the gradient before ``ms``: poptorch builds ``popart::Adaptive`` with
  ``WeightDecayMode::L2Regularization`` (``popart_compiler/source/CompilerImpl.cpp:905``); popart applies
  ``s = s + wd * w`` after loss-scale removal and before Accl1 (``adaptive.hpp:83-87``,
  ``adaptivedecompose.cpp:138-150``); timm's default (``rmsprop_tf.py:143``, ``decoupled_decay=False``).
- The squared-average update is written as TF orders it, ``ms += (1 - alpha) * (s**2 - ms)`` (timm
  ``rmsprop_tf.py:146``); algebraically PopART's ``a * v1 + (1 - a) * s**2`` (``adaptive.hpp:86-87``).

Not covered: centred RMSprop (no shipped config uses it). State is kept in the parameter's dtype, like
``torch.optim.RMSprop``; the IPU keeps it in ``accum_type`` (fp32 for 16.32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop as TensorFlow 1 / PopART's ``rmspropTFVariant`` define it (module docstring: formula and sources).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        alpha: decay of the mean square (TF's ``rho``, Graphcore's ``rmsprop_decay``).
        eps: added to the mean square inside the square root (TF1's default 1e-10).
        weight_decay: L2 penalty added to the gradient.
        momentum: momentum factor; the buffer accumulates ``lr``-scaled updates.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 0.9,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
    ) -> None:
        for name, value, ok in (
            ("lr", lr, lr >= 0),
            ("alpha", alpha, 0 <= alpha < 1),
            ("eps", eps, eps > 0),
            ("weight_decay", weight_decay, weight_decay >= 0),
            ("momentum", momentum, 0 <= momentum < 1),
        ):
            if not ok:
                raise ValueError(f"RMSpropTF: invalid {name} {value!r}")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            wd, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                grad = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    if momentum > 0:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                square_avg = state["square_avg"]
                square_avg.add_(grad * grad - square_avg, alpha=1.0 - alpha)
                denom = square_avg.add(eps).sqrt_()
                if momentum > 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:  # momentum switched on after the first step
                        buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    buf.mul_(momentum).addcdiv_(grad, denom, value=lr)
                    p.sub_(buf)
                else:
                    p.addcdiv_(grad, denom, value=-lr)
        return loss
