"""Training application: device-independent loop (``trainer``), device backends (``backend``), checkpoints,
metrics, torch.distributed set-up. ``ipu_norm.train.ema`` (model EMA) belongs to the data pipeline owner."""

from ipu_norm.train.backend import Backend, StepResult, TorchBackend, TrainSpec, get_backend
from ipu_norm.train.distributed import DistInfo, init_distributed

__all__ = [
    "Backend",
    "DistInfo",
    "StepResult",
    "TorchBackend",
    "TrainSpec",
    "get_backend",
    "init_distributed",
]
