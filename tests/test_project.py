"""Project-level checks: CI runs the README's commands, every config resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    commands = dict(re.findall(r"^(SETUP|TEST)='(.*)'$", ci, re.M))
    assert set(commands) == {"SETUP", "TEST"}
    for cmd in commands.values():
        assert f"    {cmd}\n" in readme, cmd  # a README code line, verbatim
    assert "exit 1" in ci and '"$rc" -eq 5' in ci  # pytest's "no tests" fails CI


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.toml")))
def test_every_config_resolves_for_every_stage(config):
    from snnadv.config import STAGES, resolve

    for stage in STAGES:
        cfg = resolve(stage, ROOT / "configs" / config)
        assert cfg["stage"] == stage


def test_paper_configs_hold_the_paper_settings():
    from snnadv.config import resolve

    vgg5 = ROOT / "configs" / "vgg5_cifar10.toml"
    ann, conv, bp = (resolve(s, vgg5) for s in ("train-ann", "convert", "finetune"))
    assert (ann["arch"], ann["epochs"], ann["lr"], ann["milestones"]) == ("vgg5", 200, 0.1, [100, 150])
    assert (conv["timesteps"], conv["scale"]) == (2500, 0.7)
    assert (bp["timesteps"], bp["leak"], bp["epochs"], bp["lr"], bp["alpha"], bp["beta"]) == (100, 0.99, 15, 1e-4, 0.3, 0.01)
    r20 = resolve("train-ann", ROOT / "configs" / "resnet20_cifar10.toml")
    assert (r20["arch"], r20["lr"], r20["milestones"]) == ("resnet20", 0.05, [80, 120])
    v11 = resolve("train-ann", ROOT / "configs" / "vgg11_cifar100.toml")
    assert (v11["arch"], v11["dataset"], v11["epochs"]) == ("vgg11", "cifar100", 250)
