"""The uint8 input pipeline: same augmentation as torchvision's reference, same normalised values, same policies.

References are independent of the code under test: torchvision's ``RandomResizedCrop.get_params`` and its PIL
transforms, torchvision's ``decode_jpeg``, Pillow. Statistical tests use fixed seeds (deterministic, not flaky)
and each is paired with a check that it can tell a wrong distribution apart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from ipu_norm.bench.data import main as bench_main
from ipu_norm.bench.data import make_jpeg_corpus
from ipu_norm.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceInput,
    EncodedImage,
    NormalizeUint8,
    RandomResizedCropFlipU8,
    ResizeCenterCropU8,
    ResumableSampler,
    SafeImageFolder,
    build_dataset,
    build_loader,
    normalize_uint8,
    random_resized_crop_box,
)
from ipu_norm.data import decode as decode_mod
from ipu_norm.data.decode import dct_scale_for
from ipu_norm.data.transforms import resize_uint8

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus of real photographs re-encoded as ImageNet-sized JPEGs (4 per photo, qualities 75-95)."""
    return make_jpeg_corpus(tmp_path_factory.mktemp("corpus"), per_photo=4)


def _jpegs(corpus: Path) -> list[Path]:
    return sorted(corpus.rglob("*.jpg"))


def _pil_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _u8(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------------- crop distribution


def _torchvision_boxes(height: int, width: int, n: int, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    img = torch.empty(1, height, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


def _our_boxes(height: int, width: int, n: int, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    g = torch.Generator().manual_seed(seed)
    return np.array([random_resized_crop_box(height, width, scale, ratio, g) for _ in range(n)])


def _features(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T.astype(float)
    return {
        "area": h * w / (height * width),
        "log_ratio": np.log(w / h),
        "top": (top + h / 2) / height,  # box centres
        "left": (left + w / 2) / width,
    }


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (40, 400)])
def test_random_resized_crop_distribution_matches_torchvision(height: int, width: int) -> None:
    """Two-sample KS tests on area fraction, log aspect ratio and centre position (3000 draws each, fixed seeds)."""
    n = 3000
    ours = _features(_our_boxes(height, width, n, seed=1), height, width)
    ref = _features(_torchvision_boxes(height, width, n, seed=2), height, width)
    for key in ours:
        assert stats.ks_2samp(ours[key], ref[key]).pvalue > 1e-3, key
    # The test has power: a different scale range is told apart.
    other = _features(_torchvision_boxes(height, width, n, seed=3, scale=(0.2, 1.0)), height, width)
    assert stats.ks_2samp(ours["area"], other["area"]).pvalue < 1e-6
    # Every box lies inside the image, as torchvision's do.
    b = _our_boxes(height, width, 500, seed=4)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 0] + b[:, 2] <= height).all() and (b[:, 1] + b[:, 3] <= width).all()


def test_random_resized_crop_fallback_equals_torchvision() -> None:
    """Where no random box fits (a 4x300 strip), both fall back to the same centred, ratio-clamped box."""
    g = torch.Generator().manual_seed(0)
    ours = {random_resized_crop_box(4, 300, (0.9, 1.0), (3 / 4, 4 / 3), g) for _ in range(20)}
    ref = {tuple(b) for b in _torchvision_boxes(4, 300, 20, seed=0, scale=(0.9, 1.0))}
    assert ours == ref and len(ours) == 1


def test_train_transform_applies_the_drawn_box_and_flips(corpus: Path) -> None:
    """The output is the drawn box, resized, flipped when the flip draw says so."""
    path = _jpegs(corpus)[0]
    full = decode_jpeg(torch.from_numpy(np.frombuffer(path.read_bytes(), np.uint8).copy()), mode=ImageReadMode.RGB)
    tf = RandomResizedCropFlipU8(32, dct_scale=False)
    flipped = 0
    for i in range(12):
        out = tf(EncodedImage(path), torch.Generator().manual_seed(i))
        g = torch.Generator().manual_seed(i)
        top, left, h, w = random_resized_crop_box(*full.shape[-2:], tf.scale, tf.ratio, g)
        flip = float(torch.rand((), generator=g)) < 0.5
        expected = resize_uint8(full[:, top : top + h, left : left + w], [32, 32])
        expected = expected.flip(-1) if flip else expected
        diff = (out.int() - expected.int()).abs()  # region and whole-image decodes differ in rare edge pixels
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        assert diff.float().mean() < 0.5 and (diff > 2).float().mean() < 0.01
        flipped += flip
    assert 0 < flipped < 12


def test_train_flip_rate_is_one_half(tmp_path: Path) -> None:
    """Flips read off the pipeline's outputs on a left-to-right ramp: rate 0.5 (chi-square, 600 samples)."""
    ramp = np.tile((np.arange(64) * 4).astype(np.uint8), (48, 1))
    Image.fromarray(np.stack([ramp] * 3, -1)).save(tmp_path / "ramp.png")
    image = EncodedImage(tmp_path / "ramp.png")
    tf = RandomResizedCropFlipU8(8)
    n = 600
    flips = 0
    for i in range(n):
        row = tf(image, torch.Generator().manual_seed(i))[0].float().mean(0)
        assert row[0] != row[-1]
        flips += bool(row[0] > row[-1])
    assert stats.chisquare([flips, n - flips]).pvalue > 1e-3
    assert stats.chisquare([flips, n - flips], [0.3 * n, 0.7 * n]).pvalue < 1e-6  # power: 0.3 would be rejected


def test_dct_scale_choice() -> None:
    """M/8 keeps the decoded region at least twice the output (so the resize still antialiases a 2x reduction)."""
    assert dct_scale_for((300, 300), (112, 112)) == 6  # 300 * 6/8 = 225 >= 224 > 300 * 5/8
    assert dct_scale_for((300, 300), (224, 224)) == 8  # ImageNet sizes: no DCT scaling
    assert dct_scale_for((100, 100), (224, 224)) == 8  # never upscale in the decoder
    assert dct_scale_for((400, 300), (16, 16)) == 1
    for box in [(333, 417), (224, 224), (1000, 250)]:
        for out in [(16, 16), (64, 64), (100, 100)]:
            m = dct_scale_for(box, out)
            assert min(box[0] * m / 8 / out[0], box[1] * m / 8 / out[1]) >= 2 or m == 8
            assert m == 1 or min(box[0] * (m - 1) / 8 / out[0], box[1] * (m - 1) / 8 / out[1]) < 2


# ------------------------------------------------------------------------------ validation closeness

# Tolerances against torchvision's Resize(256) + CenterCrop(224) on the same JPEG, in uint8 levels. Default order
# (resize the whole image, then crop): one level (the two resize kernels round differently). crop_first=True moves
# the box by up to half a source pixel (measured on the benchmark corpus: mean 0.9, 99th percentile 14, worst image
# mean 3.8; max ~70 at a few high-contrast edges, not bounded here).
CROP_FIRST_MEAN_TOL, CROP_FIRST_IMAGE_MEAN_TOL, CROP_FIRST_P99_TOL = 1.5, 5.0, 25.0


def test_val_transform_matches_torchvision(corpus: Path) -> None:
    ref = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224)])
    exact, crop_first = ResizeCenterCropU8(224, 256), ResizeCenterCropU8(224, 256, crop_first=True)
    d_exact, d_first = [], []
    for path in _jpegs(corpus):
        expected = _u8(ref(_pil_rgb(path))).int()
        for tf, diffs in ((exact, d_exact), (crop_first, d_first)):
            out = tf(EncodedImage(path))
            assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
            diffs.append((out.int() - expected).abs().numpy())
    assert np.stack(d_exact).max() <= 1
    d = np.stack(d_first)
    assert d.mean() < CROP_FIRST_MEAN_TOL
    assert d.mean(axis=(1, 2, 3)).max() < CROP_FIRST_IMAGE_MEAN_TOL
    assert np.percentile(d, 99) < CROP_FIRST_P99_TOL
    with pytest.raises(ValueError, match="crop_first"):
        ResizeCenterCropU8(224, 256, dct_scale=True)


@pytest.mark.parametrize("hw", [(37, 53), (64, 40), (30, 30)])
def test_val_source_box_matches_torchvision_geometry(hw: tuple[int, int], tmp_path: Path) -> None:
    """On an image whose pixels encode their column (a ramp), the kept source span equals torchvision's."""
    h, w = hw
    ramp = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    pil = Image.fromarray(np.stack([ramp] * 3, -1))
    pil.save(tmp_path / "ramp.png")
    image = EncodedImage(tmp_path / "ramp.png")
    for size, resize in ((16, 18), (24, 24)):
        ref = _u8(T.CenterCrop(size)(T.Resize(resize, antialias=True)(pil))).float()
        assert (ResizeCenterCropU8(size, resize)(image).float() - ref).abs().max() <= 1
        # Crop-first: the column means follow the same ramp (mean level difference below 2% of the range).
        out = ResizeCenterCropU8(size, resize, crop_first=True)(image).float()
        assert (out.mean(dim=(0, 1)) - ref.mean(dim=(0, 1))).abs().mean() < 0.02 * 255


# ---------------------------------------------------------------------------------- same normalisation


def test_device_normalisation_equals_totensor_normalize(corpus: Path) -> None:
    """uint8 crop -> normalize_uint8 == the reference ToTensor + Normalize of the same crop (float tolerance)."""
    pil = _pil_rgb(_jpegs(corpus)[1]).crop((10, 20, 210, 170))
    ref = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(pil))
    x = _u8(pil)
    torch.testing.assert_close(normalize_uint8(x[None])[0], ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(NormalizeUint8()(x[None])[0], ref, rtol=1e-6, atol=1e-6)
    batch = torch.stack([x, x.flip(-1)])
    torch.testing.assert_close(DeviceInput("cpu")(batch), torch.stack([ref, ref.flip(-1)]), rtol=1e-6, atol=1e-6)
    floats = torch.randn(2, 3, 4, 4)
    assert DeviceInput("cpu")(floats) is floats  # float batches (generated data) pass unchanged
    assert DeviceInput("cpu", keep_uint8=True)(batch).dtype == torch.uint8
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(floats)


def test_model_sees_the_reference_values_for_the_same_crop(corpus: Path) -> None:
    """Whole chain on one box: JPEG -> our region decode + uint8 resize + device normalisation vs torchvision's
    PIL decode + resized_crop + ToTensor + Normalize. Differences: rounding of the uint8 resize (1 level)."""
    path = _jpegs(corpus)[2]
    pil = _pil_rgb(path)
    top, left, h, w = 30, 40, 200, 180
    ref = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(
        T.ToTensor()(T.functional.resized_crop(pil, top, left, h, w, [64, 64], antialias=True))
    )
    ours = normalize_uint8(resize_uint8(EncodedImage(path).region(top, left, h, w), [64, 64])[None])[0]
    one_level = 1.0 / 255 / min(IMAGENET_STD)
    err = (ours - ref).abs()
    assert err.mean() < 0.5 * one_level and err.max() <= 3 * one_level + 1e-6


# ----------------------------------------------------------------------------------------- decoding


def test_region_decode_equals_whole_decode_and_fallbacks(corpus: Path, monkeypatch) -> None:
    path = _jpegs(corpus)[3]
    full = decode_jpeg(torch.from_numpy(np.frombuffer(path.read_bytes(), np.uint8).copy()), mode=ImageReadMode.RGB)
    img = EncodedImage(path)
    assert img.size == tuple(full.shape[-2:])
    box = (17, 33, 150, 201)
    region = img.region(*box)
    expected = full[:, 17:167, 33:234]
    assert region.shape == expected.shape
    assert (region.int() - expected.int()).abs().gt(0).float().mean() < 0.01  # edge pixels of the window only
    scaled = img.region(*box, out_hw=(20, 20))  # DCT-downscaled: smaller, never below twice the output size
    assert 40 <= scaled.shape[1] < 150 and 40 <= scaled.shape[2] < 201
    # Without the C helper: torchvision's whole-image decode, sliced.
    monkeypatch.setattr(decode_mod, "_lib", lambda: None)
    assert torch.equal(EncodedImage(path).region(*box), expected)


def test_non_rgb_and_broken_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(arr[..., 0]).save(tmp_path / "gray.jpg", quality=95)
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(arr).save(tmp_path / "rgb.png")
    good = (tmp_path / "gray.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + rng.bytes(300) + b"\xff\xd9")
    gray = EncodedImage(tmp_path / "gray.jpg").region(0, 0, 40, 50)
    assert gray.shape == (3, 40, 50) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    cmyk = EncodedImage(tmp_path / "cmyk.jpg").region(0, 0, 40, 50)
    assert torch.equal(cmyk, _u8(_pil_rgb(tmp_path / "cmyk.jpg")))  # Pillow decides CMYK, as before
    png = EncodedImage(tmp_path / "rgb.png").region(5, 6, 7, 8)
    assert torch.equal(png, torch.from_numpy(arr[5:12, 6:14]).permute(2, 0, 1))
    for name in ("truncated.jpg", "garbage.jpg"):
        with pytest.raises(OSError):
            EncodedImage(tmp_path / name).region(0, 0, 1, 1)
    with pytest.raises(ValueError, match="outside"):
        EncodedImage(tmp_path / "rgb.png").region(0, 0, 41, 50)


def test_safe_image_folder_substitutes_corrupt_jpegs_on_the_uint8_path(tmp_path: Path, corpus: Path) -> None:
    root = tmp_path / "f"
    for i, src in enumerate(_jpegs(corpus)[:4]):
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"{i}.jpg").write_bytes(src.read_bytes())
    data = (root / "a" / "1.jpg").read_bytes()
    (root / "a" / "1.jpg").write_bytes(data[: len(data) // 3])  # truncated
    ds = SafeImageFolder(root, transform=ResizeCenterCropU8(24, 27, crop_first=True))
    out = [ds[i] for i in range(4)]
    assert ds.num_skipped == 1 and torch.equal(out[1][0], out[2][0])
    assert all(x.dtype == torch.uint8 and x.shape == (3, 24, 24) for x, _ in out)


# -------------------------------------------------------------------------------- loader / collation


def test_loader_batches_uint8_persistent_workers_and_epochs(corpus: Path) -> None:
    kw = dict(root=corpus, image_size=24, test_size=24, num_classes=3, generated_samples=1, seed=7)
    ds = build_dataset("imagefolder", "train", **kw)
    sampler = ResumableSampler(len(ds), seed=7)
    batches = {}
    for workers in (0, 2):
        loader = build_loader(ds, batch_size=3, sampler=sampler, num_workers=workers, drop_last=True, seed=7)
        assert loader.persistent_workers == (workers > 0)
        for epoch in (0, 1, 0):
            sampler.set_epoch(epoch)
            got = [(x.clone(), y.clone()) for x, y in loader]
            batches.setdefault((workers, epoch), got)
            assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[(workers, epoch)], got))  # epoch 0 again
    x, y = batches[(0, 0)][0]
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 24, 24) and y.dtype == torch.int64
    for epoch in (0, 1):  # workers do not change a batch; persistent workers still follow the epoch
        for a, b in zip(batches[(0, epoch)], batches[(2, epoch)]):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(batches[(2, 0)][0][0], batches[(2, 1)][0][0])


def test_getitems_batch_equals_per_sample_items(corpus: Path) -> None:
    ds = build_dataset("imagefolder", "val", root=corpus, image_size=16, test_size=20, num_classes=3,
                       generated_samples=1, seed=0)
    images, targets = ds.__getitems__([0, 2, (1, 1)])
    assert images.shape == (3, 3, 20, 20) and targets.tolist() == [ds[0][1], ds[2][1], ds[1][1]]
    assert torch.equal(images[1], ds[2][0]) and torch.equal(images[2], ds[1][0])


# --------------------------------------------------------------------------------- trainer / benchmark


def test_tiny_training_on_a_jpeg_folder_reports_data_wait(tmp_path: Path, corpus: Path) -> None:
    from ipu_norm.config import load_config
    from ipu_norm.train.trainer import train

    cfgs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(cfgs / "tiny_resnet18_gn.yml", flags={
        "train.output_dir": str(tmp_path / "run"), "data.dataset": "imagefolder", "data.root": str(corpus),
        "train.epochs": 1, "model.num_classes": 3, "data.num_workers": 1,
    })
    messages: list[str] = []
    result = train(cfg, log=messages.append)
    assert result.global_step >= 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows and all(r["data_wait_s"] >= 0 and 0 <= r["data_wait_frac"] <= 1 for r in train_rows)
    assert any("data wait" in m for m in messages)
    assert math.isfinite(rows[-1]["val_loss"])


def test_benchmark_prints_the_speedups(tmp_path: Path, capsys) -> None:
    out = bench_main(["--cache-dir", str(tmp_path / "c"), "--corpus-per-photo", "4", "--images", "6", "--rounds", "1",
                      "--per-round", "3", "--workers", "0", "--batch-size", "3", "--epochs", "1", "--train-size", "32",
                      "--test-size", "32", "--json", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    line = text.strip().splitlines()[-1]
    assert line.startswith("speedup vs torchvision: ") and line.endswith("(val)")
    assert f"{out['speedup']['train']:.2f}x (train)" in line
    assert json.loads((tmp_path / "r.json").read_text())["speedup"] == out["speedup"]
    assert all(v > 0 for v in out["per_core_img_s"].values())


def test_digits_train_transform_is_resize_pad_and_random_crop(tmp_path: Path) -> None:
    """ResizeRandomCropU8 = torchvision's Resize(size) + RandomCrop(size, padding) (offsets uniform in [0, 2p])."""
    from ipu_norm.data import ResizeRandomCropU8

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "d.png")
    pil, image = _pil_rgb(tmp_path / "d.png"), EncodedImage(tmp_path / "d.png")
    tf = ResizeRandomCropU8(16, padding=2)
    resized = _u8(T.Resize(16, antialias=True)(pil))
    padded = torch.nn.functional.pad(resized, (2, 2, 2, 2))
    offsets = []
    for i in range(300):
        out = tf(image, torch.Generator().manual_seed(i))
        g = torch.Generator().manual_seed(i)
        top, left = (int(torch.randint(0, 5, (), generator=g)) for _ in range(2))
        assert (out.int() - padded[:, top : top + 16, left : left + 16].int()).abs().max() <= 1
        offsets += [top, left]
    counts = np.bincount(offsets, minlength=5)
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform over the 5 offsets, like RandomCrop's randint


def test_decoder_build_failure_falls_back_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IPU_NORM_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("CC", str(tmp_path / "no_such_compiler"))
    with pytest.warns(RuntimeWarning, match="crop-aware JPEG decoder is unavailable"):
        assert decode_mod._lib.__wrapped__() is None
