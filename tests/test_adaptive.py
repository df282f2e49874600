"""Adaptive attacks (snnadv.attacks.suite, snnadv.adaptive): EOT, gradient paths, worst case, library attacks,
accuracy vs eps, masking flags, ``snnadv evaluate``.

One tiny pipeline (ANN -> SNN-conv -> SNN-BP, T = 8) is trained per module; the
attacks use few steps on a few dozen test images.  Torch runs on one thread here:
on a shared 2-core machine the default thread pool is several times slower.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from snnadv.adaptive import find_proxy
from snnadv.attacks.settings import EvalSettings, parse_eps_list, resolve_paths
from snnadv.attacks.suite import correct_matrix, evaluate_model, pgd_attack, worst_case
from snnadv.data import load_split, to_float
from snnadv.errors import SnnadvError
from snnadv.gradients import AttackSurrogate, RateGradient, make_gradient
from snnadv.masking import sanity_flags
from snnadv.registry import GRADIENTS
from snnadv.models import SNN, get_spec
from snnadv.surrogates import FastSigmoid, LinearSurrogate, SpikeTime, make_surrogate

N_IMAGES = 48


@pytest.fixture(scope="module")
def pipeline(shared_data, tmp_path_factory, observed):
    """A tiny ANN, its SNN-conv and SNN-BP (T = 8), the recipe of test_attacks' tiny_models."""
    from snnadv.config import resolve
    from snnadv.convert import convert
    from snnadv.train import finetune, train_ann

    root = tmp_path_factory.mktemp("adaptive")
    common = dict(data_dir=str(shared_data), device="cpu", quiet=True, batch_size=64, seed=0)
    ann, conv, bp = (root / f"{k}.pt" for k in ("ann", "conv", "bp"))
    a = train_ann(resolve("train-ann", flags=dict(common, arch="tiny", epochs=6, lr=0.05, test_subset=100,
                                                  out=str(ann))))
    convert(resolve("convert", flags=dict(common, checkpoint=str(ann), timesteps=32, percentile=99.9, curve=[32],
                                          test_subset=50, out=str(conv))))
    b = finetune(resolve("finetune", flags=dict(common, checkpoint=str(conv), timesteps=8, epochs=1,
                                                train_subset=512, test_subset=50, out=str(bp))))
    observed(f"adaptive tests: tiny ANN {a['metrics']['test_acc']:.0f}%, SNN-BP (T=8) "
             f"{b['metrics']['test_acc']:.0f}% on their test subsets")
    return {"ann": ann, "snn_conv": conv, "snn_bp": bp}


@pytest.fixture(scope="module")
def data(shared_data):
    test = load_split("cifar10", shared_data, train=False, subset=N_IMAGES)
    return to_float(test.images), test.labels


@pytest.fixture(scope="module")
def bp_model(pipeline):
    from snnadv.robustness import load_attack_model

    model, info, ckpt = load_attack_model(pipeline["snn_bp"], "snn-bp", "cpu")
    proxy, proxy_info = find_proxy(pipeline["snn_bp"], ckpt, "cpu")
    return model, proxy, proxy_info


@pytest.fixture(scope="module")
def ann_model(pipeline):
    import snnadv

    return snnadv.load_model(pipeline["ann"])


def small_snn(seed=0, T=6):
    torch.manual_seed(seed)
    snn = SNN(get_spec("tiny", 10), num_steps=T, leak=0.95)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    return snn.eval()


def _settings(**kw):
    base = dict(suite="full", eps=[8 / 255], eot=2, eval_draws=4, paths="all", steps=4, restarts=2, apgd_steps=4,
                square_queries=30, sweep_eps=[0, 8 / 255, 64 / 255], sweep_steps=10, stat_images=16, batch_size=64)
    return EvalSettings(**{**base, **kw})


# ----------------------------------------------------------------- gradient paths
def test_rate_gradient_matches_explicit_rate_network():
    """The rate path = autograd through rate-valued layers with d(rate)/d(current) = 1[rate > 0] / thr."""
    snn = small_snn()
    x, y = torch.rand(3, 3, 32, 32), torch.randint(0, 10, (3,))
    src = RateGradient(snn)
    snn.encoder.generator = torch.Generator().manual_seed(4)
    rates = src.spike_rates(x)
    snn.encoder.generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        logits_snn = snn(x)
    snn.encoder.generator = torch.Generator().manual_seed(4)
    grad, logits = src(x, y)
    assert torch.allclose(logits, logits_snn, atol=1e-5)  # forward = the real SNN's draw

    # an independent rate network for the tiny spec (conv-act-pool-conv-act-pool-fc-act-fc)
    xr = x.clone().requires_grad_(True)
    h = xr
    for name, mod in snn.hidden_layers():
        if name.startswith("act"):
            r, thr = rates[id(mod)], float(mod.threshold)
            slope = (r > 0).float() / thr
            h = (h * slope) + (r - h * slope).detach()  # value r, derivative 1[r > 0] / thr
        elif name.startswith("drop"):
            continue
        else:
            h = mod(h)
    ref_logits = snn.classifier(h)
    (ref,) = torch.autograd.grad(torch.nn.functional.cross_entropy(ref_logits, y, reduction="sum"), xr)
    assert torch.allclose(ref_logits, logits, atol=1e-5)
    assert torch.allclose(grad, ref, atol=1e-6, rtol=1e-4)
    assert grad.abs().sum() > 0


def test_attack_time_surrogates_are_swapped_and_restored():
    snn = small_snn()
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    grads = {}
    for kind in ("bptt-stdb", "bptt-linear", "bptt-fast-sigmoid"):
        src = make_gradient(snn, kind, slope=2.0)
        assert isinstance(src, AttackSurrogate) and src.name == kind
        snn.encoder.generator = torch.Generator().manual_seed(2)
        grads[kind] = src(x, y)[0]
        assert all(isinstance(n.surrogate, SpikeTime) for n in snn.neurons)  # the training one is back
    assert isinstance(make_gradient(snn, "bptt-linear").surrogate, LinearSurrogate)
    fs = make_gradient(snn, "bptt-fast-sigmoid", slope=2.0).surrogate
    assert isinstance(fs, FastSigmoid) and fs.slope == 2.0
    assert not torch.allclose(grads["bptt-linear"], grads["bptt-fast-sigmoid"])
    # a fast-sigmoid attack equals BPTT on a model trained with that surrogate
    snn.set_surrogate(make_surrogate("fast-sigmoid", slope=2.0))
    snn.encoder.generator = torch.Generator().manual_seed(2)
    ref = make_gradient(snn, "bptt")(x, y)[0]
    assert torch.allclose(ref, grads["bptt-fast-sigmoid"], atol=1e-6)
    with pytest.raises(SnnadvError):
        make_gradient(snn, "ann")  # needs the proxy
    with pytest.raises(SnnadvError):
        make_gradient(snn, "bptt-cubic")


def test_paths_and_settings_validation(ann_model):
    snn = small_snn()
    # the model's own surrogate (Eq. 4, default parameters) is alg1's direction: left out of "all"
    assert resolve_paths(snn, "all") == ["alg1", "bptt-linear", "bptt-fast-sigmoid", "rate", "ann"]
    snn.set_surrogate(make_surrogate("stdb", beta=0.05))
    assert resolve_paths(snn, "all") == ["alg1", "bptt-stdb", "bptt-linear", "bptt-fast-sigmoid", "rate", "ann"]
    assert "bptt-stdb" in resolve_paths(small_snn(), "alg1,bptt-stdb")
    assert resolve_paths(snn, "rate,alg1,rate") == ["rate", "alg1"]
    assert resolve_paths(ann_model, "all") == ["autograd"]
    assert set(GRADIENTS) >= set(resolve_paths(snn, "all"))
    for bad in ("alg2", "", "alg1,foo"):
        with pytest.raises(SnnadvError):
            resolve_paths(snn, bad)
    with pytest.raises(SnnadvError, match="SNN targets only"):
        resolve_paths(ann_model, "alg1")
    assert parse_eps_list("2/255, 8/255,64/255") == pytest.approx([2 / 255, 8 / 255, 64 / 255])
    for kw in (dict(eot=0), dict(eval_draws=0), dict(eps="2"), dict(eps="1/0"), dict(suite="strong"),
               dict(steps=0), dict(sweep_eps="-1/255"), dict(alpha="0")):
        with pytest.raises(SnnadvError):
            _settings(**kw).check()


def test_worst_case_is_per_sample_and_per_draw():
    a = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    w = worst_case([a, b])
    assert w.tolist() == [[True, False, False, True], [False, False, True, True]]
    with pytest.raises(SnnadvError):
        worst_case([a, b[:, :3]])


# ----------------------------------------------------------------- on the SNN-BP model
def test_eot_at_least_as_strong_as_one_draw(bp_model, data, observed):
    """PGD with EOT M = 8 succeeds at least as often as M = 1 (same images, 8 eval draws)."""
    model, _, _ = bp_model
    x, y = data
    eps, steps = 8 / 255, 5
    acc = {}
    for m in (1, 8):
        adv = pgd_attack(model, make_gradient(model, "alg1", m), x, y, eps, eps / 4, steps, 1, 64, seed=0)
        c = correct_matrix(model, adv, y, 64, draws=8, seed=0)
        acc[m] = 100 * c.float().mean().item()
    clean = 100 * correct_matrix(model, x, y, 64, draws=8, seed=0).float().mean().item()
    observed(f"SNN-BP tiny, PGD-{steps} eps 8/255 alg1: clean {clean:.1f}%, EOT 1 -> {acc[1]:.1f}%, "
             f"EOT 8 -> {acc[8]:.1f}% (mean of 8 draws, {len(y)} images)")
    assert acc[1] < clean  # the attack works at all
    assert acc[8] <= acc[1] + 1e-9


def test_full_suite_on_snn_bp(bp_model, data, tmp_path, observed):
    """Worst case over paths no better than any path; eps sweep reaches ~0; library attacks run on the SNN."""
    pytest.importorskip("torchattacks")
    model, proxy, proxy_info = bp_model
    x, y = data
    r = evaluate_model(model, x, y, _settings(), proxy=proxy)
    K = r["eval_draws"]
    assert K == 4 and r["eot"] == 2
    pgd_rows = [row for row in r["rows"] if row["group"] == "adaptive"]
    assert {row["path"] for row in pgd_rows} == set(resolve_paths(model, "all"))
    for row in pgd_rows:  # per draw, not only on average
        for k in range(K):
            assert r["worst_paths"][0]["draws"][k] <= row["acc"][0]["draws"][k] + 1e-9
    for row in r["rows"]:
        assert r["worst_case"][0]["mean"] <= row["acc"][0]["mean"] + 1e-9
    assert r["worst_case"][0]["mean"] <= r["worst_paths"][0]["mean"] + 1e-9
    assert {row["attack"] for row in r["rows"]} >= {"fgsm", "pgd", "apgd-ce", "apgd-dlr", "square"}
    pts = r["sweep"]["points"]
    assert pts[-1]["eps"] == pytest.approx(64 / 255) and pts[-1]["acc"]["mean"] <= 5.0
    assert r["flags"]["eps_not_zero"]["flag"] is False
    assert r["flags"]["zero_gradients"]["flag"] is False
    stats = r["gradient_stats"]
    assert set(stats) == set(resolve_paths(model, "all"))
    assert stats["ann"]["cos_single"] == pytest.approx(1.0)  # deterministic proxy
    assert 0 < stats["alg1"]["cos_single"] < 1  # stochastic: independent draws differ
    assert proxy_info["source"] == "parent"
    observed("SNN-BP tiny full suite (eps 8/255): "
             + ", ".join(f"{row['label']}/{row['path']} {row['acc'][0]['mean']:.1f}" for row in r["rows"])
             + f", worst over paths {r['worst_paths'][0]['mean']:.1f}, worst case {r['worst_case'][0]['mean']:.1f}")
    from snnadv.adaptive import evaluate_markdown
    from snnadv.outputs import write_json

    write_json(tmp_path / "r.json", r)
    assert json.loads((tmp_path / "r.json").read_text())["rows"]
    md = evaluate_markdown(r)
    assert "WORST CASE" in md and "Sanity checks" in md


def test_library_attacks_run_on_the_snn_module(bp_model, data):
    torchattacks = pytest.importorskip("torchattacks")
    model, _, _ = bp_model
    x, y = data[0][:16], data[1][:16]
    model.encoder.generator = torch.Generator().manual_seed(0)
    try:
        for atk in (torchattacks.APGD(model, eps=8 / 255, steps=3, eot_iter=2, loss="ce"),
                    torchattacks.Square(model, eps=8 / 255, n_queries=10)):
            adv = atk(x, y)
            assert adv.shape == x.shape and (adv - x).abs().max() <= 8 / 255 + 1e-6
            assert adv.min() >= 0 and adv.max() <= 1
            assert not torch.equal(adv, x)
    finally:
        model.encoder.generator = None


# ----------------------------------------------------------------- ANN and the masked toy model
def test_ann_accuracy_vs_eps_reaches_zero(ann_model, data):
    x, y = data
    r = evaluate_model(ann_model, x, y, _settings(suite="full", library=False, steps=10, restarts=1))
    assert r["eval_draws"] == 1 and r["paths"] == ["autograd"]
    accs = [p["acc"]["mean"] for p in r["sweep"]["points"]]
    assert accs[0] > 20 and accs[-1] <= 2.0, accs
    assert r["flags"]["eps_not_monotone"]["flag"] is False
    assert r["flags"]["eps_not_zero"]["flag"] is False
    assert r["flags"]["stronger_attack_higher_acc"]["flag"] is False
    assert r["flags"]["zero_gradients"]["flag"] is False and not r["masking_suspected"]


class Quantised(nn.Module):
    """A deliberately masked model: x -> round(4x)/4 with no straight-through gradient."""

    def __init__(self, ann):
        super().__init__()
        self.ann = ann

    def forward(self, x):
        return self.ann(torch.round(x * 4) / 4)


def test_masked_model_triggers_flags(ann_model, data, observed):
    pytest.importorskip("torchattacks")
    x, y = data
    masked = Quantised(ann_model).eval()
    r = evaluate_model(masked, x, y, _settings(eps=[32 / 255], square_queries=60, steps=5, restarts=1))
    f = r["flags"]
    stats = r["gradient_stats"]["autograd"]
    assert stats["zero_frac"] == 1.0 and stats["zero_images"] == 1.0
    assert f["zero_gradients"]["flag"] is True
    assert f["square_beats_gradient"]["flag"] is True, f["square_beats_gradient"]
    assert f["eps_not_zero"]["flag"] is True
    assert r["masking_suspected"]
    by = {row["label"]: row["acc"][0]["mean"] for row in r["rows"]}
    observed(f"masked toy model (eps 32/255): clean {r['clean']['mean']:.1f}%, PGD-7 {by['PGD-7']:.1f}%, "
             f"Square {by['Square-60']:.1f}%")


def test_sanity_flags_on_hand_made_results():
    def acc(v):
        return {"mean": v, "std": 0.0, "draws": [v]}

    base = {"images": 100, "stochastic": False, "eps_labels": ["8/255"], "gradient_stats": {},
            "ladder": [["pgd", "a", "7"], ["pgd", "a", "20"]],
            "sweep": {"points": [{"eps": 0.0, "label": "0/255", "acc": acc(80)},
                                 {"eps": 8 / 255, "label": "8/255", "acc": acc(30)},
                                 {"eps": 64 / 255, "label": "64/255", "acc": acc(35)}]},
            "rows": [{"label": "PGD-7", "group": "paper", "attack": "pgd", "path": "a", "eot": 1, "restarts": 1,
                      "acc": [acc(30)], "key": ["pgd", "a", "7"]},
                     {"label": "PGD-20", "group": "ladder", "attack": "pgd", "path": "a", "eot": 1, "restarts": 1,
                      "acc": [acc(40)], "key": ["pgd", "a", "20"]},
                     {"label": "Square", "group": "library", "attack": "square", "path": "none", "eot": 1,
                      "restarts": 1, "acc": [acc(10)], "key": ["square"]}]}
    f = sanity_flags(base)
    assert f["eps_not_monotone"]["flag"] and f["eps_not_zero"]["flag"]
    assert f["stronger_attack_higher_acc"]["flag"] and f["square_beats_gradient"]["flag"]
    assert f["transfer_beats_gradient"]["flag"] is None and f["zero_gradients"]["flag"] is None
    assert all(isinstance(v["explain"], str) and v["explain"] for v in f.values())


# ----------------------------------------------------------------- proxy and CLI
def test_proxy_found_through_parents_or_own_weights(pipeline, tmp_path):
    from snnadv.checkpoint import file_hash, load_checkpoint

    ckpt = load_checkpoint(pipeline["snn_bp"])
    _, info = find_proxy(pipeline["snn_bp"], ckpt, "cpu")
    assert info["source"] == "parent" and info["sha256"] == file_hash(pipeline["ann"])
    # parents moved away: found beside the child
    moved = tmp_path / "moved"
    moved.mkdir()
    for k in ("ann", "snn_conv", "snn_bp"):
        shutil.copy(pipeline[k], moved / pipeline[k].name)
    ck = dict(ckpt, parent=dict(ckpt["parent"], path="/nonexistent/" + pipeline["snn_conv"].name))
    _, info = find_proxy(moved / "bp.pt", ck, "cpu")
    assert info["source"] == "parent" and info["sha256"] == file_hash(pipeline["ann"])
    # a broken chain: the SNN's own weights in an ANN, with a warning
    warned = []
    ck = dict(ckpt, parent={"path": "/nonexistent/x.pt", "sha256": "0"})
    proxy, info = find_proxy(pipeline["snn_bp"], ck, "cpu", warn=warned.append)
    assert info["source"] == "own-weights" and warned
    assert torch.equal(proxy.conv1.weight, ckpt["state_dict"]["conv1.weight"])


def test_cli_evaluate(pipeline, shared_data, tmp_path, capsys):
    from snnadv.cli.main import main

    out = tmp_path / "ev.json"
    args = ["evaluate", "--data-dir", str(shared_data), "--device", "cpu", "--quiet", "--test-subset", "20",
            "--target-ckpt", str(pipeline["snn_bp"]), "--suite", "adaptive", "--eps", "4/255,16/255",
            "--eot", "2", "--eval-draws", "2", "--paths", "alg1,rate,ann", "--steps", "2", "--restarts", "1",
            "--no-library", "--blackbox-ckpt", str(pipeline["ann"]), "--out", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["target"]["sha256"] and r["proxy"]["source"] == "parent" and r["proxy"]["sha256"]
    assert r["eps"] == pytest.approx([4 / 255, 16 / 255]) and r["settings"]["eot"] == 2
    assert [row["path"] for row in r["rows"]] == ["alg1", "rate", "ann", "autograd"]
    assert r["rows"][-1]["group"] == "transfer" and r["blackbox"]["sha256"]
    assert all(row["max_linf"] <= 16 / 255 + 1e-6 for row in r["rows"])
    assert len(r["worst_case"]) == 2 and len(r["worst_case"][0]["draws"]) == 2
    assert "flags" in r and r["config"]["suite"] == "adaptive"
    md = (tmp_path / "ev-evaluate.md").read_text()  # "evaluate" in the name: snnadv report includes it
    assert md.count("|") > 20 and "WORST CASE" in md
    assert out.with_name("ev-eps.png").is_file()  # two eps: a plot even without the sweep
    capsys.readouterr()
    args = args[:-4] + args[-2:]  # without the blackbox model
    bad = [args[:-2] + ["--eot", "0"], args[:-2] + ["--eval-draws", "0"], args[:-2] + ["--paths", "alg9"],
           args[:-2] + ["--eps", "2"], args[:-2] + ["--eps", "8/255,x"],
           [a if a != str(pipeline["snn_bp"]) else str(pipeline["ann"]) for a in args]]  # SNN path on an ANN
    for b in bad:
        assert main(b) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_missing_optional_packages_are_warnings(pipeline, shared_data, tmp_path, monkeypatch):
    """Without torchattacks the library attacks are skipped, without matplotlib the plot: warnings, not errors."""
    import sys

    from snnadv.adaptive import run_evaluate
    from snnadv.config import resolve

    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import fails
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    cfg = resolve("evaluate", flags=dict(data_dir=str(shared_data), device="cpu", quiet=True, test_subset=10,
                                         target_ckpt=str(pipeline["snn_bp"]), suite="adaptive", paths="alg1",
                                         eps="4/255,8/255", eot=1, eval_draws=1, steps=1, restarts=1,
                                         out=str(tmp_path / "o")))
    r = run_evaluate(cfg)
    assert r["plot"] is None and not any(row["group"] == "library" for row in r["rows"])
    assert any("torchattacks" in w for w in r["warnings"]) and any("matplotlib" in w for w in r["warnings"])
    assert (tmp_path / "o" / "evaluate-snn-bp.json").is_file() and (tmp_path / "o" / "evaluate-snn-bp.md").is_file()
