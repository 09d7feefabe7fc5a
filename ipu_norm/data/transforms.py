"""Standard image transforms (torchvision / timm ImageNet conventions) and the digits variant."""

from __future__ import annotations

from torchvision import transforms as T

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
