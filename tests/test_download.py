"""--download: torchvision's official files fetched once into the cache, the same subsets every run.

No internet here: torchvision's download function is replaced by one that lays out
official-format files (pickled batches) built from real cifar10-mini images.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest


@pytest.fixture()
def fake_download(shared_data, tmp_path, monkeypatch):
    """Replace torchvision's CIFAR-10 download; returns the list of download calls."""
    from torchvision.datasets import cifar

    from snnadv.data import Split, load_split

    train, test = (load_split("cifar10", shared_data, t) for t in (True, False))
    calls = []

    def lay_out(url, download_root, filename=None, md5=None, **kw):
        calls.append(url)
        folder = os.path.join(download_root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)

        def dump(name, split, reps):  # each mini image twice: 10,000 train / 2,000 test, like the full set
            data = np.tile(split.images.permute(0, 2, 3, 1).reshape(len(split), -1).numpy(), (reps, 1))
            labels = split.labels.tolist() * reps
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump({"data": data, "labels": labels}, f)
            return len(labels)

        for i in range(5):  # the five official training batches: a fifth of the images each
            idx = slice(i * len(train) // 5, (i + 1) * len(train) // 5)
            dump(f"data_batch_{i + 1}", Split(train.images[idx], train.labels[idx], train.classes, "fake"), 2)
        dump("test_batch", test, 2)
        with open(os.path.join(folder, "batches.meta"), "wb") as f:
            pickle.dump({"label_names": train.classes}, f)

    monkeypatch.setattr(cifar, "download_and_extract_archive", lay_out)
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    monkeypatch.setenv("SNNADV_CACHE", str(tmp_path / "cache"))
    return calls


def test_missing_data_dir_names_both_ways_out(tmp_path):
    from snnadv.data import load_split
    from snnadv.errors import DataError

    with pytest.raises(DataError) as e:
        load_split("cifar10", tmp_path / "nowhere", train=True)
    msg = str(e.value)
    assert "--data-dir DIR" in msg and "--download" in msg and "\n" not in msg
    assert not (tmp_path / "nowhere").exists()


def test_download_once_into_the_cache_quick_subsets(fake_download, tmp_path):
    from snnadv.config import resolve
    from snnadv.data import download_dir, load_dataset

    cfg = resolve("train-ann", "configs/quick.toml")
    assert (cfg["train_subset"], cfg["test_subset"]) == (5000, 1000)
    missing = tmp_path / "no-data"
    train, test = load_dataset("cifar10", missing, "cpu", cfg["train_subset"], cfg["test_subset"], download=True)
    assert len(fake_download) == 1 and not missing.exists()
    assert (download_dir() / "cifar-10-batches-py" / "test_batch").is_file()
    assert train.source == "torchvision" and (len(train), len(test)) == (5000, 1000)
    assert train.labels.bincount().tolist() == [500] * 10 and test.labels.bincount().tolist() == [100] * 10
    again_train, again_test = load_dataset("cifar10", missing, "cpu", 5000, 1000, download=True)
    assert len(fake_download) == 1  # fetched once
    assert again_train.images.equal(train.images) and again_test.labels.equal(test.labels)


def test_cli_download_runs_a_stage(fake_download, tmp_path, capsys):
    from snnadv.cli.main import main

    out = tmp_path / "ann.pt"
    args = ["train-ann", "--config", "configs/quick.toml", "--data-dir", str(tmp_path / "none"), "--arch", "tiny",
            "--epochs", "1", "--train-subset", "100", "--test-subset", "50", "--device", "cpu", "--quiet",
            "--out", str(out)]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--data-dir DIR" in err and "--download" in err and "\n" not in err
    assert not out.exists() and fake_download == []
    assert main(args + ["--download"]) == 0
    assert out.is_file() and len(fake_download) == 1
