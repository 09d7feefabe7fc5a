"""Datasets: synthetic 'generated' data, a corruption-tolerant ImageFolder, and the dataset factory.

Reproducibility contract: the random augmentation of sample ``i`` in epoch ``e`` depends only on
``(dataset seed, e, i)`` (see :func:`ipu_norm.data.seeding.mix_seed`), never on worker assignment or on
what was drawn before. ``set_epoch(e)`` tells a dataset which epoch it serves; the loader returned by
:func:`ipu_norm.data.build_loader` does this automatically from its sampler's epoch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from .collate import collate_into
from .decode import EncodedImage
from .digits import export_digits_imagefolder
from .seeding import make_generator, mix_seed, seeded_cpu_rng
from .transforms import (
    build_digits_eval_transform_u8,
    build_digits_train_transform_u8,
    build_eval_transform_u8,
    build_train_transform_u8,
)

_logger = logging.getLogger(__name__)

DATASET_NAMES = ("generated", "imagefolder", "digits")
SPLITS = ("train", "val")
_SPLIT_IDS = {"train": 0, "val": 1}
# Errors PIL raises on unreadable files: UnidentifiedImageError and "image file is truncated" are OSErrors,
# some decoders raise SyntaxError/ValueError on malformed headers; DecompressionBombError is its own class.
_LOAD_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Target of a validation sample whose file could not be decoded: the standard ``ignore_index`` of
# ``nn.functional.cross_entropy``; evaluation leaves such samples out of the loss, the accuracy and the count.
IGNORE_TARGET = -100
# Files decoded at construction to tell "some corrupt files" (skipped) from "nothing readable" (an error).
_PROBE_FILES = 32


class DatasetError(ValueError):
    """A dataset that cannot be used (no class folders, empty class folder, nothing readable); names the path."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB, whatever its mode.

    PIL's ``convert("RGB")`` handles grayscale (L, LA), palette (P), RGBA (alpha dropped) and CMYK, but
    clips 16/32-bit integer and float images (mode I;16, I, F) to 255 instead of scaling them: a 16-bit
    PNG would come out almost white. Those are rescaled to 8 bits first (16-bit: value / 257; 32-bit int and
    float: min-max over the image, as their range is not fixed).
    """
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode.startswith("I;16"):
            return _gray_to_rgb(np.asarray(im, dtype=np.uint16).astype(np.float32) / 257.0)
        if mode in ("I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
                arr = arr / 257.0  # PNG 16-bit grayscale opens as mode I in some PIL versions
            else:
                lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
                arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            return _gray_to_rgb(arr)
        if mode == "P" and "transparency" in im.info:
            return im.convert("RGBA").convert("RGB")  # PIL warns when converting a transparent palette directly
        return im.convert("RGB")



def _gray_to_rgb(arr: np.ndarray) -> Image.Image:
    """A single-channel array already on the 0..255 scale, rounded to 8 bits, as an RGB image."""
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")


class GeneratedDataset(Dataset):
    """Synthetic images generated on the fly, for benchmarking without files (Graphcore's 'generated').

    Sample ``i`` is produced directly as a normalised float tensor (no PIL, no augmentation) from a
    generator seeded with ``(seed, split, i)``: it is identical in every epoch, worker and process. The
    label is drawn from the same generator. So that a smoke-training run can still show the loss fall, each
    image is Gaussian noise plus ``class_signal`` times a fixed smooth per-class pattern (a 4x4 random
    pattern per class, bilinearly upsampled, shared by the train and val splits of the same ``seed``);
    ``class_signal=0`` gives pure noise.

    Args:
        num_samples: dataset length.
        image_size: side of the square ``(3, image_size, image_size)`` images.
        num_classes: labels are in ``[0, num_classes)``.
        seed: base seed.
        split: 'train' or 'val' (different samples, same class patterns).
        class_signal: amplitude of the class pattern added to unit Gaussian noise.
        dtype: dtype of the returned images (e.g. torch.float16 for half-precision input pipelines).
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int,
        num_classes: int,
        seed: int,
        *,
        split: str = "train",
        class_signal: float = 0.5,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_samples < 0 or image_size < 1 or num_classes < 1:
            raise ValueError(f"invalid GeneratedDataset({num_samples=}, {image_size=}, {num_classes=})")
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.split = split
        self.class_signal = float(class_signal)
        self.dtype = dtype
        self.epoch = 0
        # Small: num_classes x 3 x 4 x 4 floats, upsampled per sample (a full-resolution table would be
        # num_classes x 3 x H x W, ~600 MB for ImageNet at 224).
        self._patterns = torch.randn(self.num_classes, 3, 4, 4, generator=make_generator(mix_seed(self.seed, 7)))

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch (generated samples do not depend on it; kept for a uniform interface)."""
        self.epoch = int(epoch)

    # The loader may pass (epoch, index) keys (build_loader's persistent workers); samples ignore the epoch.
    accepts_epoch_keys = True

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = key[1] if isinstance(key, tuple) else key
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for GeneratedDataset of length {self.num_samples}")
        index %= self.num_samples
        g = make_generator(mix_seed(self.seed, _SPLIT_IDS[self.split], index))
        label = int(torch.randint(self.num_classes, (), generator=g))
        image = torch.randn(3, self.image_size, self.image_size, generator=g)
        if self.class_signal:
            pattern = F.interpolate(
                self._patterns[label][None], size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False,
            )[0]
            image.add_(pattern, alpha=self.class_signal)
        return image.to(self.dtype), label


class SafeImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` that survives corrupt or unreadable image files.

    Policy (checked at load time): when the file of sample ``i`` cannot be decoded, the next readable sample
    in index order (``i+1``, ``i+2``, ... wrapping around) is returned instead. This is deterministic, so
    resumed and uninterrupted runs still see the same data. Each bad file is logged once (per process) and
    counted in ``num_skipped``; known-bad indices are remembered and not decoded again. Augmentation of the
    substitute uses the seed of the requested index ``i``.

    With ``verify=True`` every file is decoded once at construction and bad ones are removed from
    ``samples`` up front (exact ``num_skipped`` in the main process, cost: one full decode pass; leave it off
    for ImageNet-scale folders). Without it, ``num_skipped`` counts the files met by *this* process: with
    ``num_workers > 0`` each worker has its own copy of the dataset, so the main-process counter stays 0 and
    the per-worker warnings in the log are the record.

    Validation sets pass ``bad_target=IGNORE_TARGET``: the substitute then carries that target, so batch
    shapes stay fixed (IPUs compile static shapes) while evaluation leaves the sample out of its metrics and
    reports how many were skipped - exact even with loader workers, since the targets travel with the batch.

    Errors at construction (:class:`DatasetError`, one line naming the path): no class sub-folder, a class
    folder without any image file, or none of the first files decodable (a folder of unreadable files).
    Files are read with :func:`load_rgb` (grayscale, palette, RGBA, CMYK and 16-bit images become RGB).

    Args:
        root: folder with one sub-folder per class.
        transform: applied to the PIL image under a per-sample seed ``(seed, epoch, index)``; or a uint8 transform
            (``encoded_input = True``, e.g. ``build_train_transform_u8``), called with the file's
            :class:`~ipu_norm.data.decode.EncodedImage` and a generator seeded with ``(seed, epoch, index)``.
        target_transform: applied to the class index.
        seed: base seed of the per-sample augmentation RNG.
        verify: decode every file now and drop the unreadable ones.
        loader: image loader (defaults to :func:`load_rgb`).
        bad_target: target returned with the substitute of an unreadable file (default: the substitute's own).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        *,
        seed: int = 0,
        verify: bool = False,
        loader: Callable[[str], Any] | None = None,
        bad_target: int | None = None,
    ) -> None:
        root = os.fspath(root)
        try:
            super().__init__(root, transform=transform, target_transform=target_transform, loader=loader or load_rgb)
        except FileNotFoundError as exc:
            raise DatasetError(_describe_layout_error(root, exc)) from None
        except PermissionError as exc:
            raise DatasetError(f"cannot read the dataset folder {exc.filename or root}: {exc.strerror}") from None
        self.seed = int(seed)
        self.epoch = 0
        self.num_skipped = 0
        self.skipped_paths: list[str] = []
        self.bad_target = bad_target
        self._bad: set[int] = set()
        if verify:
            self._verify_all()
        else:
            self._probe()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation stream ``__getitem__`` reproduces."""
        self.epoch = int(epoch)

    def _record_bad(self, index: int, path: str, err: BaseException) -> None:
        self._bad.add(index)
        self.num_skipped += 1
        self.skipped_paths.append(path)
        _logger.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)

    def _probe(self) -> None:
        """Decode files until one works (usually the first): a folder of unreadable files fails here, clearly."""
        first_error = None
        for i, (path, _) in enumerate(self.samples[:_PROBE_FILES]):
            try:
                self.loader(path)
            except _LOAD_ERRORS as err:
                self._record_bad(i, path, err)
                first_error = first_error or f"{path}: {type(err).__name__}: {err}"
                continue
            return
        raise DatasetError(
            f"no readable image under {self.root}: the first {min(len(self.samples), _PROBE_FILES)} files all "
            f"fail to decode (first: {first_error})"
        )

    def _verify_all(self) -> None:
        good = []
        for path, target in self.samples:
            try:
                self.loader(path)
            except _LOAD_ERRORS as err:
                self._record_bad(-1, path, err)
                continue
            good.append((path, target))
        self._bad.clear()
        self.samples = good
        self.imgs = self.samples
        self.targets = [t for _, t in good]
        if not good:
            raise DatasetError(f"no readable image under {self.root}")

    # The loader may pass (epoch, index) keys: the epoch then travels with the index, so persistent loader workers
    # (whose copy of the dataset keeps the epoch it was forked with) still augment for the right epoch.
    accepts_epoch_keys = True

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Any]:
        epoch, index = (int(key[0]), key[1]) if isinstance(key, tuple) else (self.epoch, key)
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of length {n}")
        index %= n
        seed = mix_seed(self.seed, epoch, index)
        encoded = getattr(self.transform, "encoded_input", False)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            path, target = self.samples[i]
            try:
                if encoded:  # uint8 transform: decodes (only the crop of) the file itself, draws from a generator
                    image = self.transform(EncodedImage(path), make_generator(seed))
                else:
                    image = self.loader(path)
            except _LOAD_ERRORS as err:
                self._record_bad(i, path, err)
                continue
            break
        else:
            raise DatasetError(f"no readable image under {self.root} ({len(self._bad)} unreadable files)")
        if i != index and self.bad_target is not None:
            target = self.bad_target
        if self.transform is not None and not encoded:
            with seeded_cpu_rng(seed):
                image = self.transform(image)
        if self.target_transform is not None and target != self.bad_target:
            target = self.target_transform(target)
        return image, target

    def __getitems__(self, keys: list[Any]) -> Any:
        """A whole batch (DataLoader's batched fetch): uint8 samples go straight into one preallocated tensor.

        Returns a :class:`~ipu_norm.data.collate.Batch` (collated already) when the transform is a uint8 one and
        targets are ints, else the list of samples for the loader's collate function.
        """
        if not getattr(self.transform, "encoded_input", False) or self.target_transform is not None:
            return [self[k] for k in keys]
        return collate_into((self[k] for k in keys), len(keys), (3, *self.transform.size))


def _describe_layout_error(root: str, exc: FileNotFoundError) -> str:
    """One line for torchvision's ImageFolder layout errors, naming the offending folder(s)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    try:
        classes, _ = find_classes(root)
    except FileNotFoundError:
        return f"no class folders in {root}: expected {root}/<class>/<image files> (ImageNet layout)"
    empty = []
    for c in classes:
        folder = Path(root) / c
        if not any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in folder.rglob("*")):
            empty.append(str(folder))
    if empty:
        return (
            f"class folder{'s' if len(empty) > 1 else ''} without any image file: {', '.join(empty)} (supported "
            f"extensions: {' '.join(IMG_EXTENSIONS)}); add images or remove the folder"
        )
    return f"{root}: {exc}"


def _check_classes(ds: SafeImageFolder, num_classes: int) -> None:
    found = len(ds.classes)
    if found > num_classes:
        raise ValueError(
            f"{ds.root} has {found} class folders but num_classes={num_classes}: labels would be out of range"
        )
    if found < num_classes:
        warnings.warn(
            f"{ds.root} has {found} class folders, fewer than num_classes={num_classes}", stacklevel=3
        )


def default_digits_cache_dir(image_size: int, val_fraction: float = 0.2, split_seed: int = 0) -> Path:
    """Where the 'digits' dataset is exported when no root is given (a per-user temp folder per setting)."""
    user = os.environ.get("USER") or (str(os.getuid()) if hasattr(os, "getuid") else "user")
    return Path(tempfile.gettempdir()) / f"ipu_norm_digits_{user}_{image_size}px_val{val_fraction:g}_seed{split_seed}"


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    image_size: int,
    test_size: int,
    num_classes: int,
    generated_samples: int,
    seed: int,
    verify: bool = False,
    generated_val_samples: int | None = None,
    digits_image_size: int | None = None,
    digits_val_fraction: float = 0.2,
    digits_split_seed: int = 0,
    digits_limit_per_class: int | None = None,
    train_augment: bool = True,
) -> Dataset:
    """Build a dataset by name.

    - ``generated``: :class:`GeneratedDataset` with ``generated_samples`` samples (val:
      ``generated_val_samples`` if given), at ``image_size`` for train and ``test_size`` for val (already
      normalised, no transforms).
    - ``imagefolder``: ImageNet layout ``root/train/<class>/*`` and ``root/val/<class>/*`` read with
      :class:`SafeImageFolder`; train uses RandomResizedCrop(image_size) + flip, val uses
      Resize(int(test_size / 0.875)) + CenterCrop(test_size), both on uint8 decoding only the crop
      (``build_*_transform_u8``): samples are ``(3, size, size)`` uint8, to be normalised on the device
      (:class:`ipu_norm.data.device.DeviceInput`; ToTensor + ImageNet Normalize arithmetic).
    - ``digits``: scikit-learn's real 8x8 handwritten digits exported as PNGs (at ``digits_image_size``,
      default ``image_size``) into ``root`` (or a per-user temp folder) by
      :func:`export_digits_imagefolder`, then read like ``imagefolder`` with digit transforms
      (pad-and-random-crop, no flip; see :func:`ipu_norm.data.transforms.build_digits_train_transform`), uint8
      like ``imagefolder``.
      The stratified train/val split uses ``digits_split_seed`` (not ``seed``), so changing the training
      seed keeps the same val set.

    Args:
        name: 'generated', 'imagefolder' or 'digits'.
        split: 'train' or 'val'.
        root: dataset root (required for 'imagefolder'; cache folder for 'digits').
        image_size: training resolution.
        test_size: evaluation resolution.
        num_classes: number of classes the model predicts.
        generated_samples: length of the 'generated' train split (and of val unless given below).
        seed: base seed of the per-sample augmentation / generation RNG.
        verify: for file datasets, decode every image at construction and drop unreadable ones.
        generated_val_samples: length of the 'generated' val split (default: ``generated_samples``).
        digits_image_size: side of the exported digits PNGs (default ``image_size``); the transforms
            then resize to ``image_size`` / ``test_size``.
        digits_val_fraction: val share of each class for 'digits'.
        digits_split_seed: random state of the digits train/val split.
        digits_limit_per_class: export only the first N digits of each class (fast tests, smoke runs).
        train_augment: ``False`` gives the train split the evaluation transform at ``image_size`` (resize +
            centre crop, no flip), as the fine-tuning stage at test resolution uses (``ipu_norm.train.finetune``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train = split == "train"
    # Train substitutes the next readable image for an unreadable one; val does too (fixed batch shapes) but
    # marks it so that evaluation leaves it out and counts it.
    bad_target = None if train else IGNORE_TARGET
    if name == "generated":
        if train or generated_val_samples is None:
            n = generated_samples
        else:
            n = generated_val_samples
        return GeneratedDataset(n, image_size if train else test_size, num_classes, seed, split=split)
    if name == "imagefolder":
        if root is None:
            raise ValueError(
                "data.root must be set for the 'imagefolder' dataset (a folder with train/ and val/ "
                "sub-folders, ImageNet layout); use `data.dataset: generated` for synthetic data"
            )
        split_dir = Path(root).expanduser() / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"dataset folder not found: {split_dir} (expected ImageNet layout {Path(root)}/train/<class>/*.JPEG "
                f"and {Path(root)}/val/<class>/*.JPEG). Point data.root at your dataset, or set "
                "`data.dataset: generated` to benchmark on synthetic data."
            )
        if train:
            transform = build_train_transform_u8(image_size) if train_augment else build_eval_transform_u8(image_size)
        else:
            transform = build_eval_transform_u8(test_size)
        ds = SafeImageFolder(split_dir, transform=transform, seed=seed, verify=verify, bad_target=bad_target)
        _check_classes(ds, num_classes)
        return ds
    if name == "digits":
        export_size = image_size if digits_image_size is None else digits_image_size
        if root is not None:
            cache = Path(root).expanduser()
        else:
            cache = default_digits_cache_dir(export_size, digits_val_fraction, digits_split_seed)
            if digits_limit_per_class is not None:
                cache = cache.with_name(f"{cache.name}_limit{digits_limit_per_class}")
        train_dir, val_dir = export_digits_imagefolder(
            cache,
            image_size=export_size,
            val_fraction=digits_val_fraction,
            seed=digits_split_seed,
            limit_per_class=digits_limit_per_class,
        )
        if train:
            build = build_digits_train_transform_u8 if train_augment else build_digits_eval_transform_u8
            transform = build(image_size)
        else:
            transform = build_digits_eval_transform_u8(test_size)
        ds = SafeImageFolder(
            train_dir if train else val_dir, transform=transform, seed=seed, verify=verify, bad_target=bad_target
        )
        _check_classes(ds, num_classes)
        return ds
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
