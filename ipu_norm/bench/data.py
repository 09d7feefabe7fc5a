"""Host input-pipeline benchmark: ``python -m ipu_norm.bench.data``.

Measures images/s of the training and the validation pipeline of :func:`ipu_norm.data.build_dataset`
(crop-aware JPEG decode, uint8 crop/resize/flip, uint8 batches; normalisation left to the device) against
torchvision's reference (PIL decode, RandomResizedCrop, flip, ToTensor, Normalize / Resize, CenterCrop, ...):

- per core: one thread, no loader, the variants interleaved round by round (A, B, C, D, A, B, ...) over the
  same files and the median taken, so the drift of a shared machine hits all alike;
- in total for N loader workers (``--workers``, default 1..cores): a DataLoader over the same files, both
  pipelines, images/s after a warm-up epoch.

Files: a corpus of real photographs shipped by installed packages (scikit-learn's ``china.jpg`` and
``flower.jpg``, matplotlib's ``grace_hopper.jpg``), cut into random crops, resized to ImageNet's typical sizes
(500x375, 375x500, 500x333, ...) and re-encoded as JPEG at qualities 75-95, made reproducibly (fixed seed) into
``--cache-dir`` in ImageNet layout (``train/<photo>/*.jpg``, ``val/<photo>/*.jpg``), so it also serves as a small
real image folder (``--data imagefolder --data-root <cache-dir>``). ``--data-root`` measures a folder of yours
instead (ImageNet layout; a sample of its files).

The last line is ``speedup vs torchvision: X.XXx (train), Y.YYx (val)`` (per core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ipu_norm.core.build import cache_dir
from ipu_norm.data.collate import collate_batch, collate_into
from ipu_norm.data.decode import EncodedImage, region_decoder_available
from ipu_norm.data.seeding import make_generator, mix_seed, seeded_cpu_rng
from ipu_norm.data.transforms import (
    build_eval_transform,
    build_eval_transform_u8,
    build_train_transform,
    build_train_transform_u8,
)

# ImageNet's most common sizes (width, height): most training images are 500 px on the long side.
CORPUS_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 500), (640, 480), (480, 360))
CORPUS_QUALITIES = (75, 80, 85, 90, 95)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def source_photos() -> dict[str, Image.Image]:
    """The real photographs that installed packages ship, by name (RGB)."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {Path(name).stem: Image.fromarray(img) for name, img in zip(sample.filenames, sample.images)}
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(hopper) as im:
        photos["grace_hopper"] = im.convert("RGB")
    return photos


def make_jpeg_corpus(root: str | os.PathLike, per_photo: int = 32, val_fraction: float = 0.25, seed: int = 0) -> Path:
    """Write the benchmark corpus into ``root`` (ImageNet layout) unless it is there already; returns ``root``.

    Each file is a random crop (40-100% of each side of the photo, random position, mirrored half of the time) of
    one photo, resized (Lanczos) to one of :data:`CORPUS_SIZES` and saved as JPEG at one of
    :data:`CORPUS_QUALITIES` (4:2:0, like most camera and web JPEGs). Everything is drawn from ``seed``.
    """
    root = Path(root)
    stamp = root / "corpus.json"
    spec = {"version": 1, "per_photo": per_photo, "val_fraction": val_fraction, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return root
    rng = np.random.default_rng(seed)
    n_val = max(1, round(per_photo * val_fraction))
    for name, photo in sorted(source_photos().items()):
        w0, h0 = photo.size
        for i in range(per_photo):
            fw, fh = rng.uniform(0.4, 1.0, size=2)
            cw, ch = max(8, int(w0 * fw)), max(8, int(h0 * fh))
            x, y = int(rng.integers(0, w0 - cw + 1)), int(rng.integers(0, h0 - ch + 1))
            size = CORPUS_SIZES[int(rng.integers(len(CORPUS_SIZES)))]
            quality = int(CORPUS_QUALITIES[int(rng.integers(len(CORPUS_QUALITIES)))])
            im = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.LANCZOS)
            if rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            split = "val" if i < n_val else "train"
            out = root / split / name / f"{name}_{i:03d}_q{quality}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            im.save(out, "JPEG", quality=quality)
    stamp.write_text(json.dumps(spec))
    return root


def default_cache_dir() -> Path:
    """Where the corpus is made when ``--cache-dir`` is not given."""
    return cache_dir() / "jpeg_corpus"


def list_images(folder: Path, limit: int) -> list[str]:
    """Up to ``limit`` image files of ``folder`` (class sub-folders visited round-robin, sorted, reproducible)."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir()) or [folder]
    per_class = [sorted(str(f) for f in c.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) for c in classes]
    out: list[str] = []
    for i in range(max((len(files) for files in per_class), default=0)):
        out += [files[i] for files in per_class if i < len(files)]
        if len(out) >= limit:
            break
    if not out:
        raise SystemExit(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return out[:limit]


def _split_dirs(root: Path) -> tuple[Path, Path]:
    train, val = root / "train", root / "val"
    if train.is_dir() and val.is_dir():
        return train, val
    return root, root


class FileDataset(Dataset):
    """The files of the benchmark through one pipeline: ``kind`` 'fast' (ipu_norm's) or 'reference' (torchvision).

    Sample ``i`` of epoch 0 is augmented with the seed ``(0, 0, i)``, as ``SafeImageFolder`` does; 'fast' batches
    are collated into one uint8 tensor by the dataset (``__getitems__``).
    """

    def __init__(self, files: Sequence[str], transform: Callable, kind: str) -> None:
        self.files, self.transform, self.kind = list(files), transform, kind

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        seed = mix_seed(0, 0, i)
        if self.kind == "fast":
            return self.transform(EncodedImage(self.files[i]), make_generator(seed)), 0
        from torchvision.datasets.folder import pil_loader

        image = pil_loader(self.files[i])
        with seeded_cpu_rng(seed):
            return self.transform(image), 0

    def __getitems__(self, indices: list[int]) -> Any:
        if self.kind != "fast":
            return [self[i] for i in indices]
        return collate_into((self[i] for i in indices), len(indices), (3, *self.transform.size))


def pipelines(train_size: int, test_size: int, val_crop_first: bool = False) -> dict[str, tuple[Callable, str]]:
    """The four measured pipelines: name -> (transform, kind)."""
    return {
        "train/torchvision": (build_train_transform(train_size), "reference"),
        "train/ipu_norm": (build_train_transform_u8(train_size), "fast"),
        "val/torchvision": (build_eval_transform(test_size), "reference"),
        "val/ipu_norm": (build_eval_transform_u8(test_size, crop_first=val_crop_first), "fast"),
    }


def per_core(datasets: dict[str, FileDataset], rounds: int, per_round: int) -> dict[str, float]:
    """Median images/s of each dataset's ``__getitem__`` on one thread, interleaved round by round."""
    rates: dict[str, list[float]] = {k: [] for k in datasets}
    for r in range(rounds + 1):  # round 0 warms up (file cache, lazy imports, the C helper)
        for name, ds in datasets.items():
            start = (r * per_round) % len(ds)
            t0 = time.perf_counter()
            for j in range(per_round):
                ds[(start + j) % len(ds)]
            if r:
                rates[name].append(per_round / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def with_workers(ds: FileDataset, workers: int, batch_size: int, epochs: int) -> float:
    """Images/s of a DataLoader with ``workers`` persistent workers over ``ds`` (after one warm-up epoch)."""
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_batch,
                        persistent_workers=workers > 0, drop_last=True)
    n = 0
    for _ in loader:  # warm-up: worker start, first decodes
        pass
    t0 = time.perf_counter()
    for _ in range(epochs):
        for images, _ in loader:
            n += images.shape[0]
    rate = n / (time.perf_counter() - t0)
    del loader
    return rate


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns the figures it printed."""
    p = argparse.ArgumentParser(prog="python -m ipu_norm.bench.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, help="your image folder (ImageNet layout: train/ and val/ with class "
                   "folders, or class folders directly); default: the corpus made from packaged photos")
    p.add_argument("--cache-dir", type=Path, help=f"where the corpus is made (default {default_cache_dir()})")
    p.add_argument("--images", type=int, default=96, help="files per split to use (default 96)")
    p.add_argument("--corpus-per-photo", type=int, default=32, help="corpus files made per source photo")
    p.add_argument("--train-size", type=int, default=224)
    p.add_argument("--test-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the per-core measurement")
    p.add_argument("--per-round", type=int, default=48, help="images per pipeline and round")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default 1..cores, at most 8)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="timed passes over the files per worker count")
    p.add_argument("--val-crop-first", action="store_true", help="validation decodes only the centre crop's source "
                   "box (ResizeCenterCropU8(crop_first=True): faster, pixel-close instead of equal)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    a = p.parse_args(argv)

    t_start = time.perf_counter()
    if a.data_root is not None:
        root = a.data_root.expanduser()
        if not root.is_dir():
            raise SystemExit(f"--data-root {root}: no such folder")
        what = f"your folder {root}"
    else:
        root = make_jpeg_corpus(a.cache_dir or default_cache_dir(), per_photo=a.corpus_per_photo)
        what = f"corpus from packaged photos in {root}"
    train_dir, val_dir = _split_dirs(root)
    files = {"train": list_images(train_dir, a.images), "val": list_images(val_dir, a.images)}
    all_files = files["train"] + files["val"]
    kbytes = np.mean([os.path.getsize(f) for f in all_files]) / 1e3
    pixels = []
    for f in all_files:
        with Image.open(f) as im:
            pixels.append(im.size[0] * im.size[1])
    print(f"files: {len(files['train'])} train / {len(files['val'])} val from {what}; mean {kbytes:.0f} KB, "
          f"{np.mean(pixels) / 1e3:.0f} kpixels")
    if region_decoder_available():
        decoder = "crop-aware libjpeg-turbo (C helper)"
    else:
        decoder = "torchvision decode_jpeg (whole image)"
    print(f"decoder: {decoder}; torch {torch.__version__}; {os.cpu_count()} cores")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = {name: FileDataset(files[name.split("/")[0]], tf, kind)
              for name, (tf, kind) in pipelines(a.train_size, a.test_size, a.val_crop_first).items()}
        core = per_core(ds, a.rounds, a.per_round)
    finally:
        torch.set_num_threads(threads)
    print(f"\nper core (1 thread, no loader; median of {a.rounds} interleaved rounds of {a.per_round} images):")
    print(f"  {'pipeline':8s} {'torchvision img/s':>18s} {'ipu_norm img/s':>15s} {'speedup':>8s}")
    speedup = {}
    for split in ("train", "val"):
        ref, fast = core[f"{split}/torchvision"], core[f"{split}/ipu_norm"]
        speedup[split] = fast / ref
        print(f"  {split:8s} {ref:18.0f} {fast:15.0f} {speedup[split]:7.2f}x")

    cores = os.cpu_count() or 1
    counts = [int(w) for w in a.workers.split(",")] if a.workers else list(range(1, min(cores, 8) + 1))
    scaling: dict[str, dict[int, float]] = {name: {} for name in ds}
    print(f"\nDataLoader, batch {a.batch_size}, persistent workers (img/s in total, per worker):")
    print(f"  {'workers':>7s} " + " ".join(f"{name:>24s}" for name in ds))
    for w in counts:
        for name, d in ds.items():
            scaling[name][w] = with_workers(d, w, min(a.batch_size, len(d)), a.epochs)
        print(f"  {w:7d} " + " ".join(f"{scaling[n][w]:12.0f} ({scaling[n][w] / max(w, 1):5.0f}/w)" for n in ds))
    elapsed = time.perf_counter() - t_start
    print(f"\n({elapsed:.0f} s; the machine may be shared: per-core figures are interleaved medians)")
    print(f"speedup vs torchvision: {speedup['train']:.2f}x (train), {speedup['val']:.2f}x (val)")
    result = {"per_core_img_s": core, "speedup": speedup, "workers_img_s": scaling, "decoder": decoder,
              "files": {k: len(v) for k, v in files.items()}, "elapsed_s": elapsed}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
