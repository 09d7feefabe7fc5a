"""Prototype speed-ups measured by the benchmark, applied to built models without editing library files.

They are here so their gain can be measured next to the library's current code in the same interleaved
run (`--prototypes`); adopting one means moving it into the library file it names.

- `relu_fold_proxy_norm(model)`: for GN/LN+PN layers with ReLU, fold the PN scale into the GroupNorm affine.
  ReLU is positively homogeneous and the PN scale 1/sqrt(var~ + eps) is > 0, so
  relu(gamma x^ + beta) * s + t == relu((s gamma) x^ + s beta) + t exactly. The full-tensor PN work drops
  from an addcmul (forward) and two full-tensor products + reductions (backward) to one per-channel add
  (forward) and one reduction (backward). Target: ipu_norm/layers/norm_act.py GroupNormAct.forward.
- `agc_per_tensor_views`: AGC with per-tensor unit-wise norms of reshaped views instead of concatenating all
  rows of equal length (which copies every weight and gradient each step). Target: ipu_norm/optim/agc.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ipu_norm.bench.micro import agc_per_tensor_views
from ipu_norm.layers.norm_act import GroupNormAct


class ReluFoldGroupNormAct(GroupNormAct):
    """GroupNormAct whose ReLU + Proxy Norm forward folds the PN scale into the GN affine (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.proxy and self.act_name == "relu"):
            return super().forward(x)
        scale, shift = self.proxy_affine()
        y = F.relu(F.group_norm(x, self.num_groups, self.weight * scale, self.bias * scale, self.eps))
        return y + shift.to(y.dtype).view((1, -1) + (1,) * (y.dim() - 2))


def relu_fold_proxy_norm(model: nn.Module) -> nn.Module:
    """Switch every GroupNormAct of model to the ReLU-fold forward (same parameters, same outputs)."""
    for m in model.modules():
        if type(m) is GroupNormAct:
            m.__class__ = ReluFoldGroupNormAct
    return model


def agc_prototype(clip_factor: float = 0.01) -> Callable[[nn.Module], Callable[[], None]]:
    """Clip factory (see ipu_norm.bench.cases) of the per-tensor-view AGC, classifier excluded."""

    def factory(model: nn.Module) -> Callable[[], None]:
        from ipu_norm.optim.agc import agc_parameters  # noqa: PLC0415

        params = agc_parameters(model)
        return lambda: agc_per_tensor_views(params, clip_factor)

    return factory
