"""Attacks (Eq. 1, 2), gradient sources (Algorithm 1, BPTT), attack CLI and tables."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from snnadv.attacks import FGSM, PGD, check_eps, make_attack, parse_eps
from snnadv.data import load_split, to_float
from snnadv.errors import SnnadvError
from snnadv.gradients import EOT, Algorithm1, Autograd, make_gradient
from snnadv.models import SNN, get_spec

EPS = 8 / 255


@pytest.fixture(scope="module")
def ann_and_data(trained_ann, shared_data):
    import snnadv

    model = snnadv.load_model(trained_ann["path"])
    test = load_split("cifar10", shared_data, train=False, subset=128)
    return model, to_float(test.images), test.labels


def small_snn(seed=0, T=6):
    """A tiny SNN with random weights and low thresholds, so that every layer spikes."""
    torch.manual_seed(seed)
    snn = SNN(get_spec("tiny", 10), num_steps=T, leak=0.95)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    return snn.eval()


def test_bounds_exact(ann_and_data):
    model, x, y = ann_and_data
    for attack in (FGSM(model, EPS), PGD(model, EPS, 2 / 255, 5, random_start=True,
                                         generator=torch.Generator().manual_seed(0))):
        adv = attack(x, y)
        assert adv.shape == x.shape
        assert (adv - x).abs().max() <= EPS + 1e-6
        assert adv.min() >= 0.0 and adv.max() <= 1.0
        assert (adv - x).abs().max() > EPS * 0.99  # the budget is actually used


def test_attacks_raise_loss_pgd_at_least_fgsm(ann_and_data):
    model, x, y = ann_and_data
    loss = lambda z: F.cross_entropy(model(z), y).item()
    clean, fgsm, pgd = loss(x), loss(FGSM(model, EPS)(x, y)), loss(PGD(model, EPS, 2 / 255, 7)(x, y))
    assert fgsm > clean
    assert pgd >= fgsm


@torch.no_grad()
def _acc(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item() * 100


def test_accuracy_falls_with_eps_to_zero(ann_and_data):
    model, x, y = ann_and_data
    accs = []
    for eps in (0.0, 2 / 255, 8 / 255, 64 / 255):
        alpha = max(eps / 4, 1e-4)
        accs.append(_acc(model, PGD(model, eps, alpha, 10)(x, y), y) if eps else _acc(model, x, y))
    assert all(b <= a + 1e-9 for a, b in zip(accs, accs[1:])), accs
    assert accs[0] > 25.0  # the trained model is far above chance on clean images
    assert accs[-1] <= 2.0, accs


def test_targeted_uses_the_targets(ann_and_data):
    model, x, y = ann_and_data
    targets = (y + 3) % 10
    adv_t = PGD(model, 16 / 255, 2 / 255, 10, targeted=True)(x, y, targets)
    adv_u = PGD(model, 16 / 255, 2 / 255, 10)(x, y)
    with torch.no_grad():
        hit_t = (model(adv_t).argmax(1) == targets).float().mean().item()
        hit_u = (model(adv_u).argmax(1) == targets).float().mean().item()
    assert hit_t > 0.3 and hit_t > hit_u + 0.2
    with pytest.raises(SnnadvError):
        PGD(model, EPS, targeted=True)(x, y)


def test_model_mode_is_restored(ann_and_data):
    model, x, y = ann_and_data
    model.train()
    FGSM(model, EPS)(x[:4], y[:4])
    assert model.training
    model.eval()
    FGSM(model, EPS)(x[:4], y[:4])
    assert not model.training


def test_algorithm1_matches_transposed_first_layer_conv():
    snn = small_snn()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    source = Algorithm1(snn)
    snn.encoder.generator = torch.Generator().manual_seed(1)
    acc, _ = source.first_layer_grad(x, y)
    assert acc.abs().sum() > 0  # the surrogate gradients reach the first layer
    reference = torch.nn.grad.conv2d_input(x.shape, snn.first_conv.weight.detach(), acc,
                                           stride=snn.first_conv.stride, padding=snn.first_conv.padding)
    snn.encoder.generator = torch.Generator().manual_seed(1)
    grad, _ = source(x, y)
    assert torch.allclose(grad, reference, atol=1e-6)
    nz = reference != 0
    assert nz.float().mean() > 0.5
    assert torch.equal(grad.sign()[nz], reference.sign()[nz])


def test_algorithm1_equals_bptt_through_straight_through_encoder():
    """With an identity encoder gradient, Alg. 1 and BPTT agree (linear first layer)."""
    snn = small_snn()
    x, y = torch.rand(3, 3, 32, 32), torch.randint(0, 10, (3,))
    snn.encoder.generator = torch.Generator().manual_seed(5)
    g1, _ = Algorithm1(snn)(x, y)
    snn.encoder.generator = torch.Generator().manual_seed(5)
    g2, _ = Autograd(snn)(x, y)
    assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-4)


def test_snn_attack_reproducible_with_seed():
    snn = small_snn()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))

    def run(seed):
        snn.encoder.generator = torch.Generator().manual_seed(seed)
        return PGD(snn, EPS, 2 / 255, 3, random_start=True, gradient=make_gradient(snn, "alg1"),
                   generator=torch.Generator().manual_seed(seed))(x, y)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eot_averages_independent_draws():
    snn = small_snn()
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    snn.encoder.generator = torch.Generator().manual_seed(3)
    single = [Autograd(snn)(x, y)[0] for _ in range(4)]
    snn.encoder.generator = torch.Generator().manual_seed(3)
    eot, _ = EOT(Autograd(snn), 4)(x, y)
    assert torch.allclose(eot, sum(single) / 4, atol=1e-6)
    assert not torch.equal(single[0], single[1])  # fresh spikes per draw


def test_bad_settings():
    snn = small_snn()
    with pytest.raises(SnnadvError):
        FGSM(snn, eps=1.5)
    with pytest.raises(SnnadvError):
        PGD(snn, EPS, steps=0)
    assert check_eps(EPS, alpha=16 / 255)  # alpha > eps warns
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    with pytest.raises(SnnadvError):
        parse_eps("eight")
    from snnadv.models import ANN

    with pytest.raises(SnnadvError):
        make_gradient(ANN(get_spec("tiny", 10)), "alg1")
    with pytest.raises(SnnadvError):
        make_attack("cw", snn, EPS)


# ----------------------------------------------------------------- CLI: attack and table
@pytest.fixture(scope="module")
def tiny_models(shared_data, tmp_path_factory):
    """Two independently trained tiny pipelines (ANN, SNN-conv, SNN-BP), seeds 0 and 1."""
    from snnadv.config import resolve
    from snnadv.convert import convert
    from snnadv.train import finetune, train_ann

    root = tmp_path_factory.mktemp("tiny")
    common = dict(data_dir=str(shared_data), device="cpu", quiet=True, batch_size=64)
    paths = {}
    for seed, suffix in ((0, ""), (1, "_ii")):
        ann, conv, bp = (root / f"{k}{suffix}.pt" for k in ("ann", "conv", "bp"))
        train_ann(resolve("train-ann", flags=dict(common, arch="tiny", epochs=3, lr=0.05, seed=seed,
                                                  test_subset=100, out=str(ann))))
        convert(resolve("convert", flags=dict(common, checkpoint=str(ann), timesteps=32, percentile=99.9,
                                              curve=[32], test_subset=50, seed=seed, out=str(conv))))
        finetune(resolve("finetune", flags=dict(common, checkpoint=str(conv), timesteps=8, epochs=1,
                                                train_subset=256, test_subset=50, seed=seed, out=str(bp))))
        paths.update({f"ann{suffix}": ann, f"snn_conv{suffix}": conv, f"snn_bp{suffix}": bp})
    return paths


def test_cli_attack_json_and_errors(tiny_models, shared_data, tmp_path, capsys):
    from snnadv.cli.main import main

    out = tmp_path / "atk.json"
    args = ["attack", "--data-dir", str(shared_data), "--device", "cpu", "--quiet", "--test-subset", "30",
            "--source", "ann", "--source-ckpt", str(tiny_models["ann_ii"]), "--target", "snn-bp",
            "--target-ckpt", str(tiny_models["snn_bp"]), "--attack", "fgsm", "--eps", "8/255",
            "--eval-draws", "2", "--out", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "blackbox" and r["gradient"] == "autograd"
    assert r["eps"] == pytest.approx(8 / 255) and r["max_linf"] <= 8 / 255 + 1e-6
    assert len(r["adv_acc"]["draws"]) == 2 and r["source"]["sha256"] and r["target"]["sha256"]
    lo, hi = r["adv_acc"]["ci95"]
    assert lo <= r["adv_acc"]["mean"] <= hi and len(r["adv_acc"]["correct"]) == 2
    assert r["adv_minus_clean"]["diff"] == pytest.approx(r["adv_acc"]["mean"] - r["clean_acc"]["mean"])
    # an SNN source with EOT: the gradient averages 2 encoder draws and says so
    eot_out = tmp_path / "eot.json"
    assert main(["attack", "--data-dir", str(shared_data), "--device", "cpu", "--quiet", "--test-subset", "10",
                 "--source", "snn-bp", "--source-ckpt", str(tiny_models["snn_bp"]), "--attack", "fgsm",
                 "--eot", "2", "--out", str(eot_out)]) == 0
    r = json.loads(eot_out.read_text())
    assert r["gradient"] == "alg1+eot2" and r["mode"] == "whitebox"
    capsys.readouterr()
    bad = [
        args[:-2] + ["--eps", "2"],                                   # eps outside [0, 1]
        args[:-2] + ["--steps", "0", "--attack", "pgd"],               # steps < 1
        args + ["--gradient", "alg1"],                                  # gradient for an ANN source
        args + ["--eot", "4"],                                          # EOT for an ANN source
        args + ["--eot", "0"],                                          # EOT < 1
        [a if a != "snn-bp" else "ann" for a in args],                  # target kind mismatch
    ]
    for b in bad:
        assert main(b) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_cli_attack_that_would_not_fit_the_memory_is_one_line_and_writes_nothing(tiny_models, shared_data,
                                                                                tmp_path, capsys, monkeypatch):
    """An SNN gradient that would not fit ``SNNADV_MEMORY_LIMIT`` (or the free memory) is
    refused with the estimate instead of being ended by the kernel's OOM killer; a bad
    limit is refused before anything runs."""
    from snnadv.cli.main import main

    out = tmp_path / "atk.json"
    args = ["attack", "--data-dir", str(shared_data), "--device", "cpu", "--quiet", "--test-subset", "10",
            "--source", "snn-bp", "--source-ckpt", str(tiny_models["snn_bp"]), "--attack", "fgsm",
            "--out", str(out)]
    monkeypatch.setenv("SNNADV_MEMORY_LIMIT", "0.0001")
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "GiB" in err and "does not fit" in err, err
    assert not out.exists()
    monkeypatch.setenv("SNNADV_MEMORY_LIMIT", "lots")
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "SNNADV_MEMORY_LIMIT='lots'" in err, err
    monkeypatch.delenv("SNNADV_MEMORY_LIMIT")
    assert main(args) == 0 and out.exists()


def test_cli_finetune_that_would_not_fit_the_memory_is_one_line_and_writes_nothing(tiny_models, shared_data,
                                                                                  tmp_path, capsys, monkeypatch):
    """A fine-tuning batch is not split: one that would not fit is refused at the first
    batch, in one line with the estimate, and no checkpoint is written."""
    from snnadv.cli.main import main

    out = tmp_path / "bp.pt"
    monkeypatch.setenv("SNNADV_MEMORY_LIMIT", "0.0001")
    assert main(["finetune", "--data-dir", str(shared_data), "--device", "cpu", "--quiet", "--checkpoint",
                 str(tiny_models["snn_conv"]), "--timesteps", "4", "--epochs", "1", "--train-subset", "64",
                 "--test-subset", "20", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "fine-tuning: " in err and "GiB" in err, err
    assert not out.exists()


def test_cli_attack_rejects_mixed_datasets(tiny_models, tmp_path, capsys, shared_data):
    """A source trained on another dataset than the target: one-line error."""
    import torch as _t

    from snnadv.cli.main import main

    ck = _t.load(tiny_models["ann_ii"], weights_only=True)
    ck["dataset"] = "cifar100"
    other = tmp_path / "other.pt"
    _t.save(ck, other)
    code = main(["attack", "--data-dir", str(shared_data), "--quiet", "--source-ckpt", str(other),
                 "--target-ckpt", str(tiny_models["ann"]), "--test-subset", "10"])
    assert code != 0
    assert "cifar100" in capsys.readouterr().err


def test_table_complete(tiny_models, shared_data, tmp_path):
    from snnadv.config import resolve
    from snnadv.robustness import run_table

    cfg = resolve("table", flags=dict(data_dir=str(shared_data), device="cpu", quiet=True, test_subset=40,
                                      steps=2, batch_size=40, out=str(tmp_path / "tables"),
                                      **{k: str(v) for k, v in tiny_models.items()}))
    from contextlib import contextmanager

    from snnadv.report import Reporter

    class Recorder(Reporter):  # what each progress display was told: description, total, advanced
        shown: list = []

        @contextmanager
        def progress(self, description, total):
            row = [description, total, 0]
            self.shown.append(row)

            def advance(n=1, info=None):
                row[2] += n

            yield advance

    r = run_table(cfg, reporter=Recorder(quiet=True))
    t1, t2 = r["table1"], r["table2"]
    # long work shows progress: every crafted set and every accuracy (3 draws on an SNN) counts to its total
    shown = {d: (total, done) for d, total, done in Recorder.shown}
    assert shown["accuracy of ann on clean"] == (40, 40)
    assert shown["accuracy of snn_conv on pgd from snn_bp_ii"] == (40 * cfg["eval_draws"],) * 2
    assert sum(d.startswith("crafting") for d in shown) == 12 and all(t == n for t, n in shown.values())
    for part in ("whitebox", "blackbox"):
        for a in ("fgsm", "pgd"):
            assert set(t1[part][a]) == {"ann", "snn_conv", "snn_bp"}
    assert set(t2["fgsm"]) == {"ann_ii", "snn_conv_ii", "snn_bp_ii"}
    # Table 2's ANN-II row is Table 1's blackbox row: the same crafted set, re-used
    for a in ("fgsm", "pgd"):
        assert t2[a]["ann_ii"] == t1["blackbox"][a]
    # whitebox attacks hurt the ANN
    assert t1["whitebox"]["pgd"]["ann"]["mean"] < t1["clean"]["ann"]["mean"]
    md = (tmp_path / "tables" / "tables.md").read_text()
    assert "Table 1" in md and "Table 2" in md and md.count("|") > 40
    # every accuracy with its interval over the 40 images, every comparison with its paired test
    assert t1["clean"]["ann"]["ci95"][0] <= t1["clean"]["ann"]["mean"] <= t1["clean"]["ann"]["ci95"][1]
    assert len(t1["clean"]["snn_bp"]["correct"][0]) == 40
    assert len(r["comparisons"]) == 21 and all(0 <= c["p"] <= 1 for c in r["comparisons"])
    assert "McNemar" in md and "Paired comparisons" in md
    assert json.loads((tmp_path / "tables" / "tables.json").read_text())["images"] == 40


def test_table_resumes_from_its_pieces(tiny_models, shared_data, tmp_path, monkeypatch):
    """Ctrl-C while crafting the third adversarial set: the finished sets and accuracies
    are kept in tables/pieces/, and the re-run makes only what is missing and gives the
    uninterrupted table exactly; a third run reads every piece and crafts nothing."""
    import snnadv.robustness
    from snnadv.config import resolve
    from snnadv.robustness import run_table

    def cfg(out):
        return resolve("table", flags=dict(data_dir=str(shared_data), device="cpu", quiet=True, test_subset=20,
                                           steps=2, batch_size=20, out=str(out), tables=["1"],
                                           **{k: str(v) for k, v in tiny_models.items()}))

    straight = run_table(cfg(tmp_path / "a"))
    real_craft, calls = snnadv.robustness.craft, []

    def craft_then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_craft(*a, **k)

    monkeypatch.setattr(snnadv.robustness, "craft", craft_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_table(cfg(tmp_path / "b"))
    assert len(list((tmp_path / "b" / "pieces").glob("adv-*.pt"))) == 2 and not (tmp_path / "b" / "tables.json").exists()
    counted = []
    monkeypatch.setattr(snnadv.robustness, "craft", lambda *a, **k: counted.append(1) or real_craft(*a, **k))
    resumed = run_table(cfg(tmp_path / "b"))
    strip = lambda r: {k: v for k, v in r.items() if k not in ("config", "models")}  # noqa: E731
    # 2 attacks x (3 whitebox sources + ANN-II) = 8 sets, 2 of them kept from the interrupted run
    assert strip(resumed) == strip(straight) and len(counted) == 8 - 2
    monkeypatch.setattr(snnadv.robustness, "craft", lambda *a, **k: pytest.fail("crafted again"))
    again = run_table({**cfg(tmp_path / "b"), "overwrite": True})
    assert strip(again) == strip(straight)


def test_table_in_chunks_equals_whole_and_resumes_mid_set(tiny_models, shared_data, tmp_path, monkeypatch):
    """``chunk``: each crafted set is made and kept in chunks of whole batches (6 images,
    batch 4: chunks of 8, the last one short).  The table equals the one crafted whole;
    interrupted in the middle of a set, the re-run crafts only that set's missing chunks."""
    import snnadv.robustness
    from snnadv.config import resolve
    from snnadv.robustness import run_table

    def cfg(out, **kw):
        return resolve("table", flags=dict(data_dir=str(shared_data), device="cpu", quiet=True, test_subset=20,
                                           steps=2, batch_size=4, out=str(out), tables=["1"], random_start=True,
                                           **kw, **{k: str(v) for k, v in tiny_models.items()}))

    strip = lambda r: {k: v for k, v in r.items() if k not in ("config", "models")}  # noqa: E731
    whole = run_table(cfg(tmp_path / "a"))
    real_craft, calls = snnadv.robustness.craft, []

    def craft_then_interrupt(*a, **k):
        calls.append(k["start"])
        if len(calls) == 5:  # the second chunk of the second set (3 chunks per set: 0-8, 8-16, 16-20)
            raise KeyboardInterrupt
        return real_craft(*a, **k)

    monkeypatch.setattr(snnadv.robustness, "craft", craft_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_table(cfg(tmp_path / "b", chunk=6))
    assert calls == [0, 8, 16, 0, 8]
    kept = sorted(p.name.split("-")[-3:-1] for p in (tmp_path / "b" / "pieces").glob("adv-*-*-*-*.pt"))
    assert len(kept) == 4  # three chunks of the first set, the first chunk of the second
    counted = []
    monkeypatch.setattr(snnadv.robustness, "craft", lambda *a, **k: counted.append(k["start"]) or real_craft(*a, **k))
    resumed = run_table(cfg(tmp_path / "b", chunk=6))
    # 2 attacks x 4 sources = 8 sets of 3 chunks, minus the 4 chunks kept
    assert len(counted) == 8 * 3 - 4 and counted[:2] == [8, 16]
    assert strip(resumed) == strip(whole)
