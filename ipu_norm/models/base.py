"""The model contract's shared part: stem -> blocks -> head, with the classifier at ``head.fc``."""

from __future__ import annotations

import torch
from torch import nn


class StemBlocksHead(nn.Module):
    """Base of every registered model (see ipu_norm/models/registry.py for the contract).

    Subclasses build ``self.stem``, ``self.blocks`` (flat ``nn.Sequential``) and ``self.head`` (ending in ``.fc``);
    pipeline stages, recomputation points and AGC's classifier exclusion all rely on this layout.
    """

    stem: nn.Module
    blocks: nn.Sequential
    head: nn.Module

    def get_classifier(self) -> nn.Linear:
        """The final Linear layer (excluded from AGC, replaced on weight import)."""
        return self.head.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after the last block (before the head, and before its final conv if it has one)."""
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
