"""Squeeze-and-excitation (Hu et al. 2018) as used by EfficientNet and NFNets."""

from __future__ import annotations

import torch
from torch import nn

from ipu_norm.layers.activations import ACT_FNS, canonical_act_name


class SqueezeExcite(nn.Module):
    """x * gate_scale * sigmoid(fc2(phi(fc1(mean_hw(x))))), with 1x1 convs as fc layers.

    EfficientNet: rd_channels = block input channels / 4, phi = SiLU, gate_scale = 1.
    NFNet: rd_channels = out channels * 0.5, phi = ReLU, gate_scale = 2 (keeps the signal variance).
    """

    def __init__(self, channels: int, rd_channels: int, act: str = "relu", gate_scale: float = 1.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.act_name = canonical_act_name(act)
        self.gate_scale = gate_scale

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate, shape (N, C, 1, 1)."""
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(ACT_FNS[self.act_name](self.fc1(s)))
        return torch.sigmoid(s) * self.gate_scale if self.gate_scale != 1.0 else torch.sigmoid(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)
