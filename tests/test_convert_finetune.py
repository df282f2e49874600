"""ANN -> SNN conversion by threshold balancing (SNN-conv) and hybrid SNN-BP
fine-tuning (paper Sec. 2.2, 3.2).

The conversion claim is checked on the session's VGG5; everything else (fine-tuning,
round trips, errors) on a tiny network trained here in seconds: SNN-BP on VGG5
costs minutes per epoch on a CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

import snnadv
from snnadv.checkpoint import file_hash, load_checkpoint
from snnadv.config import resolve
from snnadv.conversion import TopK, balance_thresholds, spiking_layers
from snnadv.convert import convert
from snnadv.data import load_dataset
from snnadv.errors import CheckpointError, SnnadvError
from snnadv.evaluation import accuracy
from snnadv.models import SNN, get_spec
from snnadv.train import finetune


#: a small pipeline for what does not need VGG5 (seconds on a CPU)
TINY_ANN = dict(arch="tiny", epochs=3, lr=0.02, milestones=[], batch_size=32, test_subset=500, seed=0,
                device="cpu", quiet=True)
TINY_CONVERT = dict(timesteps=32, percentile=99.9, batches=1, batch_size=64, test_subset=200, curve=[4, 8, 16],
                    seed=0, device="cpu", quiet=True)
#: SNN-BP at a very short T, where conversion alone loses accuracy (the paper's point:
#: hybrid training needs far fewer timesteps); 1 epoch on all 5000 training images
FINETUNE_SETTINGS = dict(timesteps=4, epochs=1, lr=3e-3, batch_size=32, test_subset=1000, leak=0.99, seed=0,
                         device="cpu", quiet=True)


@pytest.fixture(scope="module")
def tiny_converted(shared_data, tmp_path_factory):
    """A tiny ANN trained on cifar10-mini and converted: ``{"ann", "path", "result"}``."""
    from snnadv.train import train_ann

    folder = tmp_path_factory.mktemp("tiny")
    ann = folder / "ann.pt"
    train_ann(resolve("train-ann", flags=dict(TINY_ANN, data_dir=str(shared_data), out=str(ann))))
    out = folder / "conv.pt"
    result = convert(resolve("convert", flags=dict(TINY_CONVERT, checkpoint=str(ann), data_dir=str(shared_data),
                                                   out=str(out))))
    return {"ann": ann, "path": out, "result": result}


# -- conversion of the session VGG5 --------------------------------------------------------------


def test_conversion_approaches_the_ann(converted_snn):
    m = converted_snn["result"]["metrics"]
    curve = {int(t): acc for t, acc in m["curve"].items()}
    cfg = converted_snn["cfg"]
    T = cfg["timesteps"]
    print(f"\nSNN-conv VGG5 curve {curve}; ANN on the same {cfg['test_subset']} images: "
          f"{m['ann_test_acc']:.1f}%")
    assert sorted(curve) == sorted(set(cfg["curve"]) | {T})
    assert m["test_acc"] == curve[T]
    assert m["ann_test_acc"] > 25.0
    # the converted network tracks the ANN once T is long enough ...
    assert curve[T] >= m["ann_test_acc"] - 6.0
    # ... and gets there as T grows (the rate code needs time)
    assert curve[T] > curve[min(curve)]


def test_converted_thresholds_and_checkpoint(converted_snn, trained_ann):
    path = converted_snn["path"]
    ckpt = load_checkpoint(path, "snn-conv")
    thr = ckpt["model"]["thresholds"]
    assert list(thr) == get_spec("vgg5", 10).activations
    assert all(v > 0 and math.isfinite(v) for v in thr.values())
    assert len(set(thr.values())) == len(thr)  # balanced per layer, not left at 1.0
    assert ckpt["model"]["leak"] == 1.0 and ckpt["model"]["reset"] == "subtract"
    assert ckpt["model"]["finetune_scale"] == pytest.approx(0.7)
    assert ckpt["metrics"]["thresholds"] == thr
    assert ckpt["train_state"] is None  # conversion does not train
    # the weights are the ANN's, unchanged
    ann = load_checkpoint(trained_ann["path"])
    for k, v in ann["state_dict"].items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert ckpt["parent"] == {"path": str(trained_ann["path"]), "sha256": file_hash(trained_ann["path"])}
    js = json.loads(path.with_suffix(".json").read_text())
    assert js["sha256"] == file_hash(path) and js["stage"] == "snn-conv"
    assert js["metrics"]["curve"] == converted_snn["result"]["metrics"]["curve"]


def test_load_model_reproduces_the_conversion_accuracy(tiny_converted, shared_data):
    """The saved SNN, reloaded, gives the recorded accuracy at T (same encoder seed)."""
    model = snnadv.load_model(tiny_converted["path"])
    assert isinstance(model, SNN) and model.kind == "snn-conv" and not model.training
    T = TINY_CONVERT["timesteps"]
    assert model.num_steps == T and model.leak == 1.0
    assert model.thresholds() == pytest.approx(tiny_converted["result"]["metrics"]["thresholds"])
    _, test = load_dataset("cifar10", shared_data, "cpu", None, TINY_CONVERT["test_subset"])
    acc = accuracy(model, test, TINY_CONVERT["batch_size"], seed=TINY_CONVERT["seed"])["mean"]
    assert acc == pytest.approx(tiny_converted["result"]["metrics"]["test_acc"], abs=1e-9)
    # the tiny conversion works too: at T the SNN is close to its ANN, better than at T=4
    m = tiny_converted["result"]["metrics"]
    assert m["test_acc"] >= m["ann_test_acc"] - 6.0 and m["test_acc"] > m["curve"]["4"]
    # overrides: a different T for the same checkpoint
    assert snnadv.load_model(tiny_converted["path"], num_steps=8).num_steps == 8


# -- threshold balancing, exactly ----------------------------------------------------------------


@pytest.mark.parametrize("percentile", [100.0, 99.9, 97.0, 50.0])
def test_topk_is_the_exact_percentile(percentile):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=g) * s for n, s in [(1000, 1.0), (3, 5.0), (2500, 0.5), (700, 2.0),
                                                            (1, 9.0), (2000, 0.1)]]
    chunks.append(torch.full((50,), float(torch.cat(chunks).sort().values[-40])))  # ties
    values = torch.cat(chunks)
    top = TopK(percentile, values.numel())
    for c in chunks:
        top.add(c.reshape(-1, 1))
    k = math.ceil((1 - percentile / 100) * values.numel()) or 1
    expected = values.sort(descending=True).values[k - 1]
    assert top.value() == float(expected)
    if percentile == 100.0:
        assert top.value() == float(values.max())
    # the order statistic between torch.quantile's neighbours
    q = torch.tensor(percentile / 100, dtype=torch.float64)
    lo = torch.quantile(values.double(), q, interpolation="lower")
    hi = torch.quantile(values.double(), q, interpolation="higher")
    assert float(lo) <= top.value() <= float(hi)


def _tiny_snn(seed=0):
    torch.manual_seed(seed)
    return SNN(get_spec("tiny", 10), num_steps=6, leak=1.0).eval()


def test_balancing_sets_each_threshold_to_its_input_current():
    """Layer 1: the max of conv1(input spikes) over T, neurons and images; layer 2: the
    max of its input current with layer 1 already balanced (paper Sec. 2.2)."""
    snn = _tiny_snn()
    images = [torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    T = 6
    thr = balance_thresholds(snn, images, T, 100.0, generator=torch.Generator().manual_seed(5))
    assert list(thr) == ["act1", "act2", "act3"]
    # replay: batch i is encoded with seed s + i (s drawn once from the generator), the
    # same frames for every layer balanced
    base = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    ref = _tiny_snn()
    with torch.no_grad():
        ref.encoder.generator = torch.Generator().manual_seed(base)
        frames1 = ref.encoder(images[0], T)
        cur1 = ref.conv1(frames1.flatten(0, 1))
        assert thr["act1"] == pytest.approx(float(cur1.max()), rel=1e-6)
        ref.encoder.generator = torch.Generator().manual_seed(base)
        frames2 = ref.encoder(images[0], T)
        assert torch.equal(frames1, frames2)
        ref.set_thresholds({"act1": thr["act1"]})
        spk1 = ref.act1.multistep(ref.conv1(frames2.flatten(0, 1)).unflatten(0, (T, 3)))
        cur2 = ref.conv2(ref.pool1(spk1.flatten(0, 1)))
        assert thr["act2"] == pytest.approx(float(cur2.max()), rel=1e-6)
    assert thr["act1"] != thr["act2"]
    assert snn.thresholds() == thr
    assert all(not n._current_hooks for n in snn.neurons)
    assert snn.encoder.generator is None


def test_balancing_with_a_percentile_is_lower_than_the_max():
    images = [torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))]
    full = balance_thresholds(_tiny_snn(), images, 6, 100.0, generator=torch.Generator().manual_seed(5))
    p99 = balance_thresholds(_tiny_snn(), images, 6, 99.0, generator=torch.Generator().manual_seed(5))
    assert p99["act1"] < full["act1"]


def test_balance_stem_leaves_residual_blocks_at_one():
    torch.manual_seed(0)
    spec = get_spec("resnet20", 10)
    snn = SNN(spec, num_steps=4, leak=1.0).eval()
    layers = spiking_layers(spec, "stem", snn.neuron_names)
    assert layers == ["act1", "act2"]
    assert spiking_layers(spec, "all", snn.neuron_names) == snn.neuron_names
    images = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))]
    thr = balance_thresholds(snn, images, 4, 99.9, layers, generator=torch.Generator().manual_seed(0))
    assert thr["act1"] > 0 and thr["act2"] > 0 and thr["act1"] != 1.0 and thr["act2"] != 1.0
    blocks = {k: v for k, v in thr.items() if k not in ("act1", "act2")}
    assert len(blocks) == 18 and set(blocks.values()) == {1.0}
    with pytest.raises(SnnadvError):
        spiking_layers(spec, "blocks", snn.neuron_names)


# -- fine-tuning -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tiny_converted, shared_data, tmp_path_factory, observed):
    out = tmp_path_factory.mktemp("bp") / "snn-bp.pt"
    cfg = resolve("finetune", flags=dict(FINETUNE_SETTINGS, checkpoint=str(tiny_converted["path"]),
                                         data_dir=str(shared_data), out=str(out)))
    result = finetune(cfg)
    m = result["metrics"]
    conv = tiny_converted["result"]["metrics"]
    observed(f"SNN-BP tiny (T={FINETUNE_SETTINGS['timesteps']}, leak {FINETUNE_SETTINGS['leak']}, 1 epoch on 5000 "
             f"images, Adam lr {FINETUNE_SETTINGS['lr']}): test accuracy {m['test_acc_before']:.1f}% before -> "
             f"{m['test_acc']:.1f}% after ({FINETUNE_SETTINGS['test_subset']} test images); its SNN-conv curve "
             f"{conv['curve']}, ANN {conv['ann_test_acc']:.1f}% ({TINY_CONVERT['test_subset']} images)")
    return {"path": out, "result": result, "cfg": cfg}


def test_finetuning_improves_accuracy_at_short_T(finetuned):
    m = finetuned["result"]["metrics"]
    print(f"\nSNN-BP tiny T={FINETUNE_SETTINGS['timesteps']}: {m['test_acc_before']:.1f}% before, "
          f"{m['test_acc']:.1f}% after fine-tuning")
    assert m["test_acc"] > m["test_acc_before"] + 4.0
    assert m["test_acc"] > 25.0
    assert m["epochs"] == 1 and len(m["history"]) == 1


def test_finetuned_checkpoint(finetuned, tiny_converted, shared_data):
    path = finetuned["path"]
    ckpt = load_checkpoint(path, "snn-bp")
    parent = load_checkpoint(tiny_converted["path"])
    assert ckpt["parent"]["sha256"] == file_hash(tiny_converted["path"])
    assert ckpt["model"]["leak"] == pytest.approx(FINETUNE_SETTINGS["leak"])
    assert ckpt["model"]["num_steps"] == FINETUNE_SETTINGS["timesteps"]
    # thresholds: the converted ones times the stored scale (0.7), then fixed
    assert ckpt["model"]["surrogate"]["name"] == "stdb"
    for k, v in parent["model"]["thresholds"].items():
        assert ckpt["model"]["thresholds"][k] == pytest.approx(0.7 * v, rel=1e-6)
    # the weights moved
    assert not torch.equal(ckpt["state_dict"]["conv1.weight"], parent["state_dict"]["conv1.weight"])
    assert ckpt["metrics"]["test_acc_before"] == finetuned["result"]["metrics"]["test_acc_before"]
    model = snnadv.load_model(path)
    assert isinstance(model, SNN) and model.kind == "snn-bp" and model.leak == pytest.approx(0.99)
    _, test = load_dataset("cifar10", shared_data, "cpu", None, FINETUNE_SETTINGS["test_subset"])
    acc = accuracy(model, test, FINETUNE_SETTINGS["batch_size"], seed=FINETUNE_SETTINGS["seed"])["mean"]
    assert acc == pytest.approx(finetuned["result"]["metrics"]["test_acc"], abs=1e-9)


# -- errors ------------------------------------------------------------------------------------------


def _convert_cfg(shared_data, tmp_path, checkpoint, **kw):
    return resolve("convert", flags={**TINY_CONVERT, "data_dir": str(shared_data),
                                     "out": str(tmp_path / "c.pt"), "checkpoint": str(checkpoint), **kw})


def _finetune_cfg(shared_data, tmp_path, checkpoint, **kw):
    return resolve("finetune", flags={**FINETUNE_SETTINGS, "train_subset": 64, "data_dir": str(shared_data),
                                      "out": str(tmp_path / "f.pt"), "checkpoint": str(checkpoint), **kw})


def test_finetune_refuses_an_ann_checkpoint(tiny_converted, shared_data, tmp_path):
    with pytest.raises(CheckpointError) as e:
        finetune(_finetune_cfg(shared_data, tmp_path, tiny_converted["ann"]))
    assert "ann" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "f.pt").exists()


def test_convert_refuses_an_snn_checkpoint(tiny_converted, shared_data, tmp_path):
    with pytest.raises(CheckpointError) as e:
        convert(_convert_cfg(shared_data, tmp_path, tiny_converted["path"]))
    assert "snn-conv" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c.pt").exists()


def test_missing_checkpoints_are_errors(shared_data, tmp_path):
    with pytest.raises(SnnadvError, match="checkpoint"):
        convert(resolve("convert", flags={"data_dir": str(shared_data)}))
    with pytest.raises(SnnadvError, match="checkpoint"):
        finetune(resolve("finetune", flags={"data_dir": str(shared_data)}))
    with pytest.raises(CheckpointError):
        convert(_convert_cfg(shared_data, tmp_path, tmp_path / "nope.pt"))


@pytest.mark.parametrize("leak", [0.0, -0.5, 1.5])
def test_finetune_leak_outside_0_1_is_an_error(tiny_converted, shared_data, tmp_path, leak):
    with pytest.raises(SnnadvError, match="leak"):
        finetune(_finetune_cfg(shared_data, tmp_path, tiny_converted["path"], leak=leak))


@pytest.mark.parametrize("percentile", [0.0, -1.0, 150.0, 100.0001])
def test_convert_percentile_outside_0_100_is_an_error(tiny_converted, shared_data, tmp_path, percentile):
    with pytest.raises(SnnadvError, match="percentile"):
        convert(_convert_cfg(shared_data, tmp_path, tiny_converted["ann"], percentile=percentile))


@pytest.mark.parametrize("key,value", [("timesteps", 0), ("timesteps", -4), ("batches", 0), ("scale", 0.0)])
def test_convert_non_positive_settings_are_errors(tiny_converted, shared_data, tmp_path, key, value):
    with pytest.raises(SnnadvError):
        convert(_convert_cfg(shared_data, tmp_path, tiny_converted["ann"], **{key: value}))
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("key,value", [("timesteps", 0), ("timesteps", -1), ("epochs", 0), ("lr", 0.0),
                                       ("alpha", 0.0)])
def test_finetune_non_positive_settings_are_errors(tiny_converted, shared_data, tmp_path, key, value):
    with pytest.raises(SnnadvError):
        finetune(_finetune_cfg(shared_data, tmp_path, tiny_converted["path"], **{key: value}))
    assert not (tmp_path / "f.pt").exists()


def test_convert_unknown_balance_mode_is_an_error(tiny_converted, shared_data, tmp_path):
    with pytest.raises(SnnadvError, match="balance"):
        convert(_convert_cfg(shared_data, tmp_path, tiny_converted["ann"], balance="middle", timesteps=2,
                             batch_size=4, test_subset=4))
