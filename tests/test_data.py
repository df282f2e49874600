"""Tests for snnadv.data: loading CIFAR from both layouts, the decode cache,
class-balanced subsets, on-device augmentation and batching."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snnadv import data
from snnadv.data import (
    DATASETS,
    Split,
    augment,
    batches,
    load_dataset,
    load_split,
    to_float,
)
from snnadv.errors import DataError

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]


def shared_data() -> Path:
    """The shared data folder: $SNNADV_SHARED_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("SNNADV_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


SHARED = shared_data()


def _mini(name: str) -> Path:
    path = SHARED / name
    if not (path / "train").is_dir():
        pytest.skip(f"shared data {path} not found (set SNNADV_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Keep the decode cache out of the home directory."""
    monkeypatch.setenv("SNNADV_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> tuple[Split, Split]:
    root = _mini("cifar10-mini")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SNNADV_CACHE", str(tmp_path_factory.mktemp("cache10")))
        return load_dataset("cifar10", root)


@pytest.fixture
def fake_tree(tmp_path) -> Path:
    """A small 10-class ImageFolder tree: 2 random 32x32 PNGs per class and split."""
    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.png")
    return root


def _pil(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# --------------------------------------------------------------------------- loading


def test_cifar10_mini_loads(cifar10):
    train, test = cifar10
    assert DATASETS == {"cifar10": 10, "cifar100": 100}
    assert train.images.shape == (5000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (1000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and len(train) == 5000 and len(test) == 1000
    assert torch.bincount(train.labels).tolist() == [500] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert train.classes == CIFAR10_CLASSES == test.classes
    assert train.source == test.source == "imagefolder"
    assert train.images.device.type == "cpu"
    # Real photos: not blank, using the full range.
    assert train.images.float().std() > 30
    assert int(train.images.max()) == 255


def test_cifar100_mini_loads():
    root = _mini("cifar100-mini")
    train, test = load_dataset("cifar100", root)
    assert train.images.shape == (1000, 3, 32, 32)
    assert test.images.shape == (1000, 3, 32, 32)
    assert len(train.classes) == 100 and train.classes == sorted(train.classes)
    assert train.classes[0] == "apple" and train.classes[-1] == "worm"
    assert torch.bincount(train.labels, minlength=100).tolist() == [10] * 100
    assert torch.bincount(test.labels, minlength=100).tolist() == [10] * 100


def test_pixels_equal_pil(cifar10):
    train, test = cifar10
    root = _mini("cifar10-mini")
    bird = sorted((root / "train" / "bird").glob("*.png"))
    # Classes are stored in label order, files in sorted order inside each class.
    assert torch.equal(train.images[2 * 500], _pil(bird[0]))
    assert torch.equal(train.images[2 * 500 + 7], _pil(bird[7]))
    assert int(train.labels[2 * 500]) == 2
    truck = sorted((root / "test" / "truck").glob("*.png"))
    assert torch.equal(test.images[999], _pil(truck[-1]))
    assert int(test.labels[999]) == 9


def test_fake_tree_pixels(fake_tree):
    split = load_split("cifar10", fake_tree, train=False)
    assert split.images.shape == (20, 3, 32, 32)
    assert split.labels.tolist() == [i // 2 for i in range(20)]
    assert torch.equal(split.images[7], _pil(fake_tree / "test" / "cat" / "img_1.png"))


def test_load_split_subset_and_device(cifar10):
    root = _mini("cifar10-mini")
    split = load_split("cifar10", root, train=False, device=torch.device("cpu"), subset=30)
    assert len(split) == 30
    assert torch.bincount(split.labels).tolist() == [3] * 10
    assert torch.equal(split.images, cifar10[1].subset(30).images)
    assert split.to("cpu") is split


# --------------------------------------------------------------------------- subset


def test_subset_is_class_balanced_and_deterministic(cifar10):
    train, _ = cifar10
    sub = train.subset(100)
    assert len(sub) == 100
    assert torch.bincount(sub.labels).tolist() == [10] * 10
    # The first images of each class, in the split's order.
    expected = torch.cat([torch.arange(10) + 500 * c for c in range(10)])
    assert torch.equal(sub.images, train.images[expected])
    assert torch.equal(sub.labels, train.labels[expected])
    again = train.subset(100)
    assert torch.equal(again.images, sub.images) and torch.equal(again.labels, sub.labels)
    # Round-robin: 15 images of 10 classes -> 2 for the first five classes, 1 after.
    assert torch.bincount(train.subset(15).labels).tolist() == [2] * 5 + [1] * 5
    assert sub.classes == train.classes and sub.source == train.source
    assert train.subset(5000) is train and train.subset(10**6) is train


def test_subset_unbalanced_round_robin():
    labels = torch.tensor([2, 0, 0, 1, 0, 2, 0, 0])
    split = Split(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), labels, ["a", "b", "c"], "x")
    # Round-robin order: (0:idx1, 1:idx3, 2:idx0), (0:idx2, 2:idx5), (0:idx4) ...
    assert split.subset(3).labels.tolist() == [2, 0, 1]
    assert split.subset(6).labels.tolist() == [2, 0, 0, 1, 0, 2]


@pytest.mark.parametrize("n", [0, -3])
def test_subset_too_small(cifar10, n):
    with pytest.raises(DataError) as excinfo:
        cifar10[0].subset(n)
    _one_line_error(excinfo)


# --------------------------------------------------------------------------- augment


def _identify_crops(images: torch.Tensor, out: torch.Tensor, pad: int) -> torch.Tensor:
    """For each image, the first (dy, dx, flip) whose reference crop equals ``out``.

    Reference implementation with explicit slicing; -1 rows where nothing matches.
    """
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    found = torch.full((images.shape[0], 3), -1, dtype=torch.int64)
    target = (out * 255).round().to(torch.uint8)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, :, dy:dy + 32, dx:dx + 32]
            for flip in (0, 1):
                cand = crop.flip(-1) if flip else crop
                match = (cand == target).flatten(1).all(1) & (found[:, 0] < 0)
                found[match] = torch.tensor([dy, dx, flip])
    return found


def test_augment_is_pad_crop_flip(cifar10):
    images = cifar10[0].images[::10][:400]
    g = torch.Generator().manual_seed(0)
    out = augment(images, g)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, to_float(images))
    changed = (out != to_float(images)).flatten(1).any(1)
    assert changed.float().mean() > 0.8
    found = _identify_crops(images, out, pad=4)
    assert (found[:, 0] >= 0).all(), "every output must be a padded crop, maybe mirrored"
    # All offsets occur and flips happen about half the time.
    assert set(found[:, 0].tolist()) == set(range(9))
    assert set(found[:, 1].tolist()) == set(range(9))
    assert 0.35 < found[:, 2].float().mean() < 0.65


def test_augment_zero_padding_at_borders():
    white = torch.full((256, 3, 32, 32), 255, dtype=torch.uint8)
    out = augment(white, torch.Generator().manual_seed(1))
    zero = out == 0
    assert zero.any(), "some crops must show the zero padding"
    assert (out[~zero] == 1.0).all()
    # Zeros only in bands of at most 4 pixels along the borders.
    assert not zero[:, :, 4:28, 4:28].any()
    rows_zero = zero.all(dim=(1, 3))  # [B, 32]: whole row is padding
    cols_zero = zero.all(dim=(1, 2))
    assert (zero == (rows_zero[:, None, :, None] | cols_zero[:, None, None, :])).all()
    assert rows_zero.sum(1).max() <= 4 and cols_zero.sum(1).max() <= 4
    assert (rows_zero.sum(1) == 0).any() and (rows_zero.sum(1) == 4).any()


def test_augment_flip_only_with_pad0(cifar10):
    images = cifar10[0].images[:200]
    out = augment(images, torch.Generator().manual_seed(2), pad=0)
    same = (out == to_float(images)).flatten(1).all(1)
    mirrored = (out == to_float(images.flip(-1))).flatten(1).all(1)
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()


def test_augment_reproducible(cifar10):
    images = cifar10[0].images[:64]
    a = augment(images, torch.Generator().manual_seed(7))
    b = augment(images, torch.Generator().manual_seed(7))
    c = augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert augment(images[:0]).shape == (0, 3, 32, 32)


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    y = to_float(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.flatten(), torch.tensor([0.0, 0.2, 1.0]))


# --------------------------------------------------------------------------- batches


def _indexed_split(n: int) -> Split:
    """Labels 0..n-1, and every pixel of image i equals i % 256."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32)
    return Split(images.contiguous(), torch.arange(n), [str(i) for i in range(n)], "test")


def test_batches_cover_every_index_once():
    split = _indexed_split(103)
    out = list(batches(split, 10, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [x.shape[0] for x, _ in out] == [10] * 10 + [3]
    labels = torch.cat([y for _, y in out])
    assert sorted(labels.tolist()) == list(range(103))
    assert labels.tolist() != list(range(103)), "shuffled"
    for x, y in out:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, to_float(split.images[y]))
    dropped = list(batches(split, 10, shuffle=True, drop_last=True))
    assert [x.shape[0] for x, _ in dropped] == [10] * 10
    plain = torch.cat([y for _, y in batches(split, 32, shuffle=False)])
    assert plain.tolist() == list(range(103))


def _epoch(split: Split, g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(batches(split, 16, shuffle=True, generator=g, train_augment=True))


def test_batches_reproducible_and_resumable(cifar10):
    # Real images, labelled by their index so batches can be traced back.
    split = Split(cifar10[1].images[:100], torch.arange(100), [], "test")
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    for (xa, ya), (xb, yb) in zip(_epoch(split, g1), _epoch(split, g2), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = _epoch(split, torch.Generator().manual_seed(4))
    assert not torch.equal(other[0][1], _epoch(split, torch.Generator().manual_seed(3))[0][1])
    # Resume: a generator restored from a saved state repeats the next epoch exactly.
    g = torch.Generator().manual_seed(5)
    _epoch(split, g)
    saved = g.get_state()
    second = _epoch(split, g)
    restored = torch.Generator()
    restored.set_state(saved)
    for (xa, ya), (xb, yb) in zip(second, _epoch(split, restored), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Augmented batches are crops of the right images.
    x, y = second[0]
    assert (_identify_crops(split.images[y], x, pad=4)[:, 0] >= 0).all()


def test_batches_bad_size():
    with pytest.raises(ValueError):
        batches(_indexed_split(4), 0, shuffle=False)


def test_generator_on_wrong_device():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError):
        augment(images, torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_end_to_end(fake_tree):
    loaded = load_split("cifar10", fake_tree, train=True, device="cuda", subset=10)
    assert loaded.images.is_cuda and loaded.labels.is_cuda
    assert loaded.to("cuda") is loaded
    assert torch.equal(loaded.to("cpu").images, load_split("cifar10", fake_tree, True, subset=10).images)
    cpu_images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
    split = Split(cpu_images, torch.arange(200), [], "test").to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = list(batches(split, 64, shuffle=True, generator=g, train_augment=True))
    assert all(x.is_cuda and y.is_cuda and x.dtype == torch.float32 for x, y in xs)
    assert sorted(torch.cat([y for _, y in xs]).tolist()) == list(range(200))
    g.manual_seed(0)
    again = list(batches(split, 64, shuffle=True, generator=g, train_augment=True))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(xs, again))
    for x, y in xs:
        found = _identify_crops(cpu_images[y.cpu()], x.cpu(), pad=4)
        assert (found[:, 0] >= 0).all()
    assert torch.equal(split.subset(20).labels.cpu(), torch.arange(20))


# --------------------------------------------------------------------------- torchvision layout


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_official_cifar10(root: Path) -> dict[str, np.ndarray]:
    """Official-format pickles with 2 images per train batch and 3 test images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = {}
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        rows[name] = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        _pickle(folder / name, {"batch_label": name, "labels": labels,
                                "data": rows[name], "filenames": [f"{name}_{i}.png" for i in range(n)]})
    _pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 2,
                                      "num_vis": 3072})
    return rows


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks the official md5 sums; the fake files cannot match them."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)


def test_torchvision_layout(tmp_path, no_md5):
    rows = _fake_official_cifar10(tmp_path)
    train, test = load_dataset("cifar10", tmp_path)
    assert train.source == test.source == "torchvision"
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (3, 3, 32, 32) and test.labels.dtype == torch.int64
    assert train.classes == CIFAR10_CLASSES
    # Official rows are 1024 red, 1024 green, 1024 blue values in row-major order.
    assert torch.equal(train.images[2], torch.from_numpy(rows["data_batch_2"][0]).view(3, 32, 32))
    assert torch.equal(test.images[2], torch.from_numpy(rows["test_batch"][2]).view(3, 32, 32))
    assert train.images.is_contiguous()
    assert len(load_split("cifar10", tmp_path, train=True, subset=4)) == 4


def test_torchvision_layout_cifar100(tmp_path, no_md5):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i:03d}" for i in range(100)]
    data_rows = np.arange(4 * 3072, dtype=np.int64).reshape(4, 3072).astype(np.uint8)
    for name in ("train", "test"):
        _pickle(folder / name, {"data": data_rows, "fine_labels": [0, 5, 99, 5],
                                "coarse_labels": [0, 1, 2, 1]})
    _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": names[:20]})
    split = load_split("cifar100", tmp_path, train=False)
    assert split.images.shape == (4, 3, 32, 32) and split.classes == names
    assert split.labels.tolist() == [0, 5, 99, 5]
    # The same directory is no CIFAR-10 data.
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", tmp_path, train=False)
    assert "cifar-10-batches-py" in _one_line_error(excinfo)


def test_torchvision_corrupt_files(tmp_path):
    _fake_official_cifar10(tmp_path)
    # Without the md5 patch the fake files fail torchvision's integrity check.
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", tmp_path, train=True)
    assert "corrupted" in _one_line_error(excinfo)


def test_torchvision_garbage_pickle(tmp_path, no_md5):
    _fake_official_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", tmp_path, train=False)
    assert "cifar-10-batches-py" in _one_line_error(excinfo)


# --------------------------------------------------------------------------- errors


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_split("mnist", tmp_path, train=True)
    assert _one_line_error(excinfo) == "unknown dataset 'mnist' (choose cifar10, cifar100)"


def test_missing_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", missing, train=True)
    assert str(missing) in _one_line_error(excinfo)


def test_empty_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", empty, train=True)
    message = _one_line_error(excinfo)
    assert message.startswith(f"no CIFAR-10 data in '{empty}'")
    assert "cifar-10-batches-py" in message and "--download" in message


def test_wrong_number_of_classes():
    root = _mini("cifar100-mini")
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", root, train=True)
    message = _one_line_error(excinfo)
    assert str(root) in message and "100" in message and "10 classes" in message


def test_train_without_test(fake_tree):
    shutil.rmtree(fake_tree / "test")
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", fake_tree, train=True)
    assert str(fake_tree / "test") in _one_line_error(excinfo)


def test_empty_class_folder(fake_tree):
    for png in (fake_tree / "train" / "dog").iterdir():
        png.unlink()
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", fake_tree, train=True)
    assert str(fake_tree / "train" / "dog") in _one_line_error(excinfo)


def test_mismatched_class_folders(fake_tree):
    (fake_tree / "test" / "truck").rename(fake_tree / "test" / "lorry")
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", fake_tree, train=True)
    _one_line_error(excinfo)


def test_corrupt_png(fake_tree):
    bad = fake_tree / "train" / "horse" / "img_1.png"
    bad.write_bytes(b"this is not a png\n" * 10)
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", fake_tree, train=True)
    assert str(bad) in _one_line_error(excinfo)
    # The test split is intact and still loads.
    assert len(load_split("cifar10", fake_tree, train=False)) == 20


def test_wrong_size_png(fake_tree):
    bad = fake_tree / "test" / "ship" / "img_0.png"
    Image.fromarray(np.zeros((16, 32, 3), dtype=np.uint8)).save(bad)
    with pytest.raises(DataError) as excinfo:
        load_split("cifar10", fake_tree, train=False)
    message = _one_line_error(excinfo)
    assert str(bad) in message and "32x16" in message


# --------------------------------------------------------------------------- cache


def test_cache_serves_second_load(fake_tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    before = sorted(p.relative_to(fake_tree) for p in fake_tree.rglob("*"))
    first = load_split("cifar10", fake_tree, train=True)
    assert len(list(cache.glob("*.pt"))) == 1
    assert not list(cache.glob("*.tmp"))
    assert sorted(p.relative_to(fake_tree) for p in fake_tree.rglob("*")) == before

    def no_decoding(paths):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data, "_decode_pngs", no_decoding)
    second = load_split("cifar10", fake_tree, train=True)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert first.classes == second.classes and second.source == "imagefolder"
    # A different split has its own entry (and needs decoding).
    with pytest.raises(AssertionError):
        load_split("cifar10", fake_tree, train=False)


def test_cache_invalidated_by_changed_file(fake_tree):
    load_split("cifar10", fake_tree, train=True)
    changed = fake_tree / "train" / "frog" / "img_0.png"
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    split = load_split("cifar10", fake_tree, train=True)
    assert (split.images[12] == 7).all()


def test_unreadable_cache_is_ignored(fake_tree, tmp_path):
    first = load_split("cifar10", fake_tree, train=True)
    (entry,) = (tmp_path / "cache").glob("*.pt")
    entry.write_bytes(b"garbage")
    second = load_split("cifar10", fake_tree, train=True)
    assert torch.equal(first.images, second.images)
    # The broken entry was replaced by a good one.
    third = torch.load(entry, weights_only=True)
    assert torch.equal(third["images"], first.images)


def test_unwritable_cache_is_ignored(fake_tree, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SNNADV_CACHE", str(blocker / "cache"))
    split = load_split("cifar10", fake_tree, train=True)
    assert len(split) == 20
