"""Shared fixtures: the shared data, a private decode cache, and one trained VGG5.

Expensive things are made once per session and shared:

* ``trained_ann``: a VGG5 ANN trained for a few epochs on the real cifar10-mini
  subset (reused by the checkpoint, conversion, fine-tuning and CLI tests);
* ``converted_snn``: that ANN converted by threshold balancing (reused by the
  conversion and fine-tuning tests).

Numbers worth quoting (accuracies, the conversion curve) are recorded with the
``observed`` fixture and printed in the terminal summary of every run.
"""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning.  On a small shared CPU (2 cores,
# other jobs running) spinning threads made training 4x slower; results are
# unchanged.  Must be set before torch is first imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

#: the settings of the session's ANN (VGG5, all 5000 cifar10-mini images, CPU, about a
#: minute); without batch norm VGG5 needs a lower lr than the paper's 0.1 to learn in 3 epochs
ANN_SETTINGS = dict(arch="vgg5", epochs=3, lr=0.01, milestones=[], batch_size=64, test_subset=500,
                    seed=0, device="cpu", quiet=True)

#: the settings of the session's conversion (percentile balancing; on CPU the SNN runs
#: ~1000 frames/s, so T is short: the curve of this ANN is flat from T = 32 on)
CONVERT_SETTINGS = dict(timesteps=32, percentile=99.9, batches=1, batch_size=32, test_subset=200,
                        curve=[8, 16, 32], seed=0, device="cpu", quiet=True)

_OBSERVED: list[str] = []


def shared_root() -> Path:
    """The shared data folder: $SNNADV_SHARED_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("SNNADV_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _mini(name: str) -> Path:
    path = shared_root() / name
    if not (path / "train").is_dir() or not (path / "test").is_dir():
        pytest.skip(f"shared data {path} not found (set SNNADV_SHARED_DATA)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _snnadv_cache(tmp_path_factory):
    """Every decode cache of the session goes to a temporary folder, never to $HOME."""
    old = os.environ.get("SNNADV_CACHE")
    os.environ["SNNADV_CACHE"] = str(tmp_path_factory.mktemp("snnadv-cache"))
    yield
    if old is None:
        os.environ.pop("SNNADV_CACHE", None)
    else:
        os.environ["SNNADV_CACHE"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real cifar10-mini subset (5000 train / 1000 test PNGs)."""
    return _mini("cifar10-mini")


@pytest.fixture(scope="session")
def shared_data100() -> Path:
    """The real cifar100-mini subset."""
    return _mini("cifar100-mini")


@pytest.fixture(scope="session")
def observed():
    """``observed(text)`` records a number for the end-of-run summary."""
    return _OBSERVED.append


def pytest_terminal_summary(terminalreporter):
    if _OBSERVED:
        terminalreporter.section("observed numbers")
        for line in _OBSERVED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def trained_ann(shared_data, tmp_path_factory, observed):
    """One VGG5 ANN trained on cifar10-mini: ``{"path", "result", "cfg"}``."""
    from snnadv.config import resolve
    from snnadv.train import train_ann

    out = tmp_path_factory.mktemp("ann") / "ann-vgg5.pt"
    cfg = resolve("train-ann", flags=dict(ANN_SETTINGS, data_dir=str(shared_data), out=str(out)))
    result = train_ann(cfg)
    curve = [round(h["test_acc"], 1) for h in result["metrics"]["history"]]
    observed(f"ANN VGG5 ({ANN_SETTINGS['epochs']} epochs, lr {ANN_SETTINGS['lr']}, 5000 train): test accuracy "
             f"{result['metrics']['test_acc']:.1f}% on {ANN_SETTINGS['test_subset']} test images (per epoch {curve})")
    return {"path": out, "result": result, "cfg": cfg}


@pytest.fixture(scope="session")
def converted_snn(trained_ann, shared_data, tmp_path_factory, observed):
    """The session ANN converted to an SNN-conv: ``{"path", "result", "cfg"}``."""
    from snnadv.config import resolve
    from snnadv.convert import convert

    out = tmp_path_factory.mktemp("conv") / "snn-conv-vgg5.pt"
    cfg = resolve("convert", flags=dict(CONVERT_SETTINGS, checkpoint=str(trained_ann["path"]),
                                        data_dir=str(shared_data), out=str(out)))
    result = convert(cfg)
    m = result["metrics"]
    observed(f"SNN-conv VGG5 (percentile {CONVERT_SETTINGS['percentile']}, balanced on "
             f"{CONVERT_SETTINGS['batch_size']} images, "
             f"{CONVERT_SETTINGS['test_subset']} test images): curve {m['curve']}, "
             f"ANN on the same images {m['ann_test_acc']:.1f}%")
    return {"path": out, "result": result, "cfg": cfg}
