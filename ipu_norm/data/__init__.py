"""Input pipeline: datasets, transforms, resumable sampling, reproducible loaders, Mixup/CutMix.

Everything random is derived from explicit seeds so a run resumed mid-epoch reproduces an uninterrupted one:
sample order from ``(seed, epoch)`` (:class:`ResumableSampler`), augmentation from ``(seed, epoch, index)``
(``(epoch, index)`` keys or datasets' ``set_epoch``, from :func:`build_loader`'s loader), mixing from a
checkpointable NumPy ``RandomState`` (:class:`MixupCutmix`, timm's Mixup).

Image folders decode only the crop of each JPEG (:mod:`.decode`), augment on uint8 and collate uint8 batches
(:mod:`.collate`); :class:`DeviceInput` normalises them on the device. ``python -m ipu_norm.bench.data`` measures
this pipeline against torchvision's reference.
"""

from .collate import Batch, collate_batch
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
from .decode import EncodedImage, region_decoder_available
from .device import DeviceInput, NormalizeUint8, normalize_uint8
from .digits import export_digits_imagefolder
from .loader import EpochDataLoader, EpochKeySampler, build_loader, seed_worker
from .mixup import MixupCutmix, SoftTargetCrossEntropy, smooth_one_hot
from .sampler import ResumableSampler
from .seeding import make_generator, mix_seed, seeded_cpu_rng
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomResizedCropFlipU8,
    ResizeCenterCropU8,
    ResizeRandomCropU8,
    build_digits_eval_transform,
    build_digits_eval_transform_u8,
    build_digits_train_transform,
    build_digits_train_transform_u8,
    build_eval_transform,
    build_eval_transform_u8,
    build_train_transform,
    build_train_transform_u8,
    random_resized_crop_box,
)

__all__ = [
    "DATASET_NAMES",
    "Batch",
    "DeviceInput",
    "EncodedImage",
    "EpochKeySampler",
    "NormalizeUint8",
    "RandomResizedCropFlipU8",
    "ResizeCenterCropU8",
    "ResizeRandomCropU8",
    "build_digits_eval_transform_u8",
    "build_digits_train_transform_u8",
    "build_eval_transform_u8",
    "build_train_transform_u8",
    "collate_batch",
    "normalize_uint8",
    "random_resized_crop_box",
    "region_decoder_available",
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
