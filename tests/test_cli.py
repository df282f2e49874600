"""The ``snnadv`` command line: pipeline order, one-line errors with a non-zero exit,
config precedence, and the train-ann -> convert -> finetune chain end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import snnadv
import snnadv.train
from snnadv import __version__
from snnadv.checkpoint import file_hash, load_checkpoint
from snnadv.cli.main import cli, main
from snnadv.config import resolve
from snnadv.errors import SnnadvError

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quick.toml"


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc: int, err: str, *words: str):
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], (w, err)


# -- help and version ------------------------------------------------------------------------


def test_help_lists_the_stages_in_pipeline_order():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    text = result.output
    commands = text[text.index("Commands:"):].splitlines()[1:]
    names = [line.split()[0] for line in commands if line.strip()]
    assert names[:3] == ["train-ann", "convert", "finetune"]


def test_help_and_version_exit_zero(capsys):
    rc, out, err = _run(capsys, "--help")
    assert rc == 0 and "train-ann" in out and err == ""
    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and __version__ in out
    for cmd in ("train-ann", "convert", "finetune"):
        rc, out, _ = _run(capsys, cmd, "--help")
        assert rc == 0 and "--config" in out and "--out" in out and "--seed" in out


# -- one-line errors ---------------------------------------------------------------------------


@pytest.fixture
def corrupt_ckpt(tmp_path) -> Path:
    p = tmp_path / "corrupt.pt"
    p.write_bytes(os.urandom(2048))
    return p


def test_unknown_arch(capsys, shared_data, tmp_path):
    rc, _, err = _run(capsys, "train-ann", "--arch", "vgg99", "--data-dir", shared_data, "--out", tmp_path / "a.pt")
    _assert_one_line_error(rc, err, "vgg99")
    assert not list(tmp_path.iterdir())


def test_unknown_dataset(capsys, shared_data, tmp_path):
    rc, _, err = _run(capsys, "train-ann", "--arch", "tiny", "--dataset", "mnist", "--data-dir", shared_data,
                      "--out", tmp_path / "a.pt")
    _assert_one_line_error(rc, err, "mnist")


@pytest.mark.parametrize("args,word", [
    (["--batch-size", "-1"], "batch-size"),
    (["--batch-size", "0"], "batch-size"),
    (["--epochs", "-3"], "epochs"),
    (["--epochs", "abc"], "epochs"),
    (["--input-range", "bipolar"], "input-range"),
    (["--milestones", "1,x"], "milestones"),
    (["--bogus-flag"], "bogus"),
])
def test_bad_train_options(capsys, shared_data, tmp_path, args, word):
    rc, _, err = _run(capsys, "train-ann", "--arch", "tiny", "--data-dir", shared_data, "--out", tmp_path / "a.pt",
                      *args)
    _assert_one_line_error(rc, err, word)
    assert not (tmp_path / "a.pt").exists()


def test_zero_epochs(capsys, shared_data, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started with --epochs 0")

    monkeypatch.setattr(snnadv.train, "fit", no_training)
    rc, _, err = _run(capsys, "train-ann", "--arch", "tiny", "--epochs", "0", "--data-dir", shared_data,
                      "--out", tmp_path / "a.pt")
    _assert_one_line_error(rc, err, "epochs")


def test_missing_data_dir(capsys, tmp_path):
    missing = tmp_path / "no-such-data"
    rc, _, err = _run(capsys, "train-ann", "--arch", "tiny", "--data-dir", missing, "--out", tmp_path / "a.pt")
    _assert_one_line_error(rc, err, str(missing))


def test_corrupt_checkpoint_given_to_convert(capsys, shared_data, tmp_path, corrupt_ckpt):
    rc, _, err = _run(capsys, "convert", "--checkpoint", corrupt_ckpt, "--data-dir", shared_data,
                      "--out", tmp_path / "c.pt")
    _assert_one_line_error(rc, err, str(corrupt_ckpt))
    rc, _, err = _run(capsys, "finetune", "--checkpoint", corrupt_ckpt, "--data-dir", shared_data,
                      "--out", tmp_path / "f.pt")
    _assert_one_line_error(rc, err, str(corrupt_ckpt))
    assert not (tmp_path / "c.pt").exists() and not (tmp_path / "f.pt").exists()


@pytest.mark.parametrize("leak", ["1.5", "0", "-0.2"])
def test_leak_outside_0_1(capsys, shared_data, tmp_path, corrupt_ckpt, leak):
    rc, _, err = _run(capsys, "finetune", "--checkpoint", corrupt_ckpt, "--leak", leak, "--data-dir", shared_data,
                      "--out", tmp_path / "f.pt")
    _assert_one_line_error(rc, err, "leak")


@pytest.mark.parametrize("args,word", [(["--percentile", "0"], "percentile"),
                                       (["--percentile", "150"], "percentile"),
                                       (["--timesteps", "0"], "timesteps"),
                                       (["--balance", "middle"], "balance")])
def test_bad_convert_options(capsys, shared_data, tmp_path, corrupt_ckpt, args, word):
    rc, _, err = _run(capsys, "convert", "--checkpoint", corrupt_ckpt, "--data-dir", shared_data, *args)
    _assert_one_line_error(rc, err, word)


def test_missing_checkpoint_option(capsys, shared_data):
    for cmd in ("convert", "finetune"):
        rc, _, err = _run(capsys, cmd, "--data-dir", shared_data)
        _assert_one_line_error(rc, err, "--checkpoint")


def test_config_errors(capsys, tmp_path):
    rc, _, err = _run(capsys, "train-ann", "--config", tmp_path / "none.toml")
    _assert_one_line_error(rc, err, "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train-ann]\nepochs = \n")
    rc, _, err = _run(capsys, "train-ann", "--config", bad)
    _assert_one_line_error(rc, err, "bad.toml")
    typo = tmp_path / "typo.toml"
    typo.write_text("[train-ann]\nepoch = 3\n")
    rc, _, err = _run(capsys, "train-ann", "--config", typo)
    _assert_one_line_error(rc, err, "epoch")


# -- config precedence ---------------------------------------------------------------------------


@pytest.fixture
def layered_config(tmp_path) -> Path:
    p = tmp_path / "cfg.toml"
    p.write_text(
        "[common]\nbatch_size = 32\nseed = 5\ntimesteps = 64\n\n"
        "[train-ann]\nbatch_size = 16\nepochs = 3\nweight-decay = 0.001\n\n"
        "[convert]\npercentile = 99.0\n"
    )
    return p


def test_config_precedence(layered_config):
    cfg = resolve("train-ann", layered_config, {"epochs": 7, "lr": None})
    assert cfg["epochs"] == 7  # flag > [train-ann]
    assert cfg["batch_size"] == 16  # [train-ann] > [common]
    assert cfg["seed"] == 5  # [common] > default
    assert cfg["weight_decay"] == 0.001  # hyphenated keys are accepted
    assert cfg["lr"] is None and cfg["momentum"] == 0.9 and cfg["arch"] == "vgg5"  # defaults
    assert cfg["stage"] == "train-ann" and cfg["config"] == str(layered_config)
    assert "timesteps" not in cfg  # a [common] key of other stages does not leak in
    conv = resolve("convert", layered_config, {"batch_size": 8})
    assert conv["batch_size"] == 8 and conv["seed"] == 5 and conv["percentile"] == 99.0
    assert conv["timesteps"] == 64  # [common] feeds every stage that knows the key
    assert resolve("train-ann", None, {})["batch_size"] == 64
    assert resolve("train-ann", {"train-ann": {"epochs": 2}})["epochs"] == 2


def test_config_precedence_through_the_cli(capsys, layered_config, monkeypatch):
    seen = {}
    monkeypatch.setattr(snnadv.train, "train_ann", lambda cfg: seen.update(cfg))
    rc, _, err = _run(capsys, "train-ann", "--config", layered_config, "--epochs", "7", "--milestones", "2,4")
    assert rc == 0, err
    assert (seen["epochs"], seen["batch_size"], seen["seed"], seen["milestones"]) == (7, 16, 5, [2, 4])
    assert seen["resume"] is False and seen["quiet"] is False  # flags not given stay defaults


def test_unknown_key_in_a_stage_table_is_an_error(tmp_path):
    p = tmp_path / "typo.toml"
    p.write_text("[convert]\npercentil = 99.9\n")
    with pytest.raises(SnnadvError, match="percentil"):
        resolve("convert", p)
    p.write_text("[common]\nseed = 1\n[train-ann]\nbatchsize = 8\n")
    with pytest.raises(SnnadvError, match="batchsize"):
        resolve("train-ann", p)


def test_unknown_key_in_common_is_an_error(tmp_path):
    p = tmp_path / "typo.toml"
    p.write_text("[common]\nbacth_size = 8\n")
    with pytest.raises(SnnadvError, match="bacth_size"):
        resolve("train-ann", p)


def test_quick_config_resolves_for_every_stage():
    for stage in ("train-ann", "convert", "finetune"):
        cfg = resolve(stage, QUICK)
        assert cfg["dataset"] == "cifar10" and cfg["batch_size"] == 64
    assert resolve("convert", QUICK)["percentile"] == 99.9
    assert resolve("finetune", QUICK)["leak"] == 0.99


# -- the whole chain -------------------------------------------------------------------------------


def _check_stage_outputs(pt: Path, stage: str, parent: Path | None = None) -> dict:
    assert pt.is_file() and pt.with_suffix(".json").is_file()
    js = json.loads(pt.with_suffix(".json").read_text())
    assert js["stage"] == stage
    assert js["sha256"] == file_hash(pt)
    assert isinstance(js["config"], dict) and js["config"]["config"] == str(QUICK)
    assert isinstance(js["metrics"], dict) and 0.0 <= js["metrics"]["test_acc"] <= 100.0
    ckpt = load_checkpoint(pt, stage)
    assert ckpt["spec"]["arch"] == "tiny"
    if parent is not None:
        assert js["parent"]["sha256"] == file_hash(parent)
    torch.load(pt, map_location="cpu", weights_only=True)
    return js


def test_train_convert_finetune_chain(capsys, shared_data, tmp_path):
    common = ["--config", QUICK, "--data-dir", shared_data, "--device", "cpu"]
    ann, conv, bp = tmp_path / "ann.pt", tmp_path / "conv.pt", tmp_path / "bp.pt"

    rc, out, err = _run(capsys, "train-ann", *common, "--arch", "tiny", "--epochs", "2", "--train-subset", "1000",
                        "--test-subset", "200", "--out", ann)
    assert rc == 0, err
    assert "saved" in out
    js = _check_stage_outputs(ann, "ann")
    assert js["config"]["epochs"] == 2 and js["config"]["lr"] == 0.05 and js["config"]["arch"] == "tiny"
    assert len(js["metrics"]["history"]) == 2

    rc, out, err = _run(capsys, "convert", *common, "--checkpoint", ann, "--timesteps", "32", "--curve", "8,16",
                        "--batches", "1", "--test-subset", "100", "--quiet", "--out", conv)
    assert rc == 0, err
    js = _check_stage_outputs(conv, "snn-conv", parent=ann)
    assert js["config"]["percentile"] == 99.9  # from quick.toml
    assert sorted(js["metrics"]["curve"], key=int) == ["8", "16", "32"]

    rc, out, err = _run(capsys, "finetune", *common, "--checkpoint", conv, "--leak", "0.95", "--timesteps", "8",
                        "--train-subset", "256", "--test-subset", "100", "--quiet", "--out", bp)
    assert rc == 0, err
    js = _check_stage_outputs(bp, "snn-bp", parent=conv)
    assert js["config"]["leak"] == 0.95 and js["config"]["epochs"] == 1 and js["config"]["timesteps"] == 8
    assert "test_acc_before" in js["metrics"]
    model = snnadv.load_model(bp)
    assert model.leak == pytest.approx(0.95) and model.num_steps == 8

    # the same fine-tuning with bf16 synaptic layers (a run-time setting, not saved in the model)
    bp16 = tmp_path / "bp16.pt"
    rc, out, err = _run(capsys, "finetune", *common, "--checkpoint", conv, "--leak", "0.95", "--timesteps", "8",
                        "--train-subset", "256", "--test-subset", "100", "--quiet", "--precision", "bf16",
                        "--out", bp16)
    assert rc == 0, err
    js16 = _check_stage_outputs(bp16, "snn-bp", parent=conv)
    assert js16["config"]["precision"] == "bf16" and 0.0 <= js16["metrics"]["test_acc"] <= 100.0
    assert snnadv.load_model(bp16).precision == "fp32"
    assert snnadv.load_model(bp16, precision="bf16").precision == "bf16"


@pytest.mark.parametrize("stage", ["train-ann", "finetune"])
def test_unknown_precision_is_one_line(capsys, shared_data, tmp_path, corrupt_ckpt, stage):
    extra = ["--arch", "tiny"] if stage == "train-ann" else ["--checkpoint", corrupt_ckpt]
    rc, out, err = _run(capsys, stage, "--data-dir", shared_data, "--device", "cpu", "--precision", "fp16",
                        *extra, "--out", tmp_path / "x.pt")
    _assert_one_line_error(rc, err, "fp16")
    assert "precision" in err
