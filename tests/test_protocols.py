"""Evaluation protocols (snnadv.attacks.protocols), the cascade (snnadv.attacks.cascade),
batched EOT (snnadv.eot) and ``snnadv evaluate --protocol``.

Tiny models with random weights (the ``tiny`` architecture, T <= 6, low thresholds so
every layer spikes), a dozen images whose labels are partly the model's own
predictions (so that some images are correct and attacks have work to do).
"""

from __future__ import annotations

import json

import pytest
import torch

from snnadv.attacks.cascade import keyed_correct, run_cascade
from snnadv.attacks.protocols import PROTOCOLS, resolve_protocol
from snnadv.attacks.run_protocol import attack_builder, evaluate_protocol, protocol_specs
from snnadv.attacks.suite import AttackSetting, correct_matrix, worst_case
from snnadv.errors import SnnadvError
from snnadv.models import ANN, SNN, get_spec

N = 12
EPS = [4 / 255, 8 / 255]


def small_snn(seed=0, T=4):
    torch.manual_seed(seed)
    snn = SNN(get_spec("tiny", 10), num_steps=T, leak=0.95)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    return snn.eval()


def data(model, n=N, seed=1):
    """Images, labels: the model's prediction on one draw for 2/3 of them, random for the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = torch.randint(0, 10, (len(y[::3]),), generator=g)
    return x, y


def keyed_specs(model):
    """Keyed attacks (FGSM, PGD through three estimators): their results depend on the image alone."""
    specs = [AttackSetting("fgsm", "alg1", 1, 1, 1, "paper", "paper"),
             AttackSetting("pgd", "alg1", 3, 1, 1, "paper", "paper"),
             AttackSetting("pgd", "rate", 3, 1, 1, "paper", "paper"),
             AttackSetting("pgd", "bptt-fast-sigmoid", 3, 1, 2, "paper", "paper")]
    return [(sp.key, attack_builder(model, sp, slope=5.0, seed=0)) for sp in specs]


# --------------------------------------------------------------------------- the cascade
def test_cascade_equals_every_attack_on_every_image_and_is_at_least_as_strong():
    snn = small_snn()
    x, y = data(snn)
    attacks = keyed_specs(snn)
    kw = dict(draws=3, seed=5, batch_size=5, chunk=4)
    casc = run_cascade(snn, x, y, attacks, EPS, cascade=True, **kw)
    full = run_cascade(snn, x, y, attacks, EPS, cascade=False, **kw)
    # the clean matrix is correct_matrix's (same keys, whole set)
    assert torch.equal(casc.clean, correct_matrix(snn, x, y, 7, 3, 5))
    for j in range(len(EPS)):
        ref = worst_case([full.clean] + [full.matrices[k][j] for k, _ in attacks])
        assert torch.equal(casc.worst[j], ref)  # per sample and per draw
        assert torch.equal(full.worst[j], ref)
        for k, _ in attacks:  # at least as strong as each attack alone, draw by draw
            assert not (casc.worst[j] & ~full.matrices[k][j]).any()
            assert casc.worst[j].float().mean(1).le(full.matrices[k][j].float().mean(1)).all()
        # the cascade attacked fewer images (later attacks skip the fallen)
        assert sum(casc.attacked[k][j] for k, _ in attacks) <= sum(full.attacked[k][j] for k, _ in attacks)
    assert casc.clean.any() and not torch.equal(casc.worst[-1], casc.clean)  # the attacks did something


def test_keyed_correct_is_correct_matrix_column_by_column():
    snn = small_snn()
    x, y = data(snn)
    whole = correct_matrix(snn, x, y, 5, 2, 3)
    idx = torch.tensor([1, 4, 7, 10])
    assert torch.equal(keyed_correct(snn, x[idx], y[idx], idx, 2, 3, 3), whole[:, idx])


class _Store:
    def __init__(self, fail_after=None):
        self.data, self.saves, self.loads, self.fail_after = {}, 0, 0, fail_after

    def load(self, what):
        got = self.data.get(json.dumps(what, sort_keys=True))
        self.loads += got is not None
        return got

    def save(self, what, x):
        self.data[json.dumps(what, sort_keys=True)] = x.clone()
        self.saves += 1
        if self.fail_after is not None and self.saves >= self.fail_after:
            raise RuntimeError("interrupted")


def test_cascade_resumes_per_attack_and_chunk_with_the_same_result():
    snn = small_snn()
    x, y = data(snn)
    attacks = keyed_specs(snn)[:3]
    kw = dict(draws=2, seed=1, batch_size=4, chunk=4)
    ref = run_cascade(snn, x, y, attacks, EPS, **kw)
    store = _Store(fail_after=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_cascade(snn, x, y, attacks, EPS, store=store, **kw)
    assert len(store.data) == 3
    store.fail_after = None
    again = run_cascade(snn, x, y, attacks, EPS, store=store, **kw)
    assert again.resumed == 3 and again.pieces == ref.pieces - 3
    for a, b in zip(again.worst, ref.worst):
        assert torch.equal(a, b)
    for k, _ in attacks:
        assert all(torch.equal(a, b) for a, b in zip(again.matrices[k], ref.matrices[k]))
    done = run_cascade(snn, x, y, attacks, EPS, store=store, **kw)  # all from the pieces
    assert done.pieces == 0 and all(torch.equal(a, b) for a, b in zip(done.worst, ref.worst))


# --------------------------------------------------------------------------- protocols
def test_presets_resolve_and_overrides_apply():
    s = PROTOCOLS["strong"]
    assert s.attacks == ("apgd-ce", "apgd-dlr", "square") and s.apgd_steps == 100 and s.eot == 10
    assert s.square_queries == 5000 and s.sharpness and s.paths == "all"
    assert [round(e * 255) for e in s.eps] == [2, 4, 8]
    assert PROTOCOLS["paper"].attacks == ("fgsm", "pgd") and PROTOCOLS["paper"].steps == 7
    q = resolve_protocol("strong", {"apgd_steps": 7, "eps": [8 / 255], "eot": None})
    assert q.apgd_steps == 7 and q.eps == (8 / 255,) and q.eot == 10 and PROTOCOLS["strong"].apgd_steps == 100
    with pytest.raises(SnnadvError, match="unknown protocol"):
        resolve_protocol("nope")
    with pytest.raises(SnnadvError, match="cannot be overridden"):
        resolve_protocol("quick", {"attacks": ("fgsm",)})
    snn = small_snn()
    specs = protocol_specs(snn, s, ["alg1", "rate"])
    assert [(sp.attack, sp.path, sp.eot) for sp in specs] == [
        ("apgd-ce", "alg1", 10), ("apgd-ce", "rate", 10), ("apgd-dlr", "alg1", 10), ("apgd-dlr", "rate", 10),
        ("square", "none", 1)]
    ann_specs = protocol_specs(ANN(get_spec("tiny", 10)), s, ["autograd"])
    assert [sp.eot for sp in ann_specs] == [1, 1, 1]


def test_quick_protocol_labels_every_number():
    pytest.importorskip("torchattacks")
    snn = small_snn()
    x, y = data(snn)
    p = resolve_protocol("quick", {"eps": EPS, "chunk": 5})
    r = evaluate_protocol(snn, x, y, p, seed=2, batch_size=6)
    assert r["protocol"] == "quick" and r["mode"] == "cascade" and r["eval_draws"] == 2
    assert [row["label"] for row in r["rows"]] == ["FGSM", "APGD-CE-5", "Square-50"]
    for row in r["rows"]:
        for k in ("protocol", "attack", "estimator", "steps", "restarts", "eot", "draws", "images"):
            assert row[k] is not None
        for c in row["cells"]:
            assert {"eps", "attacked", "seconds", "cumulative"} <= set(c) and len(c["cumulative"]["ci95"]) == 2
    assert r["rows"][1]["eot"] == 2 and r["rows"][1]["estimator"] == "alg1"
    for j in range(len(EPS)):  # the running worst case only falls, down to the worst case
        cum = [row["cells"][j]["cumulative"]["mean"] for row in r["rows"]]
        assert cum == sorted(cum, reverse=True) and cum[-1] == r["worst_case"][j]["mean"] <= r["clean"]["mean"]
    assert {c["attack"] for c in r["cost"]} == {"FGSM", "APGD-CE-5", "Square-50"}


def test_strong_protocol_searches_the_sharpness_on_held_out_images():
    pytest.importorskip("torchattacks")
    snn = small_snn(T=3)
    x, y = data(snn, n=4)
    hx, hy = data(snn, n=4, seed=9)
    p = resolve_protocol("strong", {"eps": [8 / 255], "apgd_steps": 2, "eot": 2, "eval_draws": 2,
                                    "square_queries": 5, "paths": "alg1,bptt-fast-sigmoid"})
    p = type(p)(**{**p.to_dict(), "eps": tuple(p.eps), "attacks": tuple(p.attacks), "sharpness_iters": 2,
                   "sharpness_images": 4})
    with pytest.raises(SnnadvError, match="held-out"):
        evaluate_protocol(snn, x, y, p)
    r = evaluate_protocol(snn, x, y, p, heldout=(hx, hy), batch_size=4)
    sh = r["sharpness"]
    assert sh["held_out"] and sh["images"] == 4 and 0.5 <= sh["best"] <= 100
    sharp_rows = [row for row in r["rows"] if row["estimator"] == "bptt-fast-sigmoid"]
    assert len(sharp_rows) == 2 and all(row["slope"] == sh["best"] for row in sharp_rows)


# --------------------------------------------------------------------------- the command line
def test_cli_evaluate_protocol_quick_end_to_end(tmp_path, shared_data):
    pytest.importorskip("torchattacks")
    from snnadv.checkpoint import model_settings, save_checkpoint, weights
    from snnadv.cli.main import main

    snn = small_snn(T=4)
    ckpt = save_checkpoint(tmp_path / "snn.pt", {
        "stage": "snn-conv", "dataset": "cifar10", "spec": snn.spec.to_dict(), "model": model_settings(snn),
        "state_dict": weights(snn), "config": {}, "metrics": {}, "parent": None, "train_state": None})
    out = tmp_path / "q.json"
    args = ["evaluate", "--target-ckpt", str(ckpt), "--protocol", "quick", "--data-dir", str(shared_data),
            "--device", "cpu", "--test-subset", "30", "--batch-size", "8", "--quiet", "--out", str(out),
            "--eps", "2/255,8/255"]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["protocol"] == "quick" and r["eps_labels"] == ["2/255", "8/255"] and r["images"] == 30
    assert r["protocol_settings"]["apgd_steps"] == 5  # the preset, with --eps overriding it
    assert r["clean"]["mean"] > 0, r["clean"]
    assert r["pieces"]["computed"] > 0 and r["pieces"]["resumed"] == 0
    md = out.with_name("q-evaluate.md").read_text()
    assert "protocol quick" in md and "WORST CASE" in md and "s / 100 attacked" in md
    assert main(args + ["--overwrite"]) == 0  # again: every piece from the folder beside the JSON, the same numbers
    r2 = json.loads(out.read_text())
    assert r2["pieces"]["computed"] == 0 and r2["pieces"]["resumed"] == r["pieces"]["computed"]
    assert r2["worst_case"] == r["worst_case"] and r2["correct"] == r["correct"]
