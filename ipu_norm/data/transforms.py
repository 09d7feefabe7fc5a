"""Standard image transforms (torchvision / timm ImageNet conventions) and the digits variant, in two forms.

- ``build_*_transform``: torchvision's reference pipelines on PIL images, normalised float32 out (the reference
  the benchmark ``python -m ipu_norm.bench.data`` and the tests compare against; usable on any dataset).
- ``build_*_transform_u8``: the same augmentations on uint8 tensors, drawing from an explicit per-sample
  ``torch.Generator`` and decoding only the crop of a JPEG (:mod:`ipu_norm.data.decode`); normalisation is left
  to the device (:func:`ipu_norm.data.device.normalize_uint8`). The datasets of :func:`build_dataset` use these.
"""

from __future__ import annotations

import math

import torch
from torchvision import transforms as T

from .decode import EncodedImage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision/timm evaluate at crop_pct 0.875: resize the short side to size / 0.875, then centre-crop size.
DEFAULT_CROP_PCT = 0.875


def build_train_transform(image_size: int) -> T.Compose:
    """ImageNet training transform: RandomResizedCrop + horizontal flip + ToTensor + Normalize.

    RandomResizedCrop uses torchvision's defaults (scale (0.08, 1), ratio (3/4, 4/3), bilinear), as in the
    torchvision reference recipe and timm. Randomness comes from the global CPU RNG; datasets in this
    package call it under :func:`ipu_norm.data.seeding.seeded_cpu_rng` so it is reproducible per sample.
    """
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def build_eval_transform(test_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> T.Compose:
    """ImageNet evaluation transform: Resize(int(test_size / crop_pct)) + CenterCrop(test_size) + Normalize."""
    return T.Compose(
        [
            T.Resize(int(test_size / crop_pct), antialias=True),
            T.CenterCrop(test_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def build_digits_train_transform(image_size: int) -> T.Compose:
    """Digits training transform: resize to ``image_size``, random crop with padding, no flip.

    Handwritten digits are small centred glyphs: RandomResizedCrop's aggressive zoom (down to 8% of the
    area) cuts digits apart, and a horizontal flip changes their meaning (a flipped 2 is no digit), so the
    CIFAR-style "pad by 1/8 then random crop" jitter is used instead. ImageNet mean/std are kept so that
    models see inputs on the same scale whatever the dataset.
    """
    return T.Compose(
        [
            T.Resize(image_size, antialias=True),
            T.RandomCrop(image_size, padding=max(1, image_size // 8)),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def build_digits_eval_transform(test_size: int) -> T.Compose:
    """Digits evaluation transform: resize to ``test_size`` (the glyph fills the image; no crop margin)."""
    return T.Compose(
        [
            T.Resize(test_size, antialias=True),
            T.CenterCrop(test_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# ------------------------------------------------------------------------------------------------------------------
# uint8 pipeline: the same augmentations on (3, H, W) uint8 tensors, decoding only the crop (ipu_norm.data.decode).
# Normalisation (ToTensor + Normalize above) happens on the device: ipu_norm.data.device.normalize_uint8.


def resize_uint8(image: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Antialiased bilinear resize of a ``(C, H, W)`` uint8 tensor to ``size`` = [h, w], uint8 out.

    torch's uint8 kernel (torch 2.0.1 too), within one level of Pillow's / torchvision's reference resize. Measured
    per 300x280 -> 224 px: torch 2.14 0.7 ms (like transforms.v2), torch 2.0.1 1.4 ms, where torchvision 0.15's
    v2 resize goes through float (4.4 ms) and v1 ``transforms.functional.resize`` on tensors is slower still.
    """
    return torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True,
                                           align_corners=False)[0]


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop, torchvision's ``RandomResizedCrop.get_params`` algorithm.

    Up to 10 tries of an area fraction uniform in ``scale`` and an aspect ratio log-uniform in ``ratio``; a box
    that fits is placed uniformly. Otherwise the centred crop of the whole image with the ratio clamped to
    ``ratio``. The draws come from ``generator`` (torchvision's use the global RNG).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCropFlipU8:
    """Training transform on uint8: RandomResizedCrop(size) + horizontal flip, decoding only the crop.

    Same parameters and distribution as torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` (scale
    (0.08, 1), ratio (3/4, 4/3), antialiased bilinear, flip probability 0.5); the draws come from the
    per-sample generator. With ``dct_scale`` a JPEG crop more than twice the output is decoded DCT-downscaled by
    the smallest M/8 that keeps it at least twice the output's size (:func:`ipu_norm.data.decode.dct_scale_for`),
    then resized (antialiased) as without: same box, slightly different pixels (never at ImageNet's 224 px from
    ~500 px photos, where M stays 8), less decoding for small outputs.

    Call with an :class:`~ipu_norm.data.decode.EncodedImage` and a ``torch.Generator``; returns ``(3, size, size)``
    uint8.
    """

    encoded_input = True  # called with (EncodedImage, generator): see SafeImageFolder

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        *,
        dct_scale: bool = True,
    ) -> None:
        self.size = (int(size), int(size))
        self.scale, self.ratio, self.flip_p, self.dct_scale = tuple(scale), tuple(ratio), float(flip_p), dct_scale

    def __call__(self, image: EncodedImage, generator: torch.Generator) -> torch.Tensor:
        top, left, h, w = random_resized_crop_box(*image.size, self.scale, self.ratio, generator)
        flip = float(torch.rand((), generator=generator)) < self.flip_p
        out = resize_uint8(image.region(top, left, h, w, self.size if self.dct_scale else None), list(self.size))
        return out.flip(-1) if flip else out


class ResizeCenterCropU8:
    """Evaluation transform on uint8: ``Resize(resize_size)`` (short side) + ``CenterCrop(size)``.

    Default: exactly torchvision's order (decode, resize the whole image so its short side is ``resize_size``,
    crop the centre), equal to torchvision's reference within one uint8 level (the resize kernels round
    differently). ``crop_first=True`` instead decodes only the source box that resize-then-crop keeps (rounded to
    whole source pixels) and resizes it to ``size``: ~1.3x faster (2.8x vs 2.2x the reference per core on the
    benchmark's photos), but pixel-close rather than equal: the box may be off by up to half a source pixel,
    which shifts edges (mean absolute difference ~0.9 of 255 levels, 99th percentile ~14; both tolerances are
    asserted in tests/test_data_pipeline.py). ``dct_scale`` (crop-first only) as in
    :class:`RandomResizedCropFlipU8`; it moved validation pixels by a further ~2 levels on average.
    """

    encoded_input = True  # called with (EncodedImage, generator): see SafeImageFolder

    def __init__(self, size: int, resize_size: int, *, crop_first: bool = False, dct_scale: bool = False) -> None:
        if resize_size < size:
            raise ValueError(
                f"resize size {resize_size} < crop size {size} (crop_pct > 1 would pad; not supported on uint8)"
            )
        if dct_scale and not crop_first:
            raise ValueError("dct_scale needs crop_first=True (the default path resizes the whole image exactly)")
        self.size = (int(size), int(size))
        self.resize_size, self.crop_first, self.dct_scale = int(resize_size), crop_first, dct_scale

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's ``Resize(resize_size)`` output ``(h, w)``: short side ``resize_size``, long one truncated."""
        return _short_side_size(height, width, self.resize_size)

    def crop_offsets(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's ``CenterCrop(size)`` ``(top, left)`` in the resized image."""
        new_h, new_w = self.resized_size(height, width)
        return int(round((new_h - self.size[0]) / 2.0)), int(round((new_w - self.size[1]) / 2.0))

    def source_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` in the source image of what Resize + CenterCrop keep (whole pixels)."""
        boxes = []
        for n_src, n_new, start, n_crop in zip((height, width), self.resized_size(height, width),
                                               self.crop_offsets(height, width), self.size):
            s = n_src / n_new
            lo, hi = int(round(start * s)), int(round((start + n_crop) * s))
            boxes.append((max(lo, 0), max(min(hi, n_src) - max(lo, 0), 1)))
        (top, h), (left, w) = boxes
        return top, left, h, w

    def __call__(self, image: EncodedImage, generator: torch.Generator | None = None) -> torch.Tensor:  # noqa: ARG002
        h, w = image.size
        if self.crop_first:
            box = self.source_box(h, w)
            return resize_uint8(image.region(*box, self.size if self.dct_scale else None), list(self.size))
        resized = resize_uint8(image.region(0, 0, h, w), list(self.resized_size(h, w)))
        top, left = self.crop_offsets(h, w)
        return resized[:, top : top + self.size[0], left : left + self.size[1]]


class ResizeRandomCropU8:
    """Digits training transform on uint8: ``Resize(size)`` + ``RandomCrop(size, padding)`` with zero padding.

    The offsets are uniform in ``[0, 2 * padding]`` per axis like torchvision's RandomCrop after padding; zero
    padding in uint8 equals torchvision's (0 before ToTensor).
    """

    encoded_input = True  # called with (EncodedImage, generator): see SafeImageFolder

    def __init__(self, size: int, padding: int) -> None:
        self.size, self.padding = (int(size), int(size)), int(padding)

    def __call__(self, image: EncodedImage, generator: torch.Generator) -> torch.Tensor:
        h, w = image.size
        new = _short_side_size(h, w, self.size[0])
        x = resize_uint8(image.region(0, 0, h, w), list(new))
        p = self.padding
        x = torch.nn.functional.pad(x, (p, p, p, p))
        th, tw = self.size
        top = int(torch.randint(0, x.shape[-2] - th + 1, (), generator=generator))
        left = int(torch.randint(0, x.shape[-1] - tw + 1, (), generator=generator))
        return x[:, top : top + th, left : left + tw]


def _short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(int)`` output size: the short side becomes ``size``, the long one is truncated."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def build_train_transform_u8(image_size: int) -> RandomResizedCropFlipU8:
    """uint8 counterpart of :func:`build_train_transform` (normalisation left to the device)."""
    return RandomResizedCropFlipU8(image_size)


def build_eval_transform_u8(
    test_size: int, crop_pct: float = DEFAULT_CROP_PCT, *, crop_first: bool = False
) -> ResizeCenterCropU8:
    """uint8 counterpart of :func:`build_eval_transform` (``crop_first``: see :class:`ResizeCenterCropU8`)."""
    return ResizeCenterCropU8(test_size, int(test_size / crop_pct), crop_first=crop_first)


def build_digits_train_transform_u8(image_size: int) -> ResizeRandomCropU8:
    """uint8 counterpart of :func:`build_digits_train_transform`."""
    return ResizeRandomCropU8(image_size, padding=max(1, image_size // 8))


def build_digits_eval_transform_u8(test_size: int) -> ResizeCenterCropU8:
    """uint8 counterpart of :func:`build_digits_eval_transform`."""
    return ResizeCenterCropU8(test_size, test_size)
