"""Tiny models that follow the model contract (ipu_norm/models/registry.py), shared by the plan/adapter tests."""

from collections import OrderedDict

from torch import nn

from ipu_norm.models.base import StemBlocksHead


class TinyNet(StemBlocksHead):
    """stem conv 3->4, `num_blocks` x (conv 4->4 + ReLU), head (pool, flatten, fc 4->10)."""

    def __init__(self, num_blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(num_blocks)]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(4, 10)))
        self.default_cfg = {"train_size": 8, "test_size": 8, "num_classes": 10, "norm": "none", "family": "tiny"}
