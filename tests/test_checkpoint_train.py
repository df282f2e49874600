"""ANN training (paper Sec. 3.2) and the checkpoint format: accuracy on real data,
exact round trips, resume = uninterrupted, NaN handling, seeds, one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import snnadv
import snnadv.train
from snnadv.checkpoint import file_hash, load_checkpoint, save_checkpoint
from snnadv.config import resolve
from snnadv.data import load_dataset
from snnadv.errors import CheckpointError, SnnadvError, TrainingError
from snnadv.evaluation import accuracy
from snnadv.models import ANN, ArchSpec, get_spec
from snnadv.models.spec import tiny
from snnadv.train import train_ann
from snnadv.training import lsuv_init

#: a tiny, fast training run (seconds on a CPU)
TINY = dict(arch="tiny", epochs=1, lr=0.05, batch_size=64, train_subset=640, test_subset=100, seed=0,
            device="cpu", quiet=True)


def _tiny_cfg(shared_data, out, **kw):
    return resolve("train-ann", flags={**TINY, "data_dir": str(shared_data), "out": str(out), **kw})


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- the session ANN (VGG5 on cifar10-mini) ----------------------------------------------------


def test_vgg5_ann_learns_far_above_chance(trained_ann):
    m = trained_ann["result"]["metrics"]
    print(f"\nANN VGG5 test accuracy: {m['test_acc']:.2f}% (history {[h['test_acc'] for h in m['history']]})")
    assert m["epochs"] == trained_ann["cfg"]["epochs"] == len(m["history"])
    assert m["test_acc"] > 25.0  # chance is 10%
    assert m["history"][-1]["loss"] < m["history"][0]["loss"]


def test_result_json_beside_the_checkpoint(trained_ann):
    path = trained_ann["path"]
    js = json.loads(path.with_suffix(".json").read_text())
    assert js["stage"] == "ann"
    assert js["sha256"] == file_hash(path)
    assert js["config"]["arch"] == "vgg5" and js["config"]["epochs"] == trained_ann["cfg"]["epochs"]
    assert js["metrics"]["test_acc"] == trained_ann["result"]["metrics"]["test_acc"]


def test_checkpoint_loads_with_weights_only(trained_ann):
    ckpt = torch.load(trained_ann["path"], map_location="cpu", weights_only=True)
    assert ckpt["format"] == "snnadv-checkpoint" and ckpt["stage"] == "ann"
    assert ckpt["dataset"] == "cifar10"
    assert ArchSpec.from_dict(ckpt["spec"]) == get_spec("vgg5", 10)
    assert {"snnadv", "torch", "snntorch"} <= set(ckpt["versions"])
    assert ckpt["metrics"]["test_acc"] == trained_ann["result"]["metrics"]["test_acc"]
    assert not [k for k in ckpt["state_dict"] if k.endswith("bias")]


def test_load_model_round_trip(trained_ann, shared_data):
    """``snnadv.load_model`` rebuilds the network exactly: same outputs as the saved
    weights in a fresh ANN, and the same test accuracy as recorded during training."""
    model = snnadv.load_model(trained_ann["path"])
    assert isinstance(model, ANN) and not model.training and model.kind == "ann"
    ckpt = torch.load(trained_ann["path"], map_location="cpu", weights_only=True)
    fresh = ANN(get_spec("vgg5", 10))
    fresh.load_state_dict(ckpt["state_dict"])
    fresh.eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    _, test = load_dataset("cifar10", shared_data, "cpu", None, trained_ann["cfg"]["test_subset"])
    acc = accuracy(model, test, 256)["mean"]
    assert acc == pytest.approx(trained_ann["result"]["metrics"]["test_acc"], abs=1e-9)


def test_finished_checkpoint_keeps_its_train_state(trained_ann):
    """Kept after the last epoch, so that a finished run can be extended with --resume."""
    ckpt = torch.load(trained_ann["path"], map_location="cpu", weights_only=True)
    state = ckpt["train_state"]
    assert state["epoch"] == trained_ann["cfg"]["epochs"] == len(state["history"])
    assert {"optimizer", "scheduler", "rng"} <= set(state)


def test_loading_the_wrong_stage_is_an_error(trained_ann):
    assert load_checkpoint(trained_ann["path"], "ann")["stage"] == "ann"
    assert load_checkpoint(trained_ann["path"], ("ann", "snn-bp"))["stage"] == "ann"
    for stage in ("snn-conv", ("snn-conv", "snn-bp")):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(trained_ann["path"], stage)
        assert "ann" in str(e.value) and "\n" not in str(e.value)


# -- corrupt and foreign files ------------------------------------------------------------------


def _one_line_checkpoint_error(path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg and "\n" not in msg and str(path) in msg
    with pytest.raises(CheckpointError):
        snnadv.load_model(path)
    return msg


def test_corrupt_checkpoints_are_one_line_errors(trained_ann, tmp_path):
    data = trained_ann["path"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    _one_line_checkpoint_error(truncated)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    _one_line_checkpoint_error(noise)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _one_line_checkpoint_error(empty)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint\nsecond line\n")
    _one_line_checkpoint_error(text)
    assert "does not exist" in _one_line_checkpoint_error(tmp_path / "missing.pt")


def test_foreign_torch_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    assert "not an snnadv checkpoint" in _one_line_checkpoint_error(plain)
    # a pickle that would run code is refused by weights_only, never executed
    evil = tmp_path / "evil.pt"
    torch.save({"format": "snnadv-checkpoint", "obj": _Evil()}, evil)
    _one_line_checkpoint_error(evil)
    assert not (tmp_path / "pwned").exists()
    newer = tmp_path / "newer.pt"
    torch.save({"format": "snnadv-checkpoint", "format_version": 99, "stage": "ann"}, newer)
    assert "newer" in _one_line_checkpoint_error(newer)


class _Evil:
    def __reduce__(self):
        return (os.mkdir, ("/nonexistent-snnadv-test-dir/pwned",))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    save_checkpoint(path, {"stage": "ann", "dataset": "cifar10", "spec": tiny().to_dict(),
                           "state_dict": {"w": torch.ones(3)}})
    assert load_checkpoint(path)["state_dict"]["w"].sum() == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.pt"]


# -- training runs on tiny ----------------------------------------------------------------------


#: the fast CPU recipe's settings (configs/vgg5_cifar10_cpu.toml), on tiny
CPU_RECIPE = dict(nesterov=True, schedule="linear", warmup=0.5, init="lsuv", channels_last=True,
                  label_smoothing=0.1)


@pytest.mark.parametrize("recipe", [{}, CPU_RECIPE], ids=["paper", "cpu-recipe"])
def test_resume_after_interruption_equals_uninterrupted(shared_data, tmp_path, monkeypatch, recipe):
    straight = tmp_path / "straight.pt"
    r_straight = train_ann(_tiny_cfg(shared_data, straight, epochs=3, **recipe))

    # the same run, interrupted (Ctrl-C) right after epoch 2's checkpoint was written
    real_save, saves = snnadv.train.save_checkpoint, []

    def save_then_interrupt(path, ckpt):
        real_save(path, ckpt)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt

    broken = tmp_path / "broken.pt"
    monkeypatch.setattr(snnadv.train, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_ann(_tiny_cfg(shared_data, broken, epochs=3, **recipe))
    monkeypatch.setattr(snnadv.train, "save_checkpoint", real_save)
    assert load_checkpoint(broken)["train_state"]["epoch"] == 2

    r_resumed = train_ann(_tiny_cfg(shared_data, broken, epochs=3, resume=True, **recipe))
    _assert_same_weights(_weights(straight), _weights(broken))
    strip = lambda h: [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in h]
    assert strip(r_resumed["metrics"]["history"]) == strip(r_straight["metrics"]["history"])
    assert r_resumed["metrics"]["epochs"] == 3


@pytest.mark.parametrize("epoch", [1, 2])
def test_resume_mid_epoch_equals_uninterrupted(shared_data, tmp_path, monkeypatch, epoch):
    """Ctrl-C at batch 4 of an epoch, after the mid-epoch state of batch 3 was saved
    (``save_every`` tiny: every batch): --resume continues from that batch (in epoch 1
    there is no checkpoint yet, only the partial state) and ends with the uninterrupted
    run's weights and history; the partial file is gone once the epoch is saved."""
    straight = tmp_path / "straight.pt"
    r_straight = train_ann(_tiny_cfg(shared_data, straight, epochs=2, milestones=[1]))
    steps = 640 // 64
    real_ce, calls = torch.nn.functional.cross_entropy, [0]

    def ce_then_interrupt(*a, **k):
        calls[0] += 1
        if calls[0] == (epoch - 1) * steps + 4:
            raise KeyboardInterrupt
        return real_ce(*a, **k)

    broken = tmp_path / "broken.pt"
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_ann(_tiny_cfg(shared_data, broken, epochs=2, milestones=[1], save_every=1e-9))
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real_ce)
    part = snnadv.train.partial_path(broken)
    state = load_checkpoint(part)["train_state"]
    assert (state["epoch"], state["batch"]) == (epoch - 1, 3)
    assert broken.exists() == (epoch == 2)
    # without --resume the interrupted run is not silently replaced
    with pytest.raises(SnnadvError, match="partial" if epoch == 1 else "broken.pt exists"):
        train_ann(_tiny_cfg(shared_data, broken, epochs=2, milestones=[1]))
    r_resumed = train_ann(_tiny_cfg(shared_data, broken, epochs=2, milestones=[1], resume=True, save_every=1e-9))
    assert not part.exists()
    _assert_same_weights(_weights(straight), _weights(broken))
    strip = lambda h: [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in h]  # noqa: E731
    assert strip(r_resumed["metrics"]["history"]) == strip(r_straight["metrics"]["history"])


def test_resume_two_then_three_epochs_equals_three(shared_data, tmp_path):
    """2 epochs, then --resume with epochs=3 = 3 epochs straight (same lr schedule)."""
    straight, resumed = tmp_path / "a.pt", tmp_path / "b.pt"
    train_ann(_tiny_cfg(shared_data, straight, epochs=3, milestones=[2]))
    train_ann(_tiny_cfg(shared_data, resumed, epochs=2, milestones=[2]))
    first = _weights(resumed)
    train_ann(_tiny_cfg(shared_data, resumed, epochs=3, milestones=[2], resume=True))
    _assert_same_weights(_weights(straight), _weights(resumed))
    assert not torch.equal(first["classifier.weight"], _weights(resumed)["classifier.weight"])


def test_same_seed_same_weights_other_seed_other_weights(shared_data, tmp_path):
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    train_ann(_tiny_cfg(shared_data, a))
    train_ann(_tiny_cfg(shared_data, b))
    train_ann(_tiny_cfg(shared_data, c, seed=1))
    _assert_same_weights(_weights(a), _weights(b))
    assert not torch.equal(_weights(a)["conv1.weight"], _weights(c)["conv1.weight"])


def test_nan_loss_stops_with_one_line_and_keeps_the_good_checkpoint(shared_data, tmp_path):
    out = tmp_path / "ann.pt"
    train_ann(_tiny_cfg(shared_data, out))
    before = file_hash(out), out.with_suffix(".json").read_bytes()
    with pytest.raises(TrainingError) as e:
        train_ann(_tiny_cfg(shared_data, out, lr=1e6, overwrite=True))
    msg = str(e.value)
    assert "nan" in msg.lower() and "\n" not in msg
    assert (file_hash(out), out.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.json", "ann.pt"]


def test_resume_errors(shared_data, tmp_path):
    out = tmp_path / "ann.pt"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_ann(_tiny_cfg(shared_data, out, resume=True))
    train_ann(_tiny_cfg(shared_data, out))
    # a checkpoint of another architecture at --out
    with pytest.raises(CheckpointError) as e:
        train_ann(_tiny_cfg(shared_data, out, arch="resnet20", resume=True))
    assert "tiny" in str(e.value) and "\n" not in str(e.value)


def test_unknown_arch_and_dataset_are_errors(shared_data, tmp_path):
    with pytest.raises(SnnadvError, match="vgg99"):
        train_ann(_tiny_cfg(shared_data, tmp_path / "a.pt", arch="vgg99"))
    with pytest.raises(SnnadvError, match="mnist"):
        train_ann(_tiny_cfg(shared_data, tmp_path / "a.pt", dataset="mnist"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("key,value", [("batch_size", -1), ("batch_size", 0), ("epochs", -2), ("lr", -0.1)])
def test_non_positive_settings_are_errors(shared_data, tmp_path, key, value):
    with pytest.raises(SnnadvError):
        train_ann(_tiny_cfg(shared_data, tmp_path / "a.pt", **{key: value}))


@pytest.mark.parametrize("key", ["epochs", "lr"])
def test_zero_epochs_or_lr_is_an_error(shared_data, tmp_path, monkeypatch, key):
    def no_training(*a, **k):
        raise AssertionError(f"training started with {key}=0")

    monkeypatch.setattr(snnadv.train, "fit", no_training)
    with pytest.raises(SnnadvError):
        train_ann(_tiny_cfg(shared_data, tmp_path / "a.pt", **{key: 0}))


def test_short_run_trains_its_first_epoch_at_the_given_lr(shared_data, tmp_path):
    r = train_ann(_tiny_cfg(shared_data, tmp_path / "a.pt", arch="vgg5", epochs=1, train_subset=64,
                            test_subset=10))
    assert r["metrics"]["history"][0]["lr"] == pytest.approx(0.05)


def test_linear_schedule_warms_up_then_decays_to_zero_batch_by_batch(shared_data, tmp_path):
    """warmup = 1 of 2 epochs: the lr climbs to its peak over epoch 1 (read at its end)
    and falls linearly to 0 over epoch 2; the paper's step schedule would keep it at 0.05."""
    r = train_ann(_tiny_cfg(shared_data, tmp_path / "a.pt", epochs=2, schedule="linear", warmup=1))
    assert [row["lr"] for row in r["metrics"]["history"]] == pytest.approx([0.05, 0.0])


def test_lsuv_init_gives_every_layer_unit_output_std():
    model = ANN(get_spec("tiny", 10))
    images = torch.rand(64, 3, 32, 32)
    lsuv_init(model, images)
    assert model.training  # returned to its mode
    stds = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: stds.append(float(out.std())))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()
    assert len(stds) == 4 and stds == pytest.approx([1.0] * 4, abs=0.02)


def test_recipe_settings_at_their_defaults_keep_the_keys_of_earlier_runs():
    """reproduce keys a stage by its settings: paper-recipe runs made before these
    settings existed must keep their keys (and not be recomputed)."""
    from snnadv.config import keyed

    recipe = {"optimizer", "nesterov", "schedule", "warmup", "label_smoothing", "init", "channels_last"}
    assert recipe <= set(resolve("train-ann"))
    assert not recipe & set(keyed(resolve("train-ann")))
    assert "init" in keyed(resolve("train-ann", flags={"init": "lsuv"}))


@pytest.mark.parametrize("kw", [dict(optimizer="lamb"), dict(schedule="exp"), dict(init="xavier"),
                                dict(schedule="linear", warmup=1), dict(warmup=0.5),
                                dict(optimizer="adamw", nesterov=True), dict(label_smoothing=1.0)])
def test_bad_recipe_settings_are_one_line_errors(shared_data, tmp_path, kw):
    with pytest.raises(SnnadvError) as e:
        train_ann(_tiny_cfg(shared_data, tmp_path / "a.pt", **kw))
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_deferred_loss_reads_change_nothing_and_still_stop_on_nan(shared_data, tmp_path, monkeypatch):
    """On a GPU the loss is read back every few batches (no host sync per step): the
    history is the same as reading every batch, and a NaN still stops training before
    the epoch's checkpoint, naming the batches it happened in."""
    import snnadv.training

    every = tmp_path / "every.pt"
    train_ann(_tiny_cfg(shared_data, every))
    monkeypatch.setattr(snnadv.training, "SYNC_EVERY", {"cpu": 3, "cuda": 3})
    deferred = tmp_path / "deferred.pt"
    train_ann(_tiny_cfg(shared_data, deferred))
    h1 = json.loads(every.with_suffix(".json").read_text())["metrics"]["history"]
    h2 = json.loads(deferred.with_suffix(".json").read_text())["metrics"]["history"]
    for a, b in zip(h1, h2):
        assert (a["loss"], a["train_acc"], a["test_acc"]) == (b["loss"], b["train_acc"], b["test_acc"])
    before = file_hash(deferred)
    with pytest.raises(TrainingError) as e:
        train_ann(_tiny_cfg(shared_data, deferred, lr=1e6, overwrite=True))
    msg = str(e.value)
    assert "not finite" in msg and "batch" in msg and "\n" not in msg
    assert file_hash(deferred) == before


def test_lr_restarts_start_new_cycles_and_resume_keeps_the_past_schedule(shared_data, tmp_path):
    """Linear schedule, warm-up 1 epoch, restarts at epochs 2 and 3 (peak x0.5 each), 10
    steps per epoch: the factor by hand; then --resume may add a restart where the first
    run ended, but not lengthen its decay (that would change the lr of the epochs done)."""
    from snnadv.train import check_same_schedule
    from snnadv.training import AnnRecipe, lr_factor

    recipe = AnnRecipe(epochs=4, lr=1e-3, schedule="linear", warmup=1.0, lr_restarts=(2, 3), lr_restart_peak=0.5)
    f = lr_factor(recipe, 10)
    assert [round(f(s), 6) for s in (0, 9, 10, 15, 19)] == [0.1, 1.0, 1.0, 0.5, 0.1]  # warm-up, then decay to 0
    assert [round(f(s), 6) for s in (20, 25, 29, 30, 35, 40)] == [0.5, 0.25, 0.05, 0.25, 0.125, 0.0]
    first = {"epochs": 2, "warmup": 1.0, "schedule": "linear"}  # a finished 2-epoch run
    check_same_schedule(tmp_path / "a.pt", first, recipe, done=2, steps_per_epoch=10)  # a restart at 2: same past
    longer = AnnRecipe(epochs=4, lr=1e-3, schedule="linear", warmup=1.0)
    with pytest.raises(CheckpointError, match=r"lr_restarts = \[2\]"):
        check_same_schedule(tmp_path / "a.pt", first, longer, done=2, steps_per_epoch=10)
    # restarts are checked against the run: increasing, after the warm-up, before the end
    for bad in ([3, 2], [1], [4]):
        with pytest.raises(SnnadvError, match="lr_restarts"):
            train_ann(_tiny_cfg(shared_data, tmp_path / "b.pt", epochs=4, schedule="linear", warmup=1,
                                lr_restarts=bad, milestones=None))
