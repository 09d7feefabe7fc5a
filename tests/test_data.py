"""Data pipeline: datasets, corrupt-file handling, digits export, resumable sampling/loading, Mixup/CutMix."""

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DistributedSampler

from ipu_norm.data import (
    GeneratedDataset,
    MixupCutmix,
    ResumableSampler,
    SafeImageFolder,
    SoftTargetCrossEntropy,
    build_dataset,
    build_digits_eval_transform,
    build_eval_transform,
    build_loader,
    export_digits_imagefolder,
    smooth_one_hot,
)
from ipu_norm.data.device import normalize_uint8
from ipu_norm.data.seeding import make_numpy_rng

# ----------------------------------------------------------------------------------------------- helpers


def _write_png(path, size=12, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _make_folder(root, n_per_class=3, classes=("a", "b"), size=12):
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            _write_png(root / c / f"{i}.png", size=size, seed=10 * ci + i)
    return root


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "export"
    export_digits_imagefolder(root, image_size=16, val_fraction=0.2, seed=0, limit_per_class=30)
    return root


# ------------------------------------------------------------------------------------- generated data


def test_generated_dataset_is_deterministic_per_index():
    a = GeneratedDataset(20, 8, 5, seed=3)
    b = GeneratedDataset(20, 8, 5, seed=3)
    x7, y7 = a[7]
    assert x7.shape == (3, 8, 8) and x7.dtype == torch.float32 and 0 <= y7 < 5
    # Order of access does not matter: the sample is a function of (seed, split, index).
    _ = [b[i] for i in (3, 19, 0)]
    assert torch.equal(b[7][0], x7) and b[7][1] == y7
    assert not torch.equal(a[8][0], x7)
    assert not torch.equal(GeneratedDataset(20, 8, 5, seed=4)[7][0], x7)
    assert not torch.equal(GeneratedDataset(20, 8, 5, seed=3, split="val")[7][0], x7)
    labels = [a[i][1] for i in range(20)]
    assert len(set(labels)) > 1
    assert a[-1][0].equal(a[19][0])
    with pytest.raises(IndexError):
        a[20]


def test_generated_dataset_classes_are_learnable_and_noise_only_without_signal():
    ds = GeneratedDataset(200, 8, 4, seed=0, class_signal=1.0)
    patterns = F.interpolate(ds._patterns, size=(8, 8), mode="bilinear", align_corners=False).flatten(1)
    correct = 0
    for i in range(len(ds)):
        x, y = ds[i]
        correct += int((patterns @ x.flatten()).argmax() == y)
    assert correct / len(ds) > 0.9  # matched filter recovers the class: there is signal to learn
    noise = GeneratedDataset(200, 8, 4, seed=0, class_signal=0.0)
    xs = torch.stack([noise[i][0] for i in range(200)])
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1.0) < 0.05


def test_build_dataset_generated_sizes():
    tr = build_dataset("generated", "train", image_size=16, test_size=24, num_classes=10, generated_samples=12,
                       seed=0)
    va = build_dataset("generated", "val", image_size=16, test_size=24, num_classes=10, generated_samples=12,
                       seed=0, generated_val_samples=5)
    assert len(tr) == 12 and tr[0][0].shape == (3, 16, 16)
    assert len(va) == 5 and va[0][0].shape == (3, 24, 24)
    with pytest.raises(ValueError):
        build_dataset("imagenet", "train", image_size=16, test_size=16, num_classes=10, generated_samples=1, seed=0)


# ------------------------------------------------------------------------------------------ imagefolder


def test_missing_imagefolder_root_gives_helpful_error(tmp_path):
    missing = tmp_path / "no_such_imagenet"
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("imagefolder", "train", root=missing, image_size=8, test_size=8, num_classes=2,
                      generated_samples=1, seed=0)
    msg = str(info.value)
    assert str(missing / "train") in msg and "data.dataset: generated" in msg


def test_imagefolder_transforms_sizes_and_too_many_classes(tmp_path):
    for split in ("train", "val"):
        _make_folder(tmp_path / split, size=40)
    kw = dict(root=tmp_path, image_size=16, test_size=24, generated_samples=1, seed=0)
    tr = build_dataset("imagefolder", "train", num_classes=2, **kw)
    va = build_dataset("imagefolder", "val", num_classes=2, **kw)
    assert isinstance(tr, SafeImageFolder) and tr[0][0].shape == (3, 16, 16)
    assert va[0][0].shape == (3, 24, 24) and torch.equal(va[0][0], va[0][0])
    with pytest.raises(ValueError, match="class folders"):
        build_dataset("imagefolder", "train", num_classes=1, **kw)


def test_eval_transform_matches_timm_reference():
    timm_data = pytest.importorskip("timm.data")
    ref = timm_data.create_transform(input_size=24, is_training=False, crop_pct=0.875, interpolation="bilinear")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    torch.testing.assert_close(build_eval_transform(24)(img), ref(img))


def test_train_augmentation_is_seeded_per_epoch_and_index_and_leaves_global_rng(tmp_path):
    _make_folder(tmp_path / "train", size=40)
    ds = build_dataset("imagefolder", "train", root=tmp_path, image_size=16, test_size=16, num_classes=2,
                       generated_samples=1, seed=5)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    ds.set_epoch(0)
    a0 = ds[1][0]
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG stream was not consumed or reseeded
    _ = ds[0]
    assert torch.equal(ds[1][0], a0)  # same (seed, epoch, index) -> same crop/flip
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], a0)  # a new epoch draws a new augmentation
    ds2 = build_dataset("imagefolder", "train", root=tmp_path, image_size=16, test_size=16, num_classes=2,
                        generated_samples=1, seed=6)
    ds2.set_epoch(0)
    assert not torch.equal(ds2[1][0], a0)


# ------------------------------------------------------------------------------------ corrupt images


def _corrupt_folder(root):
    _make_folder(root, n_per_class=3, size=32)
    # A real PNG cut in half: the header parses, decoding the pixel data fails.
    good = (root / "a" / "1.png").read_bytes()
    (root / "a" / "1_truncated.png").write_bytes(good[: len(good) // 2])
    # Random bytes with an image extension: PIL cannot identify the format.
    (root / "b" / "0_garbage.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    return root


def test_corrupt_files_really_fail_to_decode(tmp_path):
    root = _corrupt_folder(tmp_path / "f")
    for name in ("a/1_truncated.png", "b/0_garbage.jpg"):
        with pytest.raises(OSError):
            with Image.open(root / name) as im:
                im.convert("RGB")


def test_safe_image_folder_skips_corrupt_files_at_load_time(tmp_path, caplog):
    root = _corrupt_folder(tmp_path / "f")
    ds = SafeImageFolder(root, transform=build_eval_transform(16))
    names = [p.split("/")[-2] + "/" + p.split("/")[-1] for p, _ in ds.samples]
    assert len(ds) == 8
    bad = {names.index("a/1_truncated.png"), names.index("b/0_garbage.jpg")}
    with caplog.at_level(logging.WARNING, logger="ipu_norm.data.datasets"):
        for _ in range(2):  # two passes: each bad file is logged and counted once
            out = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 2
    assert sorted(ds.skipped_paths) == sorted(ds.samples[i][0] for i in bad)
    assert sum("1_truncated.png" in r.getMessage() for r in caplog.records) == 1
    assert sum("0_garbage.jpg" in r.getMessage() for r in caplog.records) == 1
    for i in bad:  # the next index's sample stands in for the bad one (deterministic substitute)
        assert torch.equal(out[i][0], out[(i + 1) % len(ds)][0]) and out[i][1] == out[(i + 1) % len(ds)][1]
    good = [i for i in range(len(ds)) if i not in bad]
    assert all(out[i][0].shape == (3, 16, 16) for i in good)


def test_safe_image_folder_verify_pass_filters(tmp_path):
    root = _corrupt_folder(tmp_path / "f")
    ds = SafeImageFolder(root, transform=build_eval_transform(16), verify=True)
    assert len(ds) == 6 and ds.num_skipped == 2
    assert all("truncated" not in p and "garbage" not in p for p, _ in ds.samples)
    assert len(ds.targets) == 6
    _ = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 2


# ------------------------------------------------------------------------------------------- digits


def test_digits_export_layout_content_and_stratification(digits_root):
    from sklearn.datasets import load_digits

    train_dir, val_dir = digits_root / "train", digits_root / "val"
    for c in range(10):
        assert len(list((train_dir / str(c)).glob("*.png"))) == 24
        assert len(list((val_dir / str(c)).glob("*.png"))) == 6  # stratified: 20% of 30 per class
    train_ids = {p.stem for p in train_dir.rglob("*.png")}
    val_ids = {p.stem for p in val_dir.rglob("*.png")}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 300
    digits = load_digits()
    path = next(iter(sorted((val_dir / "7").glob("*.png"))))
    idx = int(path.stem)
    assert digits.target[idx] == 7  # the file sits in its true class folder
    img = Image.open(path)
    assert img.mode == "RGB" and img.size == (16, 16)
    arr = np.asarray(img)
    assert np.array_equal(arr[..., 0], arr[..., 2])  # grey replicated to RGB
    # Content: the 8x8 original, block-averaged back from 16x16, correlates strongly with it.
    small = arr[..., 0].astype(float).reshape(8, 2, 8, 2).mean(axis=(1, 3))
    assert np.corrcoef(small.ravel(), digits.images[idx].ravel())[0, 1] > 0.9


def test_digits_export_is_idempotent_and_refuses_other_params(digits_root):
    before = sorted(p.stat().st_mtime_ns for p in (digits_root / "train").rglob("*.png"))
    export_digits_imagefolder(digits_root, image_size=16, val_fraction=0.2, seed=0, limit_per_class=30)
    assert sorted(p.stat().st_mtime_ns for p in (digits_root / "train").rglob("*.png")) == before
    with pytest.raises(FileExistsError):
        export_digits_imagefolder(digits_root, image_size=16, val_fraction=0.2, seed=1, limit_per_class=30)


def test_digits_are_real_learnable_data(digits_root):
    """Nearest class centroid on the exported PNGs classifies held-out digits well (labels match images)."""
    tf = build_digits_eval_transform(16)
    tr = SafeImageFolder(digits_root / "train", transform=tf)
    va = SafeImageFolder(digits_root / "val", transform=tf)
    xs = torch.stack([tr[i][0] for i in range(len(tr))]).flatten(1)
    ys = torch.tensor(tr.targets)
    centroids = torch.stack([xs[ys == c].mean(0) for c in range(10)])
    xv = torch.stack([va[i][0] for i in range(len(va))]).flatten(1)
    pred = torch.cdist(xv, centroids).argmin(1)
    assert (pred == torch.tensor(va.targets)).float().mean() > 0.8
    assert tr.classes == [str(c) for c in range(10)]


def test_build_dataset_digits(digits_root):
    kw = dict(root=digits_root, image_size=16, test_size=16, num_classes=10, generated_samples=1, seed=0,
              digits_limit_per_class=30)
    tr = build_dataset("digits", "train", **kw)
    va = build_dataset("digits", "val", **kw)
    assert len(tr) == 240 and len(va) == 60
    assert tr[0][0].shape == (3, 16, 16) and va[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError):
        build_dataset("digits", "train", **{**kw, "num_classes": 5})


# -------------------------------------------------------------------------------------------- sampler


def test_sampler_permutation_is_function_of_seed_and_epoch():
    s = ResumableSampler(50, seed=1)
    e0 = list(s)
    assert sorted(e0) == list(range(50)) and e0 != list(range(50))
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e1) == list(range(50)) and e1 != e0
    s.set_epoch(0)
    assert list(s) == e0
    assert list(ResumableSampler(50, seed=2)) != e0


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("length,replicas", [(10, 3), (12, 4), (2, 3), (2, 7)])
def test_sampler_sharding_matches_distributed_sampler(length, replicas, drop_last):
    data = list(range(length))
    for rank in range(replicas):
        ours = ResumableSampler(length, shuffle=False, num_replicas=replicas, rank=rank, drop_last=drop_last)
        ref = DistributedSampler(data, num_replicas=replicas, rank=rank, shuffle=False, drop_last=drop_last)
        assert list(ours) == list(ref) and len(ours) == len(ref)


def test_sampler_shards_are_disjoint_and_cover_the_permutation():
    shards = [list(ResumableSampler(23, seed=4, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(s) == 5 for s in shards)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 20
    perm = ResumableSampler(23, seed=4).epoch_indices()
    assert sorted(flat) == sorted(perm[:20])


def test_sampler_start_batch_skips_consumed_batches_and_state_roundtrip():
    s = ResumableSampler(40, seed=3, num_replicas=2, rank=1)
    s.set_epoch(2)
    full = list(s)
    s.set_start_batch(3, 4)
    assert list(s) == full[12:] and len(s) == 8 and s.start_batch(4) == 3
    s.set_epoch(2)  # same epoch (e.g. the trainer's loop after resuming): keep the offset
    assert list(s) == full[12:]
    state = s.state_dict()
    s2 = ResumableSampler(40, seed=0, num_replicas=2, rank=1)
    s2.load_state_dict(state)
    assert s2.epoch == 2 and list(s2) == full[12:]
    s2.set_epoch(3)  # next epoch starts from its beginning
    assert len(s2) == 20 and s2.start_index == 0
    with pytest.raises(ValueError, match="mid-epoch"):
        ResumableSampler(41, num_replicas=2, rank=1).load_state_dict(state)
    with pytest.raises(ValueError, match="mid-epoch"):
        ResumableSampler(40, num_replicas=4, rank=1).load_state_dict(state)
    # At an epoch boundary the replica count may change.
    s4 = ResumableSampler(40, num_replicas=4, rank=1)
    s4.load_state_dict({**state, "start_index": 0})
    assert s4.epoch == 2 and s4.seed == 3 and len(s4) == 10


# --------------------------------------------------------------------------------- loader / resumption


def _run_batches(loader, epoch, mixer, start_batch=0, stop_after=None):
    out = []
    loader.sampler.set_epoch(epoch)
    for i, (x, y) in enumerate(loader, start=start_batch):
        x, t = mixer(normalize_uint8(x), y)  # as the trainer: uint8 batches are normalised, then mixed
        out.append((i, x, t))
        if stop_after is not None and i + 1 == stop_after:
            break
    return out


def _pipeline(root, num_workers=0):
    ds = build_dataset("digits", "train", root=root, image_size=16, test_size=16, num_classes=10,
                       generated_samples=1, seed=11, digits_limit_per_class=30)
    sampler = ResumableSampler(len(ds), seed=11)
    loader = build_loader(ds, batch_size=32, sampler=sampler, num_workers=num_workers, drop_last=True, seed=11)
    mixer = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10, seed=11)
    return ds, sampler, loader, mixer


def test_resumed_run_reproduces_uninterrupted_run_bit_for_bit(digits_root):
    _, _, loader, mixer = _pipeline(digits_root)
    reference = _run_batches(loader, 0, mixer) + _run_batches(loader, 1, mixer)
    assert len(reference) == 2 * (240 // 32)

    # Interrupted run: all of epoch 0, then 3 batches of epoch 1, then "checkpoint" and exit.
    _, sampler, loader, mixer = _pipeline(digits_root)
    first = _run_batches(loader, 0, mixer) + _run_batches(loader, 1, mixer, stop_after=3)
    sampler.set_start_batch(3, 32)
    ckpt = {"sampler": sampler.state_dict(), "mixup": mixer.state_dict()}

    # Fresh process state: new objects, unrelated global RNG, restore, finish epoch 1.
    torch.manual_seed(999)
    _, sampler, loader, mixer = _pipeline(digits_root)
    sampler.load_state_dict(ckpt["sampler"])
    mixer.load_state_dict(ckpt["mixup"])
    rest = _run_batches(loader, sampler.epoch, mixer, start_batch=sampler.start_batch(32))
    resumed = first + rest
    assert [i for i, _, _ in resumed] == [i for i, _, _ in reference]
    for (_, xa, ta), (_, xb, tb) in zip(reference, resumed):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    # Augmentation really differs between epochs (the epoch reached the dataset through the loader).
    assert not torch.equal(reference[0][1], reference[len(reference) // 2][1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_forwards_epoch_to_dataset_workers(digits_root, num_workers):
    ds, _, _, _ = _pipeline(digits_root)
    sampler = ResumableSampler(len(ds), shuffle=False)
    loader = build_loader(ds, batch_size=8, sampler=sampler, num_workers=num_workers, drop_last=True, seed=0)
    batches = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches[epoch] = next(iter(loader))
    assert ds.epoch == 1
    assert torch.equal(batches[0][1], batches[1][1])  # same samples (no shuffle) ...
    assert not torch.equal(batches[0][0], batches[1][0])  # ... augmented differently in each epoch
    sampler.set_epoch(0)
    assert torch.equal(next(iter(loader))[0], batches[0][0])


def test_loader_batches_do_not_depend_on_num_workers(digits_root):
    _, sampler0, loader0, _ = _pipeline(digits_root, num_workers=0)
    _, sampler2, loader2, _ = _pipeline(digits_root, num_workers=2)
    for s in (sampler0, sampler2):
        s.set_epoch(1)
    for (xa, ya), (xb, yb) in zip(loader0, loader2):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ------------------------------------------------------------------------------------- mixup / cutmix


def test_no_mixing_gives_smoothed_one_hot():
    x = torch.randn(4, 3, 5, 5)
    y = torch.tensor([0, 2, 1, 2])
    m = MixupCutmix(num_classes=3, label_smoothing=0.3)
    xo, t = m(x, y)
    assert torch.equal(xo, x)
    expected = torch.full((4, 3), 0.1)
    expected[torch.arange(4), y] = 0.8
    torch.testing.assert_close(t, expected)
    assert torch.allclose(t.sum(1), torch.ones(4))


def test_mixup_matches_reference_formula_and_timm_targets():
    timm_mixup = pytest.importorskip("timm.data.mixup")
    x = torch.randn(6, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    m = MixupCutmix(mixup_alpha=1.0, num_classes=5, label_smoothing=0.1, seed=7)
    xo, t = m(x.clone(), y)
    lam = m.last_lam
    assert m.last_mode == "mixup" and 0.0 < lam < 1.0
    for i in range(6):
        torch.testing.assert_close(xo[i], lam * x[i] + (1 - lam) * x[5 - i])
    ref_t = timm_mixup.mixup_target(y, 5, lam=lam, smoothing=0.1)
    torch.testing.assert_close(t, ref_t)


@pytest.mark.parametrize(
    "kw", [{"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.7}, {"mixup_alpha": 0.0, "cutmix_alpha": 1.0}]
)
def test_bitwise_equal_to_timm_mixup_on_the_same_numpy_stream_and_global_rng_untouched(kw):
    from timm.data import Mixup

    x = torch.randn(8, 3, 12, 10)
    y = torch.arange(8) % 5
    ours = MixupCutmix(num_classes=5, label_smoothing=0.1, seed=21, **kw)
    np.random.seed(1234)
    before = np.random.get_state()
    got = [ours(x.clone(), y) for _ in range(12)]
    after = np.random.get_state()
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]  # the global NumPy stream is untouched
    # timm's Mixup drawing from NumPy's global RNG, started in the state the private RNG was seeded to.
    np.random.seed(0)
    np.random.set_state(make_numpy_rng(21).get_state())
    timm = Mixup(num_classes=5, label_smoothing=0.1, mode="batch", **kw)
    want = [timm(x.clone(), y) for _ in range(12)]
    for (xa, ta), (xb, tb) in zip(got, want):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert len({round(float(t[0].max()), 6) for _, t in got}) > 3  # lambda varied between calls


def test_cutmix_pastes_a_box_and_corrects_lambda():
    timm_mixup = pytest.importorskip("timm.data.mixup")
    n, h, w = 4, 20, 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()
    y = torch.tensor([0, 1, 2, 3])
    m = MixupCutmix(cutmix_alpha=1.0, num_classes=4, label_smoothing=0.0, seed=0)
    seen_clipped = False
    for _ in range(20):
        xo, t = m(x.clone(), y)
        assert m.last_mode == "cutmix"
        changed = xo != x
        for i in range(n):
            # Changed pixels come from the paired (reversed) sample, and form one axis-aligned box.
            assert torch.all(xo[i][changed[i]] == float(n - 1 - i))
            rows = changed[i, 0].any(1).nonzero().flatten()
            cols = changed[i, 0].any(0).nonzero().flatten()
            if len(rows):
                box = changed[i, 0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
                assert box.all() and box.sum() == changed[i, 0].sum()
        kept = 1.0 - changed[0, 0].float().mean().item()
        assert m.last_lam == pytest.approx(kept)  # lambda = area actually kept
        torch.testing.assert_close(t, timm_mixup.mixup_target(y, 4, lam=m.last_lam, smoothing=0.0))
        seen_clipped |= 0 < changed[0, 0].sum() < h * w and (changed[0, 0, 0].any() or changed[0, 0, -1].any())
    assert seen_clipped


def test_lambda_distribution_and_switch_probabilities():
    from scipy import stats

    m = MixupCutmix(mixup_alpha=0.4, num_classes=2, seed=1)
    lams = [m.sample()[0] for _ in range(800)]
    assert stats.kstest(lams, "beta", args=(0.4, 0.4)).pvalue > 1e-3
    assert stats.kstest(lams, "beta", args=(2.0, 2.0)).pvalue < 1e-6  # the test can tell Betas apart

    m = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25, num_classes=2, seed=2)
    modes = [m.sample()[1] for _ in range(4000)]
    p_none = modes.count("none") / 4000
    p_cut = modes.count("cutmix") / 4000
    assert abs(p_none - 0.4) < 0.03 and abs(p_cut - 0.6 * 0.25) < 0.03


def test_mixup_is_reproducible_from_seed_generator_and_state():
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    a = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=4, seed=3)
    b = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=4, seed=3)
    for _ in range(5):
        (xa, ta), (xb, tb) = a(x.clone(), y), b(x.clone(), y)
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    state = torch.load(_round_trip(a.state_dict()), weights_only=True)  # checkpoint-safe: tensors and primitives
    ref = [a(x.clone(), y) for _ in range(4)]
    b.load_state_dict(state)
    again = [b(x.clone(), y) for _ in range(4)]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ref, again))
    assert not all(torch.equal(p[0], ref[0][0]) for p in ref)  # the stream moves on


def _round_trip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_odd_batch_with_mixing_is_one_clear_line():
    m = MixupCutmix(mixup_alpha=0.8, num_classes=4)
    with pytest.raises(ValueError, match="^MixupCutmix: the batch has 3 images.*even batch size$"):
        m(torch.randn(3, 3, 4, 4), torch.tensor([0, 1, 2]))
    # Label smoothing alone needs no pairing.
    _, t = MixupCutmix(num_classes=4, label_smoothing=0.1)(torch.randn(3, 3, 4, 4), torch.tensor([0, 1, 2]))
    assert t.shape == (3, 4)


def test_soft_target_cross_entropy():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    loss = SoftTargetCrossEntropy()(logits, smooth_one_hot(y, 4, 0.1))
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, label_smoothing=0.1))
    t = torch.softmax(torch.randn(5, 4), dim=1)
    manual = -(t * (logits - logits.logsumexp(1, keepdim=True))).sum(1).mean()
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, t), manual)
    assert math.isfinite(loss.item())
