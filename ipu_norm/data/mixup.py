"""Batch-wise Mixup / CutMix with label smoothing (timm ``Mixup`` mode='batch' semantics) and soft-target CE.

All randomness comes from an explicit ``torch.Generator`` (the instance's own, or one passed per call), so
the mixing of every step can be checkpointed (``state_dict``) and replayed on resume.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .seeding import make_generator


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: ``on = 1 - smoothing + smoothing / K``, ``off = smoothing / K``."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    target = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return target.scatter_(1, labels.long().view(-1, 1), on)


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """Random box of area about ``(1 - lam) * H * W``, centre uniform over the image, clipped to it.

    Returns ``(y0, y1, x0, x1)``. Clipping at the border makes the area smaller than requested, which is why
    the caller recomputes lambda from the actual box ("lambda correction", as in timm and the CutMix paper).
    """
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (), generator=generator))
    cx = int(torch.randint(width, (), generator=generator))
    # Unclipped the box is exactly cut_h x cut_w: half rounded down before the centre, up after it.
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return y0, y1, x0, x1


class MixupCutmix:
    """Mix each batch with its reversed copy using Mixup or CutMix, and return smoothed soft targets.

    One lambda per batch (timm's mode='batch'). With probability ``prob`` a mix is applied: when both alphas
    are positive, CutMix is chosen with probability ``switch_prob`` (else Mixup); lambda ~ Beta(alpha,
    alpha). Mixup: ``x = lam * x + (1 - lam) * x.flip(0)``. CutMix pastes a box from ``x.flip(0)`` and
    corrects lambda to the kept area. Targets: ``lam * y + (1 - lam) * y.flip(0)`` with ``y`` the smoothed
    one-hot labels. With both alphas 0 (or when the ``prob`` draw says no) the images are returned
    unchanged and the targets are the smoothed one-hot labels.

    The input batch is not modified in place. The lambda and mode of the last call are kept in
    ``last_lam`` / ``last_mode`` for logging.

    Args:
        mixup_alpha: Beta parameter of Mixup (0 disables Mixup).
        cutmix_alpha: Beta parameter of CutMix (0 disables CutMix).
        prob: probability to mix a given batch.
        switch_prob: probability of CutMix rather than Mixup when both are enabled.
        label_smoothing: label smoothing of the targets.
        num_classes: number of classes.
        seed: seed of the instance's own generator (used when ``__call__`` gets no generator). Under data
            parallelism give each replica its own seed (e.g. ``seed + rank``), otherwise all replicas draw
            the same lambda at every step.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        *,
        seed: int = 0,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
        if not 0.0 <= prob <= 1.0 or not 0.0 <= switch_prob <= 1.0:
            raise ValueError("prob and switch_prob must be in [0, 1]")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)
        self.generator = make_generator(seed)
        self.last_lam = 1.0
        self.last_mode = "none"

    @property
    def enabled(self) -> bool:
        """Whether any mixing can happen."""
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    @staticmethod
    def _beta(alpha: float, generator: torch.Generator) -> float:
        # torch's Beta/Gamma samplers take no generator; a NumPy generator seeded from the torch one keeps
        # the draw a function of the torch generator state alone.
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        return float(np.random.default_rng(seed).beta(alpha, alpha))

    def sample(self, generator: torch.Generator | None = None) -> tuple[float, str]:
        """Draw ``(lam, mode)`` for one batch, mode in {'none', 'mixup', 'cutmix'}."""
        g = self.generator if generator is None else generator
        if not self.enabled:
            return 1.0, "none"
        if float(torch.rand((), generator=g)) >= self.prob:
            return 1.0, "none"
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = float(torch.rand((), generator=g)) < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return self._beta(alpha, g), ("cutmix" if use_cutmix else "mixup")

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch ``images`` (N, C, H, W) with integer ``labels`` (N,); returns ``(images, soft_targets)``."""
        g = self.generator if generator is None else generator
        lam, mode = self.sample(g)
        if mode == "mixup":
            images = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
        elif mode == "cutmix":
            height, width = images.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(height, width, lam, g)
            images = images.clone()
            images[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        target = smooth_one_hot(labels, self.num_classes, self.label_smoothing).to(labels.device)
        if mode != "none":
            target = target.mul(lam).add_(target.flip(0), alpha=1.0 - lam)
        self.last_lam, self.last_mode = lam, mode
        return images, target

    def state_dict(self) -> dict[str, Any]:
        """State of the instance's generator (the only mutable state)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy with probability targets: ``mean_n sum_k -t_nk * log_softmax(x)_nk``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
