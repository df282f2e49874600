"""Bad input through the real command line: one ``error:`` line, exit 2, nothing written.

Settings (flags and configs) are checked against one typed schema (snnadv.config);
checkpoints are checked for structure and finite values when they are loaded and
before they are saved; an unexpected exception is one line plus a saved traceback
(exit 1); Ctrl-C during training says which epoch is kept.  Most cases need no
training: three tiny checkpoints are made once for the module.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

import snnadv.train
import snnadv.training
from snnadv.checkpoint import file_hash, load_checkpoint, save_checkpoint
from snnadv.cli.main import main
from snnadv.config import resolve
from snnadv.errors import CheckpointError, SnnadvError

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(rc: int, err: str, *words: str, code: int = 2) -> str:
    assert rc == code, (rc, err)
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], (w, err)
    return lines[0]


def _files(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def ckpts(shared_data, tmp_path_factory) -> dict:
    """A tiny ANN, its SNN-conv and an SNN-BP (1 epoch each, a few hundred images)."""
    from snnadv.convert import convert
    from snnadv.train import finetune, train_ann

    root = tmp_path_factory.mktemp("ckpts")
    common = dict(data_dir=str(shared_data), device="cpu", quiet=True, seed=0, test_subset=50)
    paths = {k: root / f"{k}.pt" for k in ("ann", "conv", "bp")}
    train_ann(resolve("train-ann", flags=dict(common, arch="tiny", epochs=2, lr=0.05, train_subset=128,
                                              out=str(paths["ann"]))))
    convert(resolve("convert", flags=dict(common, checkpoint=str(paths["ann"]), timesteps=8, curve=[8],
                                          batch_size=32, out=str(paths["conv"]))))
    finetune(resolve("finetune", flags=dict(common, checkpoint=str(paths["conv"]), timesteps=4, epochs=1,
                                            train_subset=64, batch_size=32, out=str(paths["bp"]))))
    return {**paths, "data": shared_data, "root": root}


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working folder (relative outputs land here: nothing may appear)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- flags: every setting has a type and a domain -----------------------------------------------------

FLAG_CASES = [
    # (command words, extra args, words the one line must contain)
    (["train-ann"], ["--lr", "inf"], ["--lr", "finite"]),
    (["train-ann"], ["--lr", "nan"], ["--lr", "finite"]),
    (["train-ann"], ["--lr", "-0.1"], ["--lr"]),
    (["train-ann"], ["--momentum", "-1"], ["--momentum"]),
    (["train-ann"], ["--momentum", "nan"], ["--momentum", "finite"]),
    (["train-ann"], ["--weight-decay", "-1e-4"], ["--weight-decay"]),
    (["train-ann"], ["--epochs", "0"], ["--epochs"]),
    (["train-ann"], ["--epochs", "1000000"], ["--epochs", "100000"]),
    (["train-ann"], ["--epochs", "1e20"], ["--epochs"]),
    (["train-ann"], ["--batch-size", "100000000"], ["--batch-size", "65536"]),
    (["train-ann"], ["--train-subset", "0"], ["--train-subset"]),
    (["train-ann"], ["--seed", "-1"], ["--seed"]),
    (["train-ann"], ["--input-bits", "9"], ["--input-bits"]),
    (["train-ann"], ["--epochs", "5", "--milestones", "0,3"], ["milestones"]),
    (["train-ann"], ["--epochs", "5", "--milestones", "2,7"], ["milestones", "7"]),
    (["train-ann"], ["--milestones", "1,x"], ["--milestones"]),
    (["train-ann"], ["--device", "cuda:abc"], ["cuda:abc"]),
    (["train-ann"], ["--device", "tpu"], ["tpu"]),
    (["train-ann"], ["--dataset", "mnist"], ["mnist"]),
    (["train-ann"], ["--arch", "vgg55"], ["vgg55", "vgg5"]),
    (["train-ann"], ["--precision", "fp16"], ["fp16"]),
    (["convert"], ["--scale", "0"], ["--scale"]),
    (["convert"], ["--scale", "nan"], ["--scale", "finite"]),
    (["convert"], ["--scale", "-0.7"], ["--scale"]),
    (["convert"], ["--percentile", "0"], ["--percentile"]),
    (["convert"], ["--percentile", "nan"], ["--percentile"]),
    (["convert"], ["--timesteps", "10000000000"], ["--timesteps", "100000"]),
    (["convert"], ["--timesteps", "1e10"], ["--timesteps"]),
    (["convert"], ["--timesteps", "64", "--curve", "16,128"], ["curve", "128", "64"]),
    (["convert"], ["--curve", "16,abc"], ["--curve"]),
    (["convert"], ["--batches", "0"], ["--batches"]),
    (["finetune"], ["--scale", "0"], ["--scale"]),
    (["finetune"], ["--scale", "nan"], ["--scale"]),
    (["finetune"], ["--alpha", "nan"], ["--alpha"]),
    (["finetune"], ["--alpha", "0"], ["--alpha"]),
    (["finetune"], ["--beta", "-1"], ["--beta"]),
    (["finetune"], ["--gamma", "inf"], ["--gamma"]),
    (["finetune"], ["--leak", "nan"], ["--leak"]),
    (["finetune"], ["--leak", "1.5"], ["--leak"]),
    (["finetune"], ["--lr", "inf"], ["--lr"]),
    (["finetune"], ["--lr-step", "0"], ["--lr-step"]),
    (["finetune"], ["--weight-decay", "-1"], ["--weight-decay"]),
    (["finetune"], ["--timesteps", "0"], ["--timesteps"]),
    (["attack"], ["--eval-draws", "0"], ["--eval-draws"]),
    (["attack"], ["--eps", "9"], ["--eps"]),
    (["attack"], ["--eps", "8/0"], ["--eps"]),
    (["attack"], ["--eps", "nan"], ["--eps"]),
    (["attack"], ["--alpha", "0"], ["--alpha"]),
    (["attack"], ["--steps", "0"], ["--steps"]),
    (["attack"], ["--eot", "0"], ["--eot"]),
    (["attack"], ["--timesteps", "10000000000"], ["--timesteps"]),
    (["evaluate"], ["--eval-draws", "0"], ["--eval-draws"]),
    (["evaluate"], ["--eps", "2/255,x"], ["--eps"]),
    (["evaluate"], ["--slope", "-5"], ["--slope"]),
    (["evaluate"], ["--restarts", "0"], ["--restarts"]),
    (["evaluate", "--protocol", "strong-cpu"], ["--sharpness-images", "0"], ["--sharpness-images"]),
    (["analyze", "eq7"], ["--threshold", "0"], ["--threshold"]),
    (["analyze", "eq7"], ["--threshold", "nan"], ["--threshold"]),
    (["analyze", "eq7"], ["--points", "0"], ["--points"]),
    (["analyze", "perturbation"], ["--threshold", "-1"], ["--threshold"]),
    (["analyze", "perturbation"], ["--leak", "0"], ["--leak"]),
    (["analyze", "leak"], ["--leaks", "0.9,2"], ["--leaks"]),
    (["analyze", "leak"], ["--eval-draws", "0"], ["--eval-draws"]),
    (["analyze", "timesteps"], ["--timesteps", "50,0"], ["--timesteps"]),
    (["bench"], ["--peak-tflops", "-1"], ["--peak-tflops"]),
    (["bench"], ["--peak-tbps", "nan"], ["--peak-tbps"]),
    (["bench"], ["--chunk-steps", "0"], ["--chunk-steps"]),
    (["reproduce", "--config", REPO / "configs" / "quick.toml"], ["--max-stages", "-1"], ["--max-stages"]),
]


@pytest.mark.parametrize("cmd,args,words", FLAG_CASES, ids=[" ".join(c[:1] + a) for c, a, _ in FLAG_CASES])
def test_bad_flags_are_one_line_and_write_nothing(capsys, work, cmd, args, words):
    """(A missing --data-dir: a bad flag must be refused before the data is looked at.)"""
    rc, _, err = _run(capsys, *cmd, *args, *([] if cmd[0] == "reproduce" else ["--data-dir", work / "no-data"]))
    _one_error_line(rc, err, *words)
    assert not _files(work)


def test_a_bad_flag_fails_before_any_work(capsys, shared_data, work, monkeypatch):
    monkeypatch.setattr(snnadv.train, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    rc, _, err = _run(capsys, "train-ann", "--arch", "tiny", "--data-dir", shared_data, "--momentum", "-1")
    _one_error_line(rc, err, "--momentum")


def test_cuda_without_a_gpu_is_one_line(capsys, shared_data, work):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for device in ("cuda", "cuda:0", "cuda:3"):
        rc, _, err = _run(capsys, "train-ann", "--arch", "tiny", "--data-dir", shared_data, "--device", device)
        _one_error_line(rc, err, device, "no CUDA device")
    assert not _files(work)


# -- configs: one typed schema, unknown tables and keys with a did-you-mean --------------------------

CONFIG_CASES = [
    ("[train_ann]\nepochs = 1\n", ["[train_ann]", "did you mean 'train-ann'"]),
    ("[trian-ann]\nepochs = 1\n", ["[trian-ann]", "train-ann"]),
    ("[reproduce]\nrun_dri = 'x'\n", ["run_dri", "run_dir"]),
    ("[reproduce]\nseeds = 'a,b'\n", ["seeds"]),
    ("[reproduce]\nevaluate = 'yes'\n", ["evaluate", "true or false"]),
    ("[train-ann]\nepochz = 2\n", ["epochz", "did you mean 'epochs'"]),
    ("[common]\nbacth_size = 8\n", ["bacth_size", "batch_size"]),
    ("[train-ann]\nepochs = 1.5\n", ["epochs must be an integer, got 1.5 (a float)", "[train-ann]"]),
    ("[train-ann]\nepochs = \"2\"\n", ["epochs must be an integer, got '2' (a string)"]),
    ("[train-ann]\nepochs = true\n", ["epochs must be an integer", "a boolean"]),
    ("[common]\ndata_dir = 42\n", ["data_dir", "42", "an integer"]),
    ("[common]\ndevice = 3\n", ["device", "3"]),
    ("[common]\nbatch_size = -4\n", ["batch_size", "-4"]),
    ("[common]\nseed = 1e3\n", ["seed", "a float"]),
    ("[train-ann]\narch = [\"tiny\"]\n", ["arch", "['tiny']", "a list"]),
    ("[train-ann]\nlr = nan\n", ["lr", "finite"]),
    ("[train-ann]\nlr = inf\n", ["lr", "finite"]),
    ("[train-ann]\nmilestones = 6\nepochs = 5\n", ["milestones", "6"]),
    ("[train-ann]\nresume = 1\n", ["resume", "true or false"]),
    ("train-ann = 3\n", ["train-ann", "table"]),
    ("[train-ann]\nepochs = \n", ["not valid TOML"]),
]


@pytest.mark.parametrize("text,words", CONFIG_CASES, ids=[t.split("\n")[1][:20] or t[:20] for t, _ in CONFIG_CASES])
def test_bad_configs_are_one_line(capsys, work, text, words):
    cfg = work / "cfg.toml"
    cfg.write_text(text)
    rc, _, err = _run(capsys, "train-ann", "--config", cfg, "--data-dir", work / "no-data")
    _one_error_line(rc, err, *words)
    assert _files(work) == {Path("cfg.toml")}


@pytest.mark.parametrize("stage,text,words", [
    ("convert", "[convert]\ncurve = \"4,8\"\ntimesteps = 4\n", ["curve point 8", "timesteps 4"]),
    ("convert", "[convert]\ncurve = [4, \"x\"]\n", ["curve", "'x'"]),
    ("convert", "[convert]\nbalance = \"middle\"\n", ["balance", "middle"]),
    ("finetune", "[finetune]\nsurrogate = \"stbd\"\n", ["surrogate", "did you mean 'stdb'"]),
    ("attack", "[attack]\neps = [1]\n", ["eps", "a list"]),
    ("evaluate", "[evaluate]\nsweep_eps = \"0,2\"\n", ["sweep_eps"]),
    ("analyze", "[analyze]\nthreshold = 0\n", ["threshold"]),
    ("bench", "[bench]\npeak_tflops = -1\n", ["peak_tflops"]),
])
def test_bad_config_values_of_every_stage(stage, text, words, tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(text)
    with pytest.raises(SnnadvError) as e:
        resolve(stage, cfg)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_list_given_as_text_in_a_config_is_read():
    assert resolve("convert", {"convert": {"curve": "4,8", "timesteps": 8}})["curve"] == [4, 8]


def test_non_utf8_and_unreadable_configs(capsys, work):
    bad = work / "latin1.toml"
    bad.write_bytes(b"[common]\nout = \"caf\xe9\"\n")
    rc, _, err = _run(capsys, "train-ann", "--config", bad)
    _one_error_line(rc, err, "latin1.toml", "UTF-8")
    rc, _, err = _run(capsys, "train-ann", "--config", work)
    _one_error_line(rc, err, "not a file")


def test_library_values_go_through_the_same_schema():
    with pytest.raises(SnnadvError, match="unknown setting 'epoch'.*epochs"):
        resolve("train-ann", flags={"epoch": 3})
    with pytest.raises(SnnadvError, match="--epochs must be an integer, got 2.5"):
        resolve("train-ann", flags={"epochs": 2.5})


# -- checkpoints: structure and finite values, on load and on save ---------------------------------------


def _mutated(src: Path, dst: Path, change) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, dst)
    return dst


def _set(path: tuple, value):
    def change(ckpt):
        d = ckpt
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return change


def _layer(i: int, **fields):
    return lambda ckpt: ckpt["spec"]["layers"][i].update(fields)


BAD_CKPTS = [
    ("ann", "no-stage", lambda c: c.pop("stage"), ["stage"]),
    ("ann", "odd-stage", _set(("stage",), "snn-xyz"), ["stage", "snn-xyz"]),
    ("ann", "no-spec", lambda c: c.pop("spec"), ["spec"]),
    ("ann", "string-spec", _set(("spec",), "vgg5"), ["spec"]),
    ("ann", "no-layers", _set(("spec", "layers"), []), ["layers"]),
    ("ann", "unknown-kind", _layer(0, kind="Conv3D"), ["Conv3D"]),
    ("ann", "negative-kernel", _layer(0, k=-3), ["conv1", "k"]),
    ("ann", "huge-channels", _layer(0, cout=2 ** 40), ["conv1", "cout"]),
    ("ann", "string-channels", _layer(0, cin="3"), ["conv1", "cin"]),
    ("ann", "extra-field", _layer(0, dilation=2), ["dilation"]),
    ("ann", "too-many-weights", lambda c: [l.update(fin=2 ** 20, fout=2 ** 20) for l in c["spec"]["layers"]
                                           if l["kind"] == "Linear"], ["weights", "GB"]),
    ("ann", "num-classes", _set(("spec", "num_classes"), 0), ["num_classes"]),
    ("ann", "dataset", _set(("dataset",), "mnist"), ["dataset", "mnist"]),
    ("ann", "no-weights", lambda c: c.pop("state_dict"), ["state_dict"]),
    ("ann", "nan-weights", lambda c: c["state_dict"]["conv1.weight"].fill_(float("nan")), ["conv1.weight",
                                                                                           "non-finite"]),
    ("ann", "inf-weights", lambda c: c["state_dict"]["classifier.weight"].fill_(float("inf")), ["classifier"]),
    ("ann", "string-weight", _set(("state_dict", "conv1.weight"), "w"), ["conv1.weight"]),
    ("ann", "bits", _set(("model", "input_bits"), 12), ["input_bits"]),
    ("conv", "zero-threshold", lambda c: c["model"]["thresholds"].update(act1=0.0), ["threshold", "act1"]),
    ("conv", "nan-threshold", lambda c: c["model"]["thresholds"].update(act1=float("nan")), ["act1"]),
    ("conv", "nan-scale", _set(("model", "finetune_scale"), float("nan")), ["finetune_scale"]),
    ("conv", "leak", _set(("model", "leak"), 2.0), ["leak"]),
    ("bp", "steps", _set(("model", "num_steps"), -4), ["num_steps"]),
    ("bp", "surrogate", _set(("model", "surrogate"), {"name": "magic"}), ["surrogate"]),
    ("bp", "surrogate-nan", lambda c: c["model"]["surrogate"].update(alpha=float("nan")), ["surrogate"]),
]


@pytest.mark.parametrize("base,name,change,words", BAD_CKPTS, ids=[c[1] for c in BAD_CKPTS])
def test_bad_checkpoints_are_refused_for_every_use(capsys, ckpts, work, base, name, change, words):
    bad = _mutated(ckpts[base], work / f"{name}.pt", change)
    data = ["--data-dir", ckpts["data"], "--device", "cpu"]
    uses = [["evaluate", "--target-ckpt", bad], ["attack", "--source", base.replace("conv", "snn-conv").replace(
        "bp", "snn-bp"), "--source-ckpt", bad]]
    uses.append(["convert", "--checkpoint", bad] if base == "ann" else ["finetune", "--checkpoint", bad])
    if base == "ann":
        uses.append(["analyze", "perturbation", "--checkpoint", bad])
    for use in uses:
        rc, _, err = _run(capsys, *use, *data, "--out", work / "out")
        _one_error_line(rc, err, str(bad), *words)
    assert _files(work) == {Path(bad.name)}


def test_unreadable_files_say_what_they_are(capsys, ckpts, work):
    text = work / "notes.pt"
    text.write_text("hello, this is text\n")
    rc, _, err = _run(capsys, "evaluate", "--target-ckpt", text)
    line = _one_error_line(rc, err, "notes.pt", "not a torch checkpoint")
    assert "(101)" not in line

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(work / "pwned"),))

    evil = work / "evil.pt"
    torch.save({"format": "snnadv-checkpoint", "x": Evil()}, evil)
    rc, _, err = _run(capsys, "convert", "--checkpoint", evil)
    line = _one_error_line(rc, err, "evil.pt", "unsafe")
    assert "weights_only" not in line and not (work / "pwned").exists()
    trunc = work / "trunc.pt"
    trunc.write_bytes(ckpts["ann"].read_bytes()[:3000])
    rc, _, err = _run(capsys, "evaluate", "--target-ckpt", trunc)
    _one_error_line(rc, err, "trunc.pt", "truncated")


def test_non_finite_checkpoints_are_never_saved_and_the_old_file_stays(ckpts, tmp_path):
    out = tmp_path / "ann.pt"
    out.write_bytes(ckpts["ann"].read_bytes())
    before = file_hash(out)
    ckpt = load_checkpoint(out)
    for change, word in ((lambda c: c["state_dict"]["conv1.weight"].fill_(float("nan")), "conv1.weight"),
                         (_set(("spec", "layers"), "x"), "layers")):
        bad = {k: v for k, v in load_checkpoint(out).items() if k not in ("format", "format_version", "versions")}
        change(bad)
        with pytest.raises(CheckpointError, match=word):
            save_checkpoint(out, bad)
        assert file_hash(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ann.pt"]
    conv = {k: v for k, v in load_checkpoint(ckpts["conv"]).items() if k not in ("format", "versions")}
    conv["model"]["thresholds"]["act1"] = -1.0
    with pytest.raises(CheckpointError, match="act1"):
        save_checkpoint(tmp_path / "conv.pt", conv)
    assert not (tmp_path / "conv.pt").exists() and ckpt["stage"] == "ann"


def test_training_that_diverges_writes_nothing(capsys, shared_data, work, monkeypatch):
    """One batch whose step leaves NaN weights: exit 2, no checkpoint, no JSON."""
    real = snnadv.training.make_optimizer

    def diverging(cls, params, **kw):
        params = list(params)
        opt = real(cls, params, **kw)
        opt.register_step_post_hook(lambda *_: params[0].data.fill_(float("nan")))
        return opt

    monkeypatch.setattr(snnadv.training, "make_optimizer", diverging)
    rc, _, err = _run(capsys, "train-ann", "--arch", "tiny", "--epochs", "1", "--train-subset", "64",
                      "--test-subset", "20", "--data-dir", shared_data, "--device", "cpu", "--quiet",
                      "--out", work / "ann.pt")
    _one_error_line(rc, err, "ann.pt", "non-finite")
    assert not _files(work)


# -- resume only with the settings that shaped the checkpoint ------------------------------------------


@pytest.fixture(scope="module")
def resumable(ckpts, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    other = _mutated(ckpts["conv"], root / "conv-other.pt", lambda c: c["metrics"].update(note="other"))
    return {"ann": ckpts["ann"], "bp": ckpts["bp"], "conv": ckpts["conv"], "other": other, "data": ckpts["data"]}


@pytest.mark.parametrize("stage,args,words", [
    ("ann", ["--epochs", "1"], ["already holds 2 epochs", "--epochs 1"]),
    ("ann", ["--epochs", "2", "--lr", "0.1"], ["lr 0.05 (now 0.1)"]),
    ("ann", ["--epochs", "2", "--lr", "0.05", "--momentum", "0.5", "--seed", "3"], ["momentum 0.9 (now 0.5)",
                                                                                     "seed 0 (now 3)"]),
    ("ann", ["--epochs", "4", "--lr", "0.05", "--milestones", "3"], ["milestones"]),
    ("bp", ["--leak", "0.5", "--timesteps", "4"], ["leak 0.99 (now 0.5)"]),
    ("bp", ["--timesteps", "8"], ["timesteps 4 (now 8)"]),
    ("bp", ["--timesteps", "4", "--surrogate", "linear"], ["surrogate"]),
    ("bp", ["--timesteps", "4", "--scale", "0.5"], ["thresholds (scale) differ"]),
    ("bp", ["--timesteps", "4", "--lr", "0.1"], ["lr 0.0001 (now 0.1)"]),
    ("bp", ["--timesteps", "4", "--epochs", "0"], ["--epochs"]),
    ("bp-other", ["--timesteps", "4"], ["checkpoint"]),
])
def test_resume_refuses_other_settings(capsys, resumable, tmp_path, stage, args, words):
    out = tmp_path / "run.pt"
    out.write_bytes(resumable[stage.split("-")[0]].read_bytes())
    before = file_hash(out)
    if stage == "ann":
        base = ["train-ann", "--arch", "tiny", "--train-subset", "128"]
    else:
        src = resumable["other" if stage == "bp-other" else "conv"]
        base = ["finetune", "--checkpoint", src, "--train-subset", "64", "--batch-size", "32"]
    rc, _, err = _run(capsys, *base, "--resume", "--test-subset", "50", "--data-dir", resumable["data"],
                      "--device", "cpu", "--out", out, *args)
    _one_error_line(rc, err, *words)
    assert file_hash(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


# -- data: a decompression bomb, subsets larger than the split ----------------------------------------


def _png_header(w: int, h: int) -> bytes:
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [30000, 10000])
def test_a_png_claiming_a_huge_size_is_one_line(capsys, shared_data, tmp_path, monkeypatch, size):
    import shutil

    data = tmp_path / "data"
    for split in ("train", "test"):
        for c in sorted(p.name for p in (shared_data / split).iterdir())[:10]:
            (data / split / c).mkdir(parents=True)
            first = sorted((shared_data / split / c).glob("*.png"))[0]
            shutil.copy(first, data / split / c / first.name)
    bomb = data / "train" / sorted(p.name for p in (data / "train").iterdir())[3] / "bomb.png"
    bomb.write_bytes(_png_header(size, size))
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, "train-ann", "--arch", "tiny", "--data-dir", data, "--device", "cpu",
                      "--out", tmp_path / "a.pt")
    _one_error_line(rc, err, str(bomb), f"claims {size * size} pixels")
    assert not (tmp_path / "a.pt").exists()


def test_a_subset_larger_than_the_split_is_said_once(capsys, ckpts, work):
    rc, out, err = _run(capsys, "attack", "--source", "ann", "--source-ckpt", ckpts["ann"], "--attack", "fgsm",
                        "--test-subset", "5000", "--data-dir", ckpts["data"], "--device", "cpu", "--quiet",
                        "--out", work / "a.json")
    assert rc == 0, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "5000" in lines[0] and "1000" in lines[0], err


# -- the last-resort handler and Ctrl-C (real processes) --------------------------------------------------

BOOM = """
import sys
import snnadv.train
def boom(cfg, *a, **k):
    raise RuntimeError("something nobody expected\\nsecond line")
snnadv.train.train_ann = boom
from snnadv.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_error_is_one_line_and_a_saved_traceback(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", BOOM, "train-ann", "--arch", "tiny"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    line = _one_error_line(proc.returncode, proc.stderr, "RuntimeError", "something nobody expected", code=1)
    saved = Path(line.split("traceback is in ")[1].rstrip(")"))
    assert saved.parent == tmp_path and "Traceback" in saved.read_text() and "boom" in saved.read_text()


def test_ctrl_c_says_which_epoch_is_saved_where(shared_data, tmp_path):
    out = tmp_path / "ann.pt"
    cmd = [sys.executable, "-c", "import sys; from snnadv.cli.main import main; sys.exit(main())", "train-ann",
           "--arch", "tiny", "--epochs", "400", "--train-subset", "64", "--test-subset", "10",
           "--data-dir", str(shared_data), "--device", "cpu", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (a background
    # test run may have inherited SIG_IGN, which the child would keep)
    deadline = time.time() + 240
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert out.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    epoch = load_checkpoint(out)["train_state"]["epoch"]
    assert err.strip() == f"interrupted; epoch {epoch} of 400 is saved in {out}, continue with --resume"
