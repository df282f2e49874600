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


def test_unkeyed_attacks_do_not_depend_on_the_rng_state_before_them():
    """APGD's first pass through an EstimatorModule draws from the global RNG: the cascade
    seeds it per batch, so a piece gives the same result in any process, whatever ran
    before (a resumed run, another rank, another PYTHONHASHSEED); and leaves it as it was."""
    snn = small_snn(T=3)
    x, y = data(snn)
    p = resolve_protocol("quick", {"attacks": "apgd-ce", "eps": [8 / 255], "chunk": 6, "early_exit": False})
    results = []
    for before in (0, 1, 7):
        torch.manual_seed(before)
        torch.rand(before + 1)
        state = torch.random.get_rng_state()
        r = evaluate_protocol(snn, x, y, p, seed=4, batch_size=4)
        assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
        results.append(r["correct"]["cumulative"][0][0])
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_share_gives_each_rank_a_contiguous_part_whole_batches_for_unkeyable_attacks():
    from snnadv.attacks.cascade import share
    from snnadv.parallel import World

    for n, bs, size in ((5, 3, 2), (10, 3, 3), (2, 4, 3), (7, 2, 4)):
        for whole in (False, True):
            parts = [share(n, bs, whole, World(r, size)) for r in range(size)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            if whole:  # every part starts at a batch boundary: one process's batches
                assert all(p.start % bs == 0 or p.start == n for p in parts)


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

    def seconds(self, what):  # keeps no times: resumed pieces count as of unknown cost
        return None

    def save(self, what, x, seconds=None):
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
    # a resumed piece still counts the images it attacked; this store keeps no times: counted as unknown
    assert done.attacked == ref.attacked and again.attacked == ref.attacked
    assert sum(map(sum, done.untimed.values())) == ref.pieces and sum(map(sum, ref.untimed.values())) == 0


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
        resolve_protocol("quick", {"sharpness": True})
    assert resolve_protocol("quick", {"attacks": "fgsm,apgd-ce"}).attacks == ("fgsm", "apgd-ce")
    for bad in ("fgsm,nope", "fgsm,fgsm", ""):
        with pytest.raises(SnnadvError, match="distinct names of fgsm, pgd"):
            resolve_protocol("quick", {"attacks": bad})
    snn = small_snn()
    specs = protocol_specs(snn, s, ["alg1", "rate"])
    assert [(sp.attack, sp.path, sp.eot) for sp in specs] == [
        ("apgd-ce", "alg1", 10), ("apgd-ce", "rate", 10), ("apgd-dlr", "alg1", 10), ("apgd-dlr", "rate", 10),
        ("square", "none", 1)]
    ann_specs = protocol_specs(ANN(get_spec("tiny", 10)), s, ["autograd"])
    assert [sp.eot for sp in ann_specs] == [1, 1, 1]


def test_early_exit_on_in_strong_and_quick_and_labelled_in_every_row():
    assert PROTOCOLS["strong"].early_exit and PROTOCOLS["quick"].early_exit and not PROTOCOLS["paper"].early_exit
    assert not resolve_protocol("quick", {"early_exit": False}).early_exit
    snn = small_snn()
    x, y = data(snn)
    kw = dict(seed=3, batch_size=5)
    plain = evaluate_protocol(snn, x, y, resolve_protocol("paper", {"eps": EPS, "chunk": 5}), **kw)
    p = resolve_protocol("paper", {"eps": EPS, "chunk": 5, "early_exit": True})
    early = evaluate_protocol(snn, x, y, p, **kw)
    assert [(r["label"], r["iterate"], r["early_exit"]) for r in plain["rows"]] == [
        ("FGSM", "last", False), ("PGD-7", "last", False)]  # the paper's PGD: the last iterate
    assert [(r["label"], r["iterate"], r["early_exit"]) for r in early["rows"]] == [
        ("FGSM", "last", False), ("PGD-7", "best", True)]
    assert early["rows"][1]["key"][-1] == "early-exit" and plain["rows"][1]["key"][-1] == "paper"  # other pieces
    assert [c["early_exit"] for c in early["cost"]] == [False, True]
    # keyed: the cascade still equals the attacks on every image, sample by sample and draw by draw
    full = evaluate_protocol(snn, x, y, p, cascade=False, **kw)
    assert [torch.equal(a, b) for a, b in zip(early["correct"]["worst"], full["correct"]["worst"])] == [True] * 2
    from snnadv.adaptive import protocol_rows

    header, rows = protocol_rows(early)
    assert "iterate" in header and rows[2][header.index("iterate")] == "best, early exit"
    from snnadv.adaptive import protocol_from_config
    from snnadv.config import resolve

    assert not protocol_from_config(resolve("evaluate", {}, {"protocol": "strong", "early_exit": False})).early_exit
    assert protocol_from_config(resolve("evaluate", {}, {"protocol": "quick"})).early_exit


def test_strong_cpu_runs_the_paper_first_and_its_pgd_row_is_the_paper_protocol():
    """``strong-cpu``: FGSM and PGD-7 exactly as ``paper`` (last iterate, no exit) before
    APGD, so its running worst case after PGD-7 is the paper protocol's result image by
    image, and its final worst case is never above it; early exit only inside APGD."""
    pytest.importorskip("torchattacks")
    s = PROTOCOLS["strong-cpu"]
    assert s.attacks[:2] == ("fgsm", "pgd") and s.exit_attacks == ("apgd-ce", "apgd-dlr") and s.early_exit
    snn = small_snn(T=3)
    x, y = data(snn)
    hx, hy = data(snn, n=4, seed=9)
    over = {"apgd_steps": 2, "eot": 2, "eval_draws": 2, "square_queries": 3, "chunk": 5}
    p = type(s)(**{**resolve_protocol("strong-cpu", over).__dict__, "sharpness_iters": 2, "sharpness_images": 4})
    kw = dict(seed=3, batch_size=5)
    r = evaluate_protocol(snn, x, y, p, heldout=(hx, hy), **kw)
    paper = evaluate_protocol(snn, x, y, resolve_protocol("paper", {"eval_draws": 2, "chunk": 5}), **kw)
    labels = [(row["label"], row["estimator"], row["early_exit"]) for row in r["rows"]]
    assert labels[:2] == [("FGSM", "alg1", False), ("PGD-7", "alg1", False)]
    assert [row["estimator"] for row in r["rows"][2:5]] == ["alg1", "bptt-fast-sigmoid", "rate"]
    assert all(row["early_exit"] for row in r["rows"][2:8]) and r["rows"][-1]["attack"] == "square"
    cum = r["correct"]["cumulative"]
    assert len(cum) == len(r["rows"]) and torch.equal(cum[1][0], paper["correct"]["worst"][0])
    assert torch.equal(cum[-1][0], r["correct"]["worst"][0]) and not (cum[-1][0] & ~cum[1][0]).any()
    assert torch.equal(r["correct"]["clean"], paper["correct"]["clean"])
    ann = ANN(get_spec("tiny", 10)).eval()  # an ANN target: autograd, whatever paths the preset names
    xa, ya = data(ann, n=4)
    ra = evaluate_protocol(ann, xa, ya, resolve_protocol("strong-cpu", over), batch_size=4)
    assert {row["estimator"] for row in ra["rows"]} == {"autograd", "none"}


def test_quick_protocol_labels_every_number():
    pytest.importorskip("torchattacks")
    snn = small_snn()
    x, y = data(snn)
    p = resolve_protocol("quick", {"eps": EPS, "chunk": 5})
    r = evaluate_protocol(snn, x, y, p, seed=2, batch_size=6)
    assert r["protocol"] == "quick" and r["mode"] == "whitebox" and r["cascade"] and r["eval_draws"] == 2
    assert [row["label"] for row in r["rows"]] == ["FGSM", "APGD-CE-5", "Square-50"]
    for row in r["rows"]:
        for k in ("protocol", "attack", "estimator", "steps", "restarts", "eot", "draws", "images"):
            assert row[k] is not None
        # FGSM: fixed steps; APGD (ours): leaves only when wrong on every evaluation draw; Square: its own
        assert row["early_exit"] is {"fgsm": False, "apgd-ce": True, "square": None}[row["attack"]]
        assert row["exit_test"] == ("wrong on every evaluation draw" if row["attack"] == "apgd-ce" else None)
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


# --------------------------------------------------------------------------- batched EOT
@pytest.mark.parametrize("path", ["alg1", "bptt-fast-sigmoid", "rate"])
def test_batched_eot_equals_sequential_eot_on_the_same_keyed_draws(path):
    from snnadv.encoding import current_keys, encoder_keys
    from snnadv.eot import BatchedEOT, sequential_eot
    from snnadv.gradients import make_gradient

    snn = small_snn()
    x, y = data(snn, n=3)
    src = make_gradient(snn, path)
    idx = torch.tensor([5, 9, 11])
    out = []
    for batched in (True, False):
        with encoder_keys(snn, 4, idx):
            for _ in range(2):  # two steps: fresh draws each, one call each
                if batched:
                    out.append(BatchedEOT(src, 3, snn)(x, y))
                else:
                    out.append(sequential_eot(src, 3, snn, x, y))
            out.append(current_keys(snn).calls)
    b1, b2, bc, s1, s2, sc = out
    assert bc == sc == 2
    for (gb, zb), (gs, zs) in ((b1, s1), (b2, s2)):
        torch.testing.assert_close(gb, gs, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(zb, zs, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(b1[0], b2[0])  # the steps' draws differ
    # the mean of M draws, not one draw repeated
    with encoder_keys(snn, 4, idx):
        g1, _ = BatchedEOT(src, 1, snn)(x, y)
    assert not torch.allclose(g1, b1[0])


def test_estimator_module_batched_eot_is_the_mean_over_the_copies():
    import torch.nn.functional as F

    from snnadv.encoding import encoder_seed
    from snnadv.estimator import EstimatorModule
    from snnadv.gradients import make_gradient

    snn = small_snn()
    x, y = data(snn, n=2)
    M = 3
    mod = EstimatorModule(snn, "alg1", eot=M, batched=True, generator=torch.Generator().manual_seed(0))
    xr = x.clone().requires_grad_(True)
    logits = mod(xr)
    (seed,) = mod.last_seeds
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr)
    rep = x.repeat(M, 1, 1, 1)
    with torch.no_grad(), encoder_seed(snn, seed):
        want_z = snn(rep).view(M, 2, -1).mean(0)
    torch.testing.assert_close(logits, want_z)
    # the path's VJP on the [M*B] draw with the cotangent dL/dz / M per copy, summed over the copies
    from snnadv.estimator import vjp_loss

    c = torch.autograd.functional.jacobian(lambda z: F.cross_entropy(z, y, reduction="sum"), logits.detach())
    src = make_gradient(snn, "alg1", loss=vjp_loss)
    with encoder_seed(snn, seed):
        g, _ = src(rep, c.repeat(M, 1) / M)
    torch.testing.assert_close(grad, g.view(M, 2, *x.shape[1:]).sum(0), rtol=1e-5, atol=1e-8)
    assert grad.abs().max() > 0


def test_evaluate_protocol_interrupted_resumes_from_its_pieces(tmp_path, shared_data):
    """``snnadv evaluate --protocol``: stopped after 2 pieces, run again: the rest is computed,
    the 2 are read back, and the result is the uninterrupted run's."""
    pytest.importorskip("torchattacks")
    from snnadv.adaptive import run_protocol
    from snnadv.checkpoint import model_settings, save_checkpoint, weights
    from snnadv.config import resolve

    snn = small_snn(T=4)
    ckpt = save_checkpoint(tmp_path / "snn.pt", {
        "stage": "snn-conv", "dataset": "cifar10", "spec": snn.spec.to_dict(), "model": model_settings(snn),
        "state_dict": weights(snn), "config": {}, "metrics": {}, "parent": None, "train_state": None})

    def cfg(name):
        return resolve("evaluate", flags=dict(target_ckpt=str(ckpt), protocol="quick", data_dir=str(shared_data),
                                              device="cpu", test_subset=30, batch_size=8, quiet=True, chunk=10,
                                              out=str(tmp_path / name / "r.json")))

    ref = run_protocol(cfg("ref"))
    assert ref["pieces"]["computed"] > 2
    with pytest.raises(RuntimeError, match="interrupted"):
        run_protocol(cfg("run"), fail_after=2)
    got = run_protocol(cfg("run"))
    assert got["pieces"] == {"computed": ref["pieces"]["computed"] - 2, "resumed": 2}
    # the cost table is the whole protocol's: resumed pieces add their images and their recorded seconds
    assert [c["attacked"] for c in got["cost"]] == [c["attacked"] for c in ref["cost"]]
    assert got["untimed_pieces"] == 0 and all(c["seconds"] > 0 for c in got["cost"] if c["attacked"])
    assert got["cost_seconds"] > got["eval_seconds"] + sum(c["seconds"] for c in got["cost"]) - 1e-9
    assert "2 pieces resumed" in (tmp_path / "run" / "r-evaluate.md").read_text()
    assert got["worst_case"] == ref["worst_case"] and got["correct"] == ref["correct"]
    assert [r["cells"][0]["cumulative"] for r in got["rows"]] == [r["cells"][0]["cumulative"] for r in ref["rows"]]


def test_a_run_with_fewer_attacks_shares_its_pieces_with_the_whole_protocol(tmp_path, shared_data):
    """``--attacks fgsm`` first, then the whole ``quick`` protocol in the same place: the
    FGSM pieces are read back (the list of attacks is not in a piece's key; what stands
    before an attack is), and the result is a fresh whole run's.  Pieces saved under the
    old key (the whole protocol, its attack list included) are still read."""
    pytest.importorskip("torchattacks")
    from snnadv.adaptive import PieceStore, run_protocol
    from snnadv.checkpoint import model_settings, save_checkpoint, weights
    from snnadv.config import resolve
    from snnadv.outputs import Pieces

    snn = small_snn(T=4)
    ckpt = save_checkpoint(tmp_path / "snn.pt", {
        "stage": "snn-conv", "dataset": "cifar10", "spec": snn.spec.to_dict(), "model": model_settings(snn),
        "state_dict": weights(snn), "config": {}, "metrics": {}, "parent": None, "train_state": None})

    def cfg(name, **kw):
        return resolve("evaluate", flags=dict(target_ckpt=str(ckpt), protocol="quick", data_dir=str(shared_data),
                                              device="cpu", test_subset=30, batch_size=8, quiet=True, chunk=10,
                                              out=str(tmp_path / name / "r.json"), **kw))

    ref = run_protocol(cfg("ref"))
    first = run_protocol(cfg("run", protocol_attacks="fgsm"))
    assert [r["attack"] for r in first["rows"]] == ["fgsm"], first["rows"]
    got = run_protocol({**cfg("run"), "overwrite": True})
    n = first["pieces"]["computed"]  # FGSM's chunks of 10 with an image standing
    assert n >= 1 and got["pieces"]["resumed"] == n and got["pieces"]["computed"] == ref["pieces"]["computed"] - n
    assert got["worst_case"] == ref["worst_case"] and got["correct"] == ref["correct"]

    common = {"target": "t", "protocol": {"name": "quick", "attacks": ["fgsm", "square"], "eot": 2}}
    what = {"attack": ["fgsm"], "chunk": [0, 10]}
    Pieces(tmp_path / "old", common).save_tensor("cascade", what, torch.ones(2, 3, dtype=torch.uint8))  # old key
    assert PieceStore(tmp_path / "old", common).load(what).shape == (2, 3)
    assert PieceStore(tmp_path / "old", {**common, "protocol": {**common["protocol"], "eot": 3}}).load(what) is None


def test_config_protocol_with_overrides_and_old_keys_unchanged():
    from snnadv.adaptive import protocol_from_config
    from snnadv.config import resolve, settings_key

    cfg = resolve("evaluate", {"evaluate": {"protocol": "strong", "apgd_steps": 7}}, {"eot": 3})
    p = protocol_from_config(cfg)
    assert p.name == "strong" and p.apgd_steps == 7 and p.eot == 3
    assert [round(e * 255) for e in p.eps] == [2, 4, 8] and p.square_queries == 5000  # not given: the preset's
    plain = resolve("evaluate", {}, {})
    assert "given" not in plain  # without a protocol: the settings (and reproduce's keys) of before
    before = {k: v for k, v in plain.items() if k not in ("protocol", "chunk", "cascade", "early_exit")}
    assert settings_key(plain) == settings_key(before)


def test_ann_target_plain_autograd_one_draw():
    pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    ann = ANN(get_spec("tiny", 10)).eval()
    x, y = data(ann, n=6)
    for name, over in (("paper", {}), ("strong", {"apgd_steps": 2, "square_queries": 5, "eps": [8 / 255]})):
        r = evaluate_protocol(ann, x, y, resolve_protocol(name, over), batch_size=4)
        assert r["eval_draws"] == 1 and r["eot"] == 1 and r["sharpness"] is None
        assert {row["estimator"] for row in r["rows"]} <= {"autograd", "none"}
        assert all(row["eot"] == 1 and row["draws"] == 1 for row in r["rows"])
