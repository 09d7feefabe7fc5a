"""Micro-batch Adaptive Gradient Clipping: an identity on a weight whose backward clips dL/dW unit-wise against W.

Exact AGC (``ipu_norm.optim.agc``, ``optim.agc_scope: step``) clips the fully accumulated, all-reduced gradient
once per optimizer step. PopTorch 3.4 offers no point there (its optimizers run inside the compiled step; the only
clip is ``max_grad_norm``, one global norm, and PopART's user transforms run only in inference sessions; see
docs/agc_micro_batch.md). This op clips where a graph can: in the backward pass of each micro-batch, per replica,
before gradient accumulation and the all-reduce (``optim.agc_scope: micro_batch``). With gradient accumulation
1 and one replica the two are the same update; otherwise the summed clipped micro-batch gradients differ from
the clipped sum (clipping is not linear), which ``ipu_norm.experiments.batch_dependence`` measures.

For every unit i of W (a row of a conv/linear weight; the whole tensor for vectors and scalars), G = dL/dW of
this micro-batch (times the loss scale ``s`` when the loss was scaled)::

    ||W_i||* = max(||W_i||, eps),  n_i = ||G_i|| / s
    G_i <- G_i * clip * ||W_i||* / max(n_i, 1e-6)    if n_i > clip * ||W_i||*,   else G_i

(REFERENCE.md, "Adaptive Gradient Clipping"; norms accumulated in fp32 for half tensors, fp64 for fp64.) The
same formula is the host reference of the PopART op ``ipu_norm.MicroBatchAGC`` (custom_ops/agc_micro_kernel.hpp,
tested against this function) and of its Poplar lowering (custom_ops/agc_micro_popart.cpp).

Where it applies: ``ScaledStdConv2d`` passes its weight, gain and bias through a ``MicroBatchAGC`` when one is
set (``enable_micro_batch_agc`` in ``ipu_norm.optim.agc_scope``): the Scaled-WS convolutions of NF-ResNets and
NFNets, not the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ipu_norm.ops.proxy_stats import running_on_ipu

GRAD_NORM_EPS = 1e-6  # guard of ||G_i|| (REFERENCE.md)
CUSTOM_OP_NAME = "MicroBatchAGC"
CUSTOM_OP_DOMAIN = "ipu_norm"
CUSTOM_OP_VERSION = 1


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of every unit of x, broadcastable against x (REFERENCE.md's AGC units).

    ndim <= 1 (bias, gain vector, scalar): one norm of the whole tensor (0-d result).
    ndim >= 2 (Linear (out, in), conv (out, in, kh, kw), WS gain (out, 1, 1, 1)): one norm per row over all
    dims but the first, keepdim (shape (out, 1, ...)). Shared by the per-step AGC (``ipu_norm.optim.agc``).
    """
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def clip_unitwise(grad: torch.Tensor, weight: torch.Tensor, clip: float, eps: float = 1e-3,
                  loss_scale: float = 1.0) -> torch.Tensor:
    """``grad`` (one micro-batch's dL/dW, scaled by ``loss_scale``) clipped unit-wise against ``weight``."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.to(acc)
    max_norm = unitwise_norm(weight.detach().to(acc)).clamp_min(eps) * clip
    g_norm = unitwise_norm(g) / loss_scale
    factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(GRAD_NORM_EPS), torch.ones_like(g_norm))
    return (g * factor).to(grad.dtype)


class _MicroBatchAGCFn(torch.autograd.Function):
    """Forward: W unchanged (a view). Backward: `clip_unitwise` of the incoming gradient against W."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, clip: float, eps: float, loss_scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(weight)
        ctx.clip, ctx.eps, ctx.loss_scale = clip, eps, loss_scale
        return weight.view_as(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (weight,) = ctx.saved_tensors
        return clip_unitwise(grad, weight, ctx.clip, ctx.eps, ctx.loss_scale), None, None, None


def micro_batch_agc_ipu(weight: torch.Tensor, clip: float, eps: float, loss_scale: float) -> torch.Tensor:
    """The PopART custom op ``ipu_norm.MicroBatchAGC`` (custom_ops/agc_micro_popart.cpp) inside a PopTorch trace."""
    import poptorch  # lazily: only the IPU path needs the Poplar SDK

    from ipu_norm.ops.proxy_stats_ipu import load_custom_ops

    load_custom_ops()  # the same library as the Proxy Norm op
    (out,) = poptorch.custom_op(
        [weight], CUSTOM_OP_NAME, CUSTOM_OP_DOMAIN, CUSTOM_OP_VERSION, example_outputs=[weight],
        attributes={"clip": float(clip), "eps": float(eps), "loss_scale": float(loss_scale)},
    )
    return out


def micro_batch_agc(weight: torch.Tensor, clip: float, eps: float = 1e-3, loss_scale: float = 1.0) -> torch.Tensor:
    """Identity on ``weight`` whose gradient is clipped unit-wise against it (module docstring).

    Under PopTorch tracing it is the PopART op; elsewhere a ``torch.autograd.Function``.
    """
    if clip <= 0 or eps <= 0 or loss_scale <= 0:
        raise ValueError(f"micro-batch AGC needs clip, eps, loss_scale > 0, got {clip}, {eps}, {loss_scale}")
    if running_on_ipu():
        return micro_batch_agc_ipu(weight, clip, eps, loss_scale)
    return _MicroBatchAGCFn.apply(weight, float(clip), float(eps), float(loss_scale))


@dataclass(frozen=True)
class MicroBatchAGC:
    """The clip a layer applies to its parameters' micro-batch gradients (``optim.agc_scope: micro_batch``).

    loss_scale: the factor the loss was multiplied by before backward (IPU static loss scaling; 1 otherwise).
    """

    clip: float
    eps: float = 1e-3
    loss_scale: float = 1.0

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return micro_batch_agc(weight, self.clip, self.eps, self.loss_scale)
