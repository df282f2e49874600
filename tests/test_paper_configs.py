"""The paper configs cannot rot: every stage of each one runs, on a few mini images.

Each config (``configs/vgg5_cifar10.toml``, ``resnet20_cifar10.toml``,
``vgg11_cifar100.toml``) is read as is, only its *sizes* are shrunk (1 epoch on one
batch of 2 training images, 2 test images, one attack step, tiny adaptive-attack
budgets), and it goes through :func:`snnadv.reproduce.reproduce`: the two ANNs, their
conversions (T = 2500, the curve 100..2500) and fine-tunings (T = 100 / 200), Tables
1 and 2, the configured analyses, the adaptive evaluation and the report.  A renamed
setting, a removed option or a broken stage fails here.

By default the architecture is swapped for ``tiny`` so that the paper's timesteps fit
in CI: at T = 2500 a VGG11 SNN runs ~35 frames/s on a busy 2-core CPU at batch 1
(~130 when idle), so converting it alone takes minutes.  ``SNNADV_PAPER_ARCH=1``
keeps each config's own architecture and divides every timestep setting by
:data:`T_DIVISOR` instead (2500 -> 250, 100 -> 10, 200 -> 20; at T = 100 the deepest
layers of a ResNet20 trained for one step receive no spikes to balance on): several
minutes per config.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from pathlib import Path

import pytest

from conftest import shared_root

CONFIGS = {"vgg5_cifar10": "cifar10-mini", "resnet20_cifar10": "cifar10-mini", "vgg11_cifar100": "cifar100-mini"}
PAPER_ARCH = os.environ.get("SNNADV_PAPER_ARCH") == "1"
T_DIVISOR = 10 if PAPER_ARCH else 1

#: what is shrunk, section by section (sizes and attack budgets only)
SMALL = {
    "common": {"device": "cpu", "batch_size": 2, "train_subset": 2, "test_subset": 2},
    "train-ann": {"epochs": 1, "milestones": [1]},  # (the paper's milestones lie beyond one epoch)
    "finetune": {"epochs": 1},
    "table": {"test_subset": 2, "steps": 1},
    "analyze": {"test_subset": 2, "epochs": 1, "steps": 1},
    "evaluate": {"test_subset": 2, "eot": 1, "eval_draws": 1, "steps": 1, "restarts": 1, "apgd_steps": 1,
                 "square_queries": 2, "sweep_eps": "0,8/255", "sweep_steps": 1, "stat_images": 2},
}


def _t(value):
    """A timestep setting divided by T_DIVISOR (at least 1; lists element-wise, without repeats)."""
    if isinstance(value, list):
        return sorted({_t(v) for v in value})
    return max(1, round(value / T_DIVISOR))


def _toml(data: dict) -> str:
    """A config dict as TOML (tables of strings, numbers, booleans and flat lists)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return f'"{v}"' if isinstance(v, str) else repr(v)
    return "\n".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items())
                     for name, table in data.items())


def small_config(name: str, run_dir: Path, data_dir: Path) -> dict:
    """The paper config ``name`` with its sizes shrunk (and its architecture or its timesteps)."""
    with open(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml", "rb") as f:
        cfg = tomllib.load(f)
    for section, values in SMALL.items():
        cfg.setdefault(section, {}).update(values)
    cfg["common"]["data_dir"] = str(data_dir)
    cfg["reproduce"]["run_dir"] = str(run_dir)
    if not PAPER_ARCH:
        cfg["train-ann"]["arch"] = "tiny"
    for section, key in (("convert", "timesteps"), ("convert", "curve"), ("finetune", "timesteps"),
                         ("analyze", "timesteps")):
        if key in cfg.get(section, {}):
            cfg[section][key] = _t(cfg[section][key])
    return cfg


@pytest.mark.parametrize("name", list(CONFIGS))
def test_paper_config_runs_every_stage(name, tmp_path, observed):
    from snnadv.reproduce import reproduce

    data = shared_root() / CONFIGS[name]
    if not (data / "train").is_dir():
        pytest.skip(f"shared data {data} not found (set SNNADV_SHARED_DATA)")
    cfg = small_config(name, tmp_path / "run", data)
    path = tmp_path / f"{name}.toml"
    path.write_text(_toml(cfg))
    assert tomllib.loads(path.read_text()) == cfg
    t0 = time.perf_counter()
    done = reproduce(path, quiet=True)
    seconds = time.perf_counter() - t0
    expected = 8 + len(cfg["reproduce"]["analyses"]) + bool(cfg["reproduce"]["evaluate"])
    assert len(done) == expected and "report" in done
    conv = cfg["convert"]["timesteps"]
    metrics = json.loads((tmp_path / "run" / "models" / "conv.json").read_text())["metrics"]
    assert sorted(int(t) for t in metrics["curve"]) == sorted(set(cfg["convert"]["curve"]) | {conv})
    assert "Beside the paper" in (tmp_path / "run" / "report.md").read_text()
    observed(f"paper config {name} ({cfg['train-ann']['arch']}): {expected} stages in {seconds:.0f} s "
             f"(conversion T={conv}, SNN-BP T={cfg['finetune']['timesteps']})")
