"""Export scikit-learn's real handwritten digits as an ImageNet-style image folder.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-level scans (values 0..16) of handwritten digits
inside the scikit-learn package, so it needs no download. Writing them as PNG files lets the very same
file-based pipeline used for ImageNet (``SafeImageFolder`` + PIL + transforms) be exercised and trained on
real data in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

_MARKER = ".digits_export.json"


def _export_params(image_size: int, val_fraction: float, seed: int, limit_per_class: int | None) -> dict:
    return {
        "source": "sklearn.datasets.load_digits",
        "image_size": int(image_size),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "limit_per_class": None if limit_per_class is None else int(limit_per_class),
    }


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / _MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def export_digits_imagefolder(
    root: str | os.PathLike,
    image_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    *,
    limit_per_class: int | None = None,
    wait_timeout_s: float = 120.0,
) -> tuple[Path, Path]:
    """Write the sklearn digits as RGB PNGs into ``root/train/<class>/`` and ``root/val/<class>/``.

    Each 8x8 image (0..16) is scaled to 0..255, upscaled to ``image_size`` with bilinear interpolation and
    replicated to 3 channels. The train/val split is stratified by class (``train_test_split`` with
    ``random_state=seed``); file names keep the index in the original array (``00042.png``).

    Idempotent and safe to call from several processes at once (e.g. one per DDP rank): the export is
    written to a private temporary folder and moved into place, and a marker file records the parameters.
    A matching existing export is reused; an export with other parameters raises (delete the folder or
    pick another root) rather than silently mixing two datasets.

    Args:
        root: destination folder (created if needed; its parent folder must exist: a mistyped path does not
            create a tree of folders).
        image_size: side of the written square images.
        val_fraction: fraction of each class that goes to ``val``.
        seed: random state of the stratified split.
        limit_per_class: keep only the first N images of each class (small exports for fast tests).
        wait_timeout_s: how long to wait for a concurrent exporter to finish.

    Returns:
        ``(train_dir, val_dir)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(root)
    if not root.parent.is_dir():
        raise FileNotFoundError(f"data.root {root}: the folder {root.parent} does not exist (create it, fix the path)")
    train_dir, val_dir = root / "train", root / "val"
    params = _export_params(image_size, val_fraction, seed, limit_per_class)

    existing = _read_marker(root)
    if existing is not None:
        if existing != params:
            raise FileExistsError(
                f"{root} already holds a digits export with different parameters {existing}; "
                f"requested {params}. Delete it or choose another root."
            )
        return train_dir, val_dir
    if train_dir.exists() or val_dir.exists():
        # Either a concurrent exporter is moving its folders into place, or the folder is someone else's.
        return _wait_for_marker(root, params, wait_timeout_s)

    digits = load_digits()
    images = digits.images  # (1797, 8, 8) float in [0, 16]
    labels = digits.target.astype(np.int64)
    indices = np.arange(len(labels))
    if limit_per_class is not None:
        indices = np.concatenate([np.flatnonzero(labels == c)[:limit_per_class] for c in np.unique(labels)])
        indices.sort()
    train_idx, val_idx = train_test_split(
        indices, test_size=val_fraction, stratify=labels[indices], random_state=seed, shuffle=True
    )

    root.mkdir(exist_ok=True)
    tmp = root / f".tmp-export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for split, split_idx in (("train", train_idx), ("val", val_idx)):
            for c in np.unique(labels):
                (tmp / split / str(int(c))).mkdir(parents=True, exist_ok=True)
            for i in sorted(split_idx.tolist()):
                grey = np.clip(np.rint(images[i] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
                img = Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BILINEAR)
                img.convert("RGB").save(tmp / split / str(int(labels[i])) / f"{i:05d}.png", compress_level=1)
        try:
            os.rename(tmp / "train", train_dir)
            os.rename(tmp / "val", val_dir)
        except OSError:
            # Lost the race against another exporter: use its result.
            return _wait_for_marker(root, params, wait_timeout_s)
        marker_tmp = tmp / _MARKER
        marker_tmp.write_text(json.dumps(params))
        os.replace(marker_tmp, root / _MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return train_dir, val_dir


def _wait_for_marker(root: Path, params: dict, timeout_s: float) -> tuple[Path, Path]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        marker = _read_marker(root)
        if marker is not None:
            if marker != params:
                raise FileExistsError(f"{root} holds a digits export with parameters {marker}, not {params}")
            return root / "train", root / "val"
        time.sleep(0.2)
    raise FileExistsError(
        f"{root}/train or {root}/val exists but is not a completed digits export (no {_MARKER}); "
        "delete it or choose another root."
    )
