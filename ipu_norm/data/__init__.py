"""Input pipeline: datasets, transforms, resumable sampling, reproducible loaders, Mixup/CutMix.

Everything random is derived from explicit seeds so a run resumed mid-epoch reproduces an uninterrupted one:
sample order from ``(seed, epoch)`` (:class:`ResumableSampler`), augmentation from ``(seed, epoch, index)``
(datasets' ``set_epoch``, forwarded by :func:`build_loader`'s loader), mixing from a checkpointable
NumPy ``RandomState`` (:class:`MixupCutmix`, timm's Mixup).
"""

from .datasets import (
    DATASET_NAMES,
    IGNORE_TARGET,
    DatasetError,
    GeneratedDataset,
    SafeImageFolder,
    build_dataset,
    default_digits_cache_dir,
    load_rgb,
)
from .digits import export_digits_imagefolder
from .loader import EpochDataLoader, build_loader, seed_worker
from .mixup import MixupCutmix, SoftTargetCrossEntropy, smooth_one_hot
from .sampler import ResumableSampler
from .seeding import make_generator, mix_seed, seeded_cpu_rng
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_digits_eval_transform,
    build_digits_train_transform,
    build_eval_transform,
    build_train_transform,
)

__all__ = [
    "DATASET_NAMES",
    "IGNORE_TARGET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetError",
    "EpochDataLoader",
    "GeneratedDataset",
    "MixupCutmix",
    "ResumableSampler",
    "SafeImageFolder",
    "SoftTargetCrossEntropy",
    "build_dataset",
    "build_digits_eval_transform",
    "build_digits_train_transform",
    "build_eval_transform",
    "build_loader",
    "build_train_transform",
    "default_digits_cache_dir",
    "export_digits_imagefolder",
    "load_rgb",
    "make_generator",
    "mix_seed",
    "seed_worker",
    "seeded_cpu_rng",
    "smooth_one_hot",
]
