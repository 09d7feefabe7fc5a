"""Batch-wise Mixup / CutMix with label smoothing: timm's ``Mixup`` (mode='batch') with a private RNG.

timm's ``Mixup`` draws from NumPy's global RNG. :class:`MixupCutmix` runs it with NumPy's global RNG swapped for
the instance's own ``RandomState`` (:func:`~ipu_norm.data.seeding.numpy_global_rng`), so every step's mixing is a
function of the instance's seed alone, can be checkpointed (``state_dict``) and replayed on resume, and leaves
the training loop's global NumPy stream untouched. Also the soft-target cross-entropy the mixed targets need.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target

from .seeding import make_numpy_rng, numpy_global_rng, numpy_state_from_dict, numpy_state_to_dict


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: ``on = 1 - smoothing + smoothing / K``, ``off = smoothing / K``."""
    return mixup_target(labels, num_classes, lam=1.0, smoothing=smoothing)


class MixupCutmix(Mixup):
    """timm's ``Mixup`` in mode='batch' (one lambda per batch, mixed with the reversed batch) with its own RNG.

    With probability ``prob`` a batch is mixed: when both alphas are positive, CutMix is chosen with probability
    ``switch_prob`` (else Mixup); lambda ~ Beta(alpha, alpha); CutMix corrects lambda to the area actually kept.
    Targets are ``lam * y + (1 - lam) * y.flip(0)`` with ``y`` the smoothed one-hot labels. With both alphas 0
    (label smoothing only) the images are returned unchanged and no random number is drawn. Mixing is done in
    place on ``images`` (timm) and needs an even batch. The lambda and mode of the last call are kept in
    ``last_lam`` / ``last_mode`` for logging.

    Args:
        mixup_alpha: Beta parameter of Mixup (0 disables Mixup).
        cutmix_alpha: Beta parameter of CutMix (0 disables CutMix).
        prob: probability to mix a given batch.
        switch_prob: probability of CutMix rather than Mixup when both are enabled.
        label_smoothing: label smoothing of the targets.
        num_classes: number of classes.
        seed: seed of the instance's own NumPy ``RandomState``. Under data parallelism give each replica its own
            seed (e.g. ``mix_seed(seed, rank)``), otherwise all replicas draw the same lambda at every step.
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
            raise ValueError(f"MixupCutmix: mixup_alpha, cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        if not 0.0 <= prob <= 1.0 or not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"MixupCutmix: prob and switch_prob must be in [0, 1], got {prob}, {switch_prob}")
        super().__init__(
            mixup_alpha=float(mixup_alpha),
            cutmix_alpha=float(cutmix_alpha),
            prob=float(prob),
            switch_prob=float(switch_prob),
            mode="batch",
            correct_lam=True,
            label_smoothing=float(label_smoothing),
            num_classes=int(num_classes),
        )
        self.mixup_enabled = self.enabled
        self.rng = make_numpy_rng(seed)
        self.last_lam = 1.0
        self.last_mode = "none"

    @property
    def enabled(self) -> bool:
        """Whether any mixing can happen."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _params_per_batch(self) -> tuple[float, bool]:
        lam, use_cutmix = super()._params_per_batch()
        self.last_mode = "none" if lam == 1.0 else ("cutmix" if use_cutmix else "mixup")
        return lam, use_cutmix

    def _mix_batch(self, x: torch.Tensor) -> float:
        self.last_lam = float(super()._mix_batch(x))
        return self.last_lam

    def sample(self) -> tuple[float, str]:
        """Draw ``(lam, mode)`` for one batch from the instance's RNG, mode in {'none', 'mixup', 'cutmix'}."""
        if not self.enabled:
            return 1.0, "none"
        with numpy_global_rng(self.rng):
            lam, _ = self._params_per_batch()
        return lam, self.last_mode

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch ``images`` (N, C, H, W) with integer ``labels`` (N,); returns ``(images, soft_targets)``."""
        if not self.enabled:
            self.last_lam, self.last_mode = 1.0, "none"
            return images, smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        if images.shape[0] % 2:
            raise ValueError(
                f"MixupCutmix: the batch has {images.shape[0]} images; Mixup/CutMix (timm) pairs each image with the "
                "reversed batch and needs an even batch size"
            )
        with numpy_global_rng(self.rng):
            return super().__call__(images, labels)

    def state_dict(self) -> dict[str, Any]:
        """State of the instance's RNG (the only mutable state), as tensors / primitives."""
        return {"numpy_rng": numpy_state_to_dict(self.rng.get_state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the RNG state saved by :meth:`state_dict`."""
        if "numpy_rng" not in state:
            raise ValueError(
                "MixupCutmix: this state has no 'numpy_rng' (saved before Mixup/CutMix used timm's Mixup with a NumPy "
                "RNG, checkpoint format 1)"
            )
        self.rng.set_state(numpy_state_from_dict(state["numpy_rng"]))


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy with probability targets: ``mean_n sum_k -t_nk * log_softmax(x)_nk``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def mix_keeping_dtype(
    mix: Any, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mix(images, labels)`` for float images; uint8 images (8-bit device input) are mixed in float32 and rounded
    back to uint8, so they still cross to the device as 8 bits (a mixed pixel moves by at most 0.5 / 255; CutMix
    pastes whole pixels and is exact). timm's in-place Mixup would truncate uint8 products instead."""
    if images.dtype != torch.uint8:
        return mix(images, labels)
    mixed, targets = mix(images.float(), labels)
    return mixed.round_().clamp_(0, 255).to(torch.uint8), targets
