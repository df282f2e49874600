"""Many processes (torchrun, gloo, 2 CPU ranks): training, conversion, failures and resume.

Each test launches the command line under ``torchrun --standalone --nproc-per-node 2``
and compares with one process on the same settings.  The model is a small VGG without
dropout (registered by a plugin written here), so one process and two ranks draw the
same numbers; the training set has 69 images in global batches of 16, so the last
batch (5 images) splits unevenly (2 + 3) over the ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

PLUGIN = '''
import os

from snnadv import register_architecture
from snnadv.models.spec import ArchSpec, Act, AvgPool, Conv, Flatten, Linear


@register_architecture("tiny-nodrop")
def tiny_nodrop(num_classes: int = 10) -> ArchSpec:
    """A small VGG without dropout: its training is deterministic given the data."""
    return ArchSpec("tiny-nodrop", num_classes, (Conv("conv1", 3, 8), Act("act1"), AvgPool("pool1", 2),
                    Conv("conv2", 8, 16), Act("act2"), AvgPool("pool2", 4), Flatten("flatten"),
                    Linear("fc3", 16 * 4 * 4, 32), Act("act3"), Linear("classifier", 32, num_classes)))


FAIL = os.environ.get("TEST_FAIL_RANK_AT")  # "rank:call[:nan]": that rank fails at that forward call
if FAIL and os.environ.get("RANK") == FAIL.split(":")[0]:
    import snnadv.models.ann as ann

    _forward, _calls = ann.ANN.forward, [0]

    def forward(self, x):
        _calls[0] += 1
        if _calls[0] == int(FAIL.split(":")[1]):
            if FAIL.endswith(":nan"):
                return _forward(self, x) * float("nan")
            raise RuntimeError("injected failure")
        return _forward(self, x)

    ann.ANN.forward = forward
'''

TRAIN = ["train-ann", "--arch", "tiny-nodrop", "--lr", "0.05", "--milestones=", "--train-subset", "69",
         "--test-subset", "20", "--batch-size", "16", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "ddp_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
             SNNADV_PLUGINS="ddp_test_plugin", OMP_NUM_THREADS="1")
    e.pop("TEST_FAIL_RANK_AT", None)
    return {"env": e, "data": str(shared_data), "dir": tmp_path_factory.mktemp("runs")}


def run(env: dict, *args, ranks: int = 1, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line in one process, or under torchrun with ``ranks`` CPU processes."""
    launch = [sys.executable, "-m", "snnadv.cli.main"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
        "-m", "snnadv.cli.main"]
    return subprocess.run([*launch, *args, "--data-dir", env["data"]], capture_output=True, text=True,
                          env={**env["env"], **(extra_env or {})}, cwd=env["dir"], timeout=300)


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(env):
    """Two epochs in one process (the reference)."""
    r = run(env, *TRAIN, "--epochs", "2", "--out", "one.pt")
    assert r.returncode == 0, r.stderr
    return env["dir"] / "one.pt"


def test_ddp_training_equals_one_process(env, one_process):
    r = run(env, *TRAIN, "--epochs", "2", "--out", "two.pt", ranks=2)
    assert r.returncode == 0, r.stderr
    assert max_diff(weights(one_process), weights(env["dir"] / "two.pt")) < 1e-5
    h1 = torch.load(one_process, weights_only=True)["metrics"]["history"]
    h2 = torch.load(env["dir"] / "two.pt", weights_only=True)["metrics"]["history"]
    for a, b in zip(h1, h2):  # the printed loss and accuracies are the global ones
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert (a["train_acc"], a["test_acc"]) == (b["train_acc"], b["test_acc"])
    assert r.stdout.count("epoch   1/2") == 1  # only rank 0 prints


def test_failing_rank_stops_every_rank_and_the_run_resumes_under_another_world_size(env, one_process):
    """Rank 1 fails at its 8th forward call (epoch 2, batch 2: epoch 1 is 5 training
    batches and one test batch): both ranks exit non-zero with one line each, epoch 1's
    checkpoint is intact and no mid-epoch state is left; resuming it in one process
    ends where the uninterrupted run ends."""
    r = run(env, *TRAIN, "--epochs", "2", "--out", "cut.pt", ranks=2, extra_env={"TEST_FAIL_RANK_AT": "1:8"})
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 2, r.stderr
    assert any("injected failure" in line for line in ours)
    assert any("rank 0 of 2 stopped: another rank failed" in line for line in ours)
    cut = env["dir"] / "cut.pt"
    assert torch.load(cut, weights_only=True)["train_state"]["epoch"] == 1
    assert not (env["dir"] / "cut.partial.pt").exists()
    r = run(env, *TRAIN, "--epochs", "2", "--out", "cut.pt", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming after epoch 1" in r.stdout
    assert max_diff(weights(one_process), weights(cut)) < 1e-5


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_batch(env):
    """The loss is all-reduced before it is checked: a NaN on rank 1 only (epoch 2, batch
    2) stops both ranks with the same one-line error; epoch 1's checkpoint is intact."""
    r = run(env, *TRAIN, "--epochs", "2", "--out", "nan.pt", ranks=2, extra_env={"TEST_FAIL_RANK_AT": "1:8:nan"})
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 2 and len(set(ours)) == 1, r.stderr
    assert "not finite" in ours[0] and "epoch 2, batch 2" in ours[0]
    assert torch.load(env["dir"] / "nan.pt", weights_only=True)["train_state"]["epoch"] == 1


def test_conversion_thresholds_equal_one_process(env, one_process):
    conv = ["convert", "--checkpoint", str(one_process), "--timesteps", "8", "--batches", "3", "--batch-size", "8",
            "--percentile", "99", "--curve", "4,8", "--test-subset", "20", "--device", "cpu", "--seed", "1"]
    for ranks, out in ((1, "c1.pt"), (2, "c2.pt")):
        r = run(env, *conv, "--out", out, ranks=ranks)
        assert r.returncode == 0, r.stderr
    m1, m2 = (torch.load(env["dir"] / f, weights_only=True)["metrics"] for f in ("c1.pt", "c2.pt"))
    assert m1["thresholds"] == m2["thresholds"]  # exactly: the same values, merged exactly
    assert m1["curve"] == m2["curve"]


def test_a_batch_size_that_does_not_divide_is_refused(env):
    r = run(env, *TRAIN, "--epochs", "1", "--batch-size", "15", "--out", "odd.pt", ranks=2)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines and all("does not divide over 2 ranks" in line for line in lines), r.stderr
    assert not (env["dir"] / "odd.pt").exists()


SPREAD_CONFIG = """
[common]
dataset = "cifar10"
data_dir = "{data}"
device = "cpu"
batch_size = 64
train_subset = 256
test_subset = 20

[reproduce]
seeds = [0, 1]

[train-ann]
arch = "tiny"
epochs = 1
lr = 0.05
"""


def test_reproduce_spread_trains_the_two_seeds_on_two_ranks_as_one_process_would(env):
    """``reproduce --spread``: seed I's ANN on rank 0 and seed II's on rank 1, at the
    same time, each as one process (dropout included): the same weights, bit for bit,
    as a single process running both, and every record written once."""
    config = env["dir"] / "spread.toml"
    config.write_text(SPREAD_CONFIG.format(data=env["data"]))
    for ranks, folder, extra in ((1, "r1", []), (2, "r2", ["--spread"])):
        r = run(env, "reproduce", "--config", str(config), "--run-dir", folder, "--only", "ann", "--only", "ann_ii",
                *extra, ranks=ranks)
        assert r.returncode == 0, r.stderr
    for name in ("ann", "ann_ii"):
        a, b = (weights(env["dir"] / d / "models" / f"{name}.pt") for d in ("r1", "r2"))
        assert max_diff(a, b) == 0.0
        assert (env["dir"] / "r2" / "stages" / f"{name}.json").exists()
    assert not list((env["dir"] / "r2" / "stages").glob("*.started"))
