"""CIFAR-10 / CIFAR-100 as device-resident uint8 tensors, augmented in whole batches.

Data flow (after KellerJordan/cifar10-airbench):

1. **disk -> uint8.**  :func:`load_split` reads one split once, either from an
   ImageFolder tree of PNGs (``<dir>/train/<class>/*.png``, ``<dir>/test/<class>/*.png``)
   or from torchvision's official pickled files (``<dir>/cifar-10-batches-py`` /
   ``<dir>/cifar-100-python``).  PNGs are decoded into one pre-allocated CPU tensor,
   which is cached on disk (``$SNNADV_CACHE`` or ``~/.cache/snnadv``) so the next
   load skips decoding.
2. **uint8 on the device.**  The whole split (``uint8 [N, 3, 32, 32]`` plus
   ``int64 [N]`` labels) is moved to the device once and stays there as a
   :class:`Split`.
3. **augment.**  :func:`batches` indexes batches out of that tensor with a
   ``torch.randperm`` drawn on the device; :func:`augment` applies the paper's
   augmentation (zero-pad 4, random 32x32 crop, random horizontal flip) to the
   whole batch at once with two ``gather`` calls -- no Python loop over images.
4. **float [0, 1].**  Batches leave as ``float32`` in ``[0, 1]``
   (:func:`to_float`).  Per-channel mean/std normalisation is *not* done here: it
   lives inside the models, so attacks and certification work in ``[0, 1]`` pixel
   space.

All randomness comes from an explicit ``torch.Generator`` when one is given, so a
run restarted from a saved generator state repeats the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from snnadv.errors import DataError, SnnadvWarning
from snnadv.atomic import atomic_target

__all__ = [
    "DATASETS",
    "Split",
    "load_split",
    "load_dataset",
    "to_float",
    "augment",
    "batches",
]

DATASETS: dict[str, int] = {"cifar10": 10, "cifar100": 100}
"""Dataset name -> number of classes."""

_DISPLAY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_TV_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_IMAGE_SIZE = 32
_CACHE_VERSION = 1


def _one_line(text: object) -> str:
    """Collapse a message onto one line."""
    return " ".join(str(text).split())


# Split, to_float, augment and batches live in snnadv.batching (the computation core)
from snnadv.batching import Split, augment, batches, to_float  # noqa: E402,F401  (re-exported)


# --------------------------------------------------------------------------- loading


def load_split(
    dataset: str,
    data_dir: str | os.PathLike,
    train: bool,
    device: str | torch.device = "cpu",
    subset: int | None = None,
    download: bool = False,
) -> Split:
    """Load one split of CIFAR-10/100 from ``data_dir`` onto ``device``.

    The layout is detected: an ImageFolder tree (``train/`` and ``test/`` with one
    folder of PNGs per class) or torchvision's official files.  When ``data_dir``
    holds neither (or does not exist) and ``download`` is true, torchvision's files
    are fetched once into :func:`download_dir` and read from there (never written
    into ``data_dir``).  ``subset`` keeps a class-balanced subset
    (:meth:`Split.subset`), the same one on every run.  Raises :class:`DataError`
    for missing or malformed data.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r} (choose {', '.join(DATASETS)})")
    root = Path(data_dir).expanduser()
    if not root.exists():
        if not download:
            raise DataError(
                f"data directory '{root}' does not exist: give the data with --data-dir DIR, "
                f"or add --download to fetch {_DISPLAY[dataset]} (once, into {download_dir()})"
            )
        split = _load_torchvision(dataset, download_dir(), train, download=True)
    elif not root.is_dir():
        raise DataError(f"data directory '{root}' is not a directory")
    else:
        has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
        if has_train or has_test:
            if not (has_train and has_test):
                missing = root / ("test" if has_train else "train")
                raise DataError(
                    f"incomplete ImageFolder tree in '{root}': folder '{missing}' is missing"
                )
            split = _load_imagefolder(dataset, root, train)
        elif (root / _TV_FOLDER[dataset]).is_dir():
            split = _load_torchvision(dataset, root, train, download=download)
        elif download:
            split = _load_torchvision(dataset, download_dir(), train, download=True)
        else:
            raise DataError(
                f"no {_DISPLAY[dataset]} data in '{root}': expected {root}/train/<class>/*.png "
                f"and {root}/test/<class>/*.png (ImageFolder) or {root}/{_TV_FOLDER[dataset]} "
                f"(torchvision); or add --download to fetch it (once, into {download_dir()})"
            )
    if subset is not None:
        if not isinstance(subset, bool) and isinstance(subset, int) and subset > len(split):
            name = "train" if train else "test"
            warnings.warn(f"--{name}-subset {subset} is larger than the {name} split of '{root}' "
                          f"({len(split)} images): using all {len(split)}", SnnadvWarning, stacklevel=2)
        split = split.subset(subset)
    return split.to(device)


def load_dataset(
    dataset: str,
    data_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    train_subset: int | None = None,
    test_subset: int | None = None,
    download: bool = False,
) -> tuple[Split, Split]:
    """Load ``(train, test)`` splits; see :func:`load_split`."""
    train = load_split(dataset, data_dir, True, device, train_subset, download)
    test = load_split(dataset, data_dir, False, device, test_subset, download)
    return train, test


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the (non-hidden) class folders in ``split_dir``."""
    try:
        return sorted(
            e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
        )
    except OSError as e:
        raise DataError(f"cannot list '{split_dir}': {_one_line(e.strerror or e)}") from e


def _list_pngs(class_dir: Path) -> list[tuple[str, int, int]]:
    """``(name, size, mtime_ns)`` of the PNG files in ``class_dir``, sorted by name."""
    files = []
    try:
        for e in os.scandir(class_dir):
            if e.name.startswith(".") or not e.name.lower().endswith(".png"):
                continue
            if e.is_file():
                st = e.stat()
                files.append((e.name, st.st_size, st.st_mtime_ns))
    except OSError as e:
        raise DataError(f"cannot list '{class_dir}': {_one_line(e.strerror or e)}") from e
    files.sort()
    return files


def _load_imagefolder(dataset: str, root: Path, train: bool) -> Split:
    """Load ``root/train`` or ``root/test`` (one folder of PNGs per class)."""
    split_name = "train" if train else "test"
    split_dir = root / split_name
    expected = DATASETS[dataset]
    classes = _class_folders(split_dir)
    if len(classes) != expected:
        raise DataError(
            f"'{split_dir}' has {len(classes)} class folders but {dataset} has {expected} classes"
        )
    other_dir = root / ("test" if train else "train")
    other = _class_folders(other_dir)
    if other != classes:
        raise DataError(f"class folders of '{split_dir}' and '{other_dir}' differ")

    paths: list[Path] = []
    labels: list[int] = []
    listing: list[tuple[str, str, int, int]] = []
    for label, name in enumerate(classes):
        files = _list_pngs(split_dir / name)
        if not files:
            raise DataError(f"class folder '{split_dir / name}' has no .png files")
        for fname, size, mtime in files:
            paths.append(split_dir / name / fname)
            labels.append(label)
            listing.append((name, fname, size, mtime))

    cache_file = _cache_path(dataset, root, split_name, listing)
    cached = _read_cache(cache_file, len(paths), classes)
    if cached is not None:
        images, label_tensor = cached
    else:
        images = _decode_pngs(paths)
        label_tensor = torch.tensor(labels, dtype=torch.int64)
        _write_cache(cache_file, images, label_tensor, classes)
    return Split(images=images, labels=label_tensor, classes=classes, source="imagefolder")


def _decode_pngs(paths: list[Path]) -> torch.Tensor:
    """Decode 32x32 PNGs into one CPU ``uint8 [N, 3, 32, 32]`` tensor.

    Pixels are written straight into one pre-allocated array; the caller moves the
    whole tensor to the device once.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = torch.empty((len(paths), 3, _IMAGE_SIZE, _IMAGE_SIZE), dtype=torch.uint8)
    out_np = out.numpy()
    for i, path in enumerate(paths):
        try:
            with warnings.catch_warnings():  # a huge header is refused, not warned about
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(path)
            with image:
                if image.size != (_IMAGE_SIZE, _IMAGE_SIZE):
                    w, h = image.size
                    raise DataError(
                        f"image '{path}' is {w}x{h}, expected {_IMAGE_SIZE}x{_IMAGE_SIZE} RGB"
                    )
                if image.mode != "RGB":
                    image = image.convert("RGB")
                out_np[i] = np.asarray(image).transpose(2, 0, 1)
        except DataError:
            raise
        except UnidentifiedImageError as e:
            raise DataError(f"cannot decode image '{path}': not an image file") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            pixels = "".join(c for c in str(e).split(" pixels")[0] if c.isdigit()) or "too many"
            raise DataError(f"image '{path}' claims {pixels} pixels (refused as a possible decompression "
                            f"bomb), expected {_IMAGE_SIZE}x{_IMAGE_SIZE} RGB") from e
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
            raise DataError(f"cannot decode image '{path}': {_one_line(e)}") from e
    return out


def _load_torchvision(dataset: str, root: Path, train: bool, download: bool) -> Split:
    """Load torchvision's official pickled CIFAR files under ``root``."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(root=str(root), train=train, download=download)
        data = torch.from_numpy(ds.data)
        targets = torch.as_tensor(ds.targets, dtype=torch.int64)
        classes = [str(c) for c in ds.classes]
    except Exception as e:  # corrupt/missing files, failed download, bad pickles
        raise DataError(
            f"cannot load {_DISPLAY[dataset]} from '{root / _TV_FOLDER[dataset]}': "
            f"{_one_line(e) or type(e).__name__}"
        ) from e
    if data.ndim != 4 or tuple(data.shape[1:]) != (_IMAGE_SIZE, _IMAGE_SIZE, 3):
        raise DataError(f"unexpected image array shape {tuple(data.shape)} in '{root}'")
    if len(classes) != DATASETS[dataset] or targets.shape[0] != data.shape[0]:
        raise DataError(
            f"'{root / _TV_FOLDER[dataset]}' has {len(classes)} classes and "
            f"{targets.shape[0]} labels for {data.shape[0]} images"
        )
    images = data.permute(0, 3, 1, 2).contiguous()
    return Split(images=images, labels=targets, classes=classes, source="torchvision")


# --------------------------------------------------------------------------- cache


def _cache_dir() -> Path:
    env = os.environ.get("SNNADV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "snnadv"


def download_dir() -> Path:
    """Where ``--download`` puts torchvision's official CIFAR files (inside the cache)."""
    return _cache_dir() / "downloads"


def _cache_path(
    dataset: str, root: Path, split_name: str, listing: list[tuple[str, str, int, int]]
) -> Path:
    """Cache file for a split, keyed by its absolute path, split and file list."""
    key = json.dumps([_CACHE_VERSION, str(root.resolve()), split_name, listing])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return _cache_dir() / f"{dataset}-{split_name}-{digest}.pt"


def _read_cache(
    path: Path, n: int, classes: list[str]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached ``(images, labels)`` if the file is there and sound, else None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = blob["images"], blob["labels"]
        ok = (
            blob.get("version") == _CACHE_VERSION
            and list(blob["classes"]) == classes
            and isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and tuple(images.shape) == (n, 3, _IMAGE_SIZE, _IMAGE_SIZE)
            and isinstance(labels, torch.Tensor)
            and labels.dtype == torch.int64
            and tuple(labels.shape) == (n,)
        )
    except Exception:  # unreadable or foreign file: decode again
        return None
    return (images, labels) if ok else None


def _write_cache(
    path: Path, images: torch.Tensor, labels: torch.Tensor, classes: list[str]
) -> None:
    """Save a decoded split atomically; failures are ignored (the cache is optional)."""
    try:
        with atomic_target(path) as tmp, open(tmp, "wb") as f:
            torch.save(
                {"version": _CACHE_VERSION, "images": images, "labels": labels,
                 "classes": list(classes)},
                f,
            )
    except Exception:
        pass
