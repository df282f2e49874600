"""Transfer (blackbox) protocols: ``snnadv evaluate --protocol NAME --source-ckpt S``
(:func:`snnadv.attacks.run_protocol.evaluate_protocol` with ``source=``,
:func:`snnadv.adaptive.run_protocol`).

The attacks are crafted on the source and scored on the target with the target's keyed
evaluation draws.  Checked here: with the source the target itself the run is the
whitebox one, image by image and draw by draw (an ANN and an SNN); the clean
correctness pairs with the whitebox run's; the cascade only attacks images still
correct on the target, and robust accuracy never exceeds clean; every row and the
result say the mode and the source; Square is left out; bad sources are one line and a
non-zero exit; an interrupted run resumes to the same result, and its pieces are never
a whitebox run's.  Tiny random-weight models (``tiny``, T <= 4), seconds each.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import replace

import pytest
import torch
from test_protocols import EPS, _Store, data, small_snn

from snnadv.attacks.cascade import run_cascade
from snnadv.attacks.protocols import Protocol, resolve_protocol
from snnadv.attacks.run_protocol import evaluate_protocol, protocol_attacks
from snnadv.models import ANN, get_spec

#: every attack of the package (no Square: it has no transfer form), both early exits on
ALL_OURS = Protocol("t", "test: FGSM, PGD (best, early exit), APGD-CE/DLR", eps=tuple(EPS),
                    attacks=("fgsm", "pgd", "apgd-ce", "apgd-dlr"), paths="paper", eot=2, eval_draws=2, steps=3,
                    apgd_steps=3, chunk=5, early_exit=True)


def small_ann(seed=0):
    torch.manual_seed(seed)
    return ANN(get_spec("tiny", 10)).eval()


def same_cells(a: dict, b: dict) -> list:
    """Per row: (label, estimator, images attacked, robust accuracy) of every eps (no seconds)."""
    return [[(r["label"], r["estimator"], c["attacked"], c["cumulative"]) for c in r["cells"]] for r in a["rows"]] \
        == [[(r["label"], r["estimator"], c["attacked"], c["cumulative"]) for c in r["cells"]] for r in b["rows"]]


def equal_correct(a: dict, b: dict) -> bool:
    return torch.equal(a["correct"]["clean"], b["correct"]["clean"]) and \
        all(torch.equal(x, y) for x, y in zip(a["correct"]["worst"], b["correct"]["worst"]))


# --------------------------------------------------------------------------- (a) source == target
@pytest.mark.parametrize("kind", ["ann", "snn"])
def test_transfer_from_the_target_itself_is_the_whitebox_run(kind):
    """The same weights as a separate source model: every row, the worst case and the
    clean matrix equal the whitebox run's without early exit (a transfer run never exits early)."""
    model = small_ann() if kind == "ann" else small_snn(T=4)
    x, y = data(model)
    kw = dict(seed=3, batch_size=5)
    no_exit = dataclasses.replace(ALL_OURS, early_exit=False)
    white = evaluate_protocol(model, x, y, no_exit, **kw)
    source = copy.deepcopy(model)
    info = {"path": "same.pt", "sha256": "0" * 64, "stage": kind, "kind": kind, "arch": "tiny"}
    tr = evaluate_protocol(model, x, y, ALL_OURS, source=source, source_info=info, **kw)  # exit asked: turned off
    assert white["mode"] == "whitebox" and white["source"] is None
    assert tr["mode"] == "transfer" and tr["source"] == info and tr["skipped_attacks"] == []
    assert equal_correct(tr, white) and same_cells(tr, white)
    assert tr["worst_case"] == white["worst_case"] and tr["clean"] == white["clean"]
    assert all(r["mode"] == "transfer" and r["source"] == info for r in tr["rows"])
    assert all(r["mode"] == "whitebox" and r["source"] is None for r in white["rows"])
    assert [(r["early_exit"], r["exit_test"]) for r in tr["rows"]] == [(False, None)] * 4  # no exit in transfer
    assert tr["correct"]["worst"][-1].sum() < tr["correct"]["clean"].sum()  # the attacks did something


# --------------------------------------------------------------------------- (b), (c) another source
def test_transfer_pairs_with_whitebox_and_the_cascade_follows_the_target():
    """An ANN source, an SNN target: clean correctness is the whitebox run's (pairable);
    the attacks are the source's (autograd, no EOT) scored on the target's draws; each
    attack runs only on images still correct on the target; robust <= clean."""
    pytest.importorskip("torchattacks")
    target, source = small_snn(T=4), small_ann(seed=5)
    x, y = data(target)
    p = resolve_protocol("quick", {"eps": EPS, "chunk": 5, "apgd_steps": 3})
    kw = dict(seed=2, batch_size=6)
    white = evaluate_protocol(target, x, y, p, **kw)
    tr = evaluate_protocol(target, x, y, p, source=source, source_info={"stage": "ann"}, **kw)
    assert torch.equal(tr["correct"]["clean"], white["correct"]["clean"]) and tr["clean"] == white["clean"]
    assert tr["eval_draws"] == white["eval_draws"] == 2 and tr["eot"] == 1
    # Square is a query attack: left out of the transfer run, and said so
    assert [r["label"] for r in white["rows"]] == ["FGSM", "APGD-CE-3", "Square-50"]
    assert [r["label"] for r in tr["rows"]] == ["FGSM", "APGD-CE-3"]
    assert len(tr["skipped_attacks"]) == 1 and tr["skipped_attacks"][0].startswith("Square-50")
    assert all(r["estimator"] == "autograd" and r["eot"] == 1 and r["draws"] == 2 for r in tr["rows"])
    for j in range(len(EPS)):  # the running worst case only falls, never above clean
        cum = [r["cells"][j]["cumulative"]["mean"] for r in tr["rows"]]
        assert cum == sorted(cum, reverse=True) and cum[-1] == tr["worst_case"][j]["mean"] <= tr["clean"]["mean"]
        assert not (tr["correct"]["worst"][j] & ~tr["correct"]["clean"]).any()  # per image and draw
    # the pieces attacked: only images still correct on the TARGET (some draw) under the worst case so far
    made = protocol_attacks(source, p, seed=2, batch_size=6, transfer=True)
    store = _Store()
    run = run_cascade(target, x, y, made["attacks"], EPS, draws=2, seed=2, batch_size=6, chunk=5, store=store)
    keys = [k for k, _ in made["attacks"]]
    names = [list(map(str, k)) for k in keys]  # as the pieces name them
    attacked = 0
    for what in map(json.loads, store.data):
        j = EPS.index(what["eps"])
        a = names.index(what["attack"])
        before = run.clean if a == 0 else run.cumulative[keys[a - 1]][j]
        assert before[:, what["alive"]].any(0).all()
        attacked += len(what["alive"])
    assert attacked == sum(sum(run.attacked[k]) for k in keys) > 0
    # the same transfer attack ran every image without the cascade: the same worst case (keyed FGSM)
    fgsm = made["attacks"][:1]
    casc = run_cascade(target, x, y, fgsm, EPS, draws=2, seed=2, batch_size=6, chunk=5)
    full = run_cascade(target, x, y, fgsm, EPS, draws=2, seed=2, batch_size=6, chunk=5, cascade=False)
    assert all(torch.equal(a, b) for a, b in zip(casc.worst, full.worst))


def test_sharpness_search_and_estimators_are_the_sources():
    """An SNN source, an ANN target: the source's estimators and EOT, its sharpness search
    (the ANN target alone would have none), the target's single draw."""
    pytest.importorskip("torchattacks")
    target, source = small_ann(), small_snn(T=3)
    x, y = data(target, n=4)
    hx, hy = data(source, n=4, seed=9)
    p = resolve_protocol("strong", {"eps": [8 / 255], "apgd_steps": 2, "eot": 2, "eval_draws": 2,
                                    "paths": "alg1,bptt-fast-sigmoid"})
    p = Protocol(**{**p.to_dict(), "eps": tuple(p.eps), "attacks": ("apgd-ce", "square"), "sharpness_iters": 2,
                    "sharpness_images": 4})
    r = evaluate_protocol(target, x, y, p, source=source, source_info={"stage": "snn-bp"}, heldout=(hx, hy),
                          batch_size=4)
    assert r["sharpness"]["held_out"] and r["eval_draws"] == 1 and r["eot"] == 2
    assert [(row["estimator"], row["eot"], row["draws"]) for row in r["rows"]] == [
        ("alg1", 2, 1), ("bptt-fast-sigmoid", 2, 1)]
    assert r["rows"][1]["slope"] == r["sharpness"]["best"]
    assert all(row["early_exit"] is False and row["exit_test"] is None for row in r["rows"])


# --------------------------------------------------------------------------- the command line
def _save(path, model, dataset="cifar10", stage=None):
    from snnadv.checkpoint import model_settings, save_checkpoint, weights

    stage = stage or ("ann" if isinstance(model, ANN) else "snn-conv")
    return save_checkpoint(path, {
        "stage": stage, "dataset": dataset, "spec": model.spec.to_dict(), "model": model_settings(model),
        "state_dict": weights(model), "config": {}, "metrics": {}, "parent": None, "train_state": None})


@pytest.fixture
def ckpts(tmp_path):
    return {"snn": _save(tmp_path / "snn.pt", small_snn(T=4)), "ann": _save(tmp_path / "ann.pt", small_ann(seed=5))}


def _cfg(shared_data, out, protocol="quick", **kw):
    from snnadv.config import resolve

    return resolve("evaluate", flags=dict(protocol=protocol, data_dir=str(shared_data), device="cpu", test_subset=30,
                                          batch_size=8, quiet=True, chunk=10, out=str(out), **kw))


def test_cli_transfer_from_the_same_file_pairs_with_whitebox(tmp_path, shared_data, ckpts, capsys):
    """``--source-ckpt`` = ``--target-ckpt``: the rows the two runs share are equal, image by
    image (the JSON's per-image correctness), the table says "crafted on", the JSON the
    mode, the source (path, sha256, kind) and the left-out Square."""
    pytest.importorskip("torchattacks")
    from snnadv.cli.main import main

    base = ["evaluate", "--target-ckpt", str(ckpts["snn"]), "--protocol", "quick", "--data-dir", str(shared_data),
            "--device", "cpu", "--test-subset", "30", "--batch-size", "8", "--chunk", "10"]
    assert main(base + ["--quiet", "--no-early-exit", "--out", str(tmp_path / "w.json")]) == 0
    assert main(base + ["--source-ckpt", str(ckpts["snn"]), "--out", str(tmp_path / "t.json")]) == 0
    printed = capsys.readouterr()
    said = " ".join((printed.out + printed.err).split())
    assert "transfer: crafted on snn-conv tiny (snn.pt)" in said, said  # the table's title
    assert "square left out" in said  # the warning
    w, t = (json.loads((tmp_path / f).read_text()) for f in ("w.json", "t.json"))
    assert w["mode"] == "whitebox" and t["mode"] == "transfer" and w["source"] is None
    assert t["source"]["sha256"] == w["target"]["sha256"] and t["source"]["kind"] == "snn-conv"
    assert t["source"]["path"] == str(ckpts["snn"]) and all(r["mode"] == "transfer" for r in t["rows"])
    assert t["skipped_attacks"] and any("square left out" in x for x in t["warnings"])
    assert t["correct"]["clean"] == w["correct"]["clean"] and t["clean"] == w["clean"]
    assert [r["label"] for r in t["rows"]] == [r["label"] for r in w["rows"]][:2]  # FGSM, APGD-CE; no Square
    for rt, rw in zip(t["rows"], w["rows"]):
        assert [c["cumulative"] for c in rt["cells"]] == [c["cumulative"] for c in rw["cells"]]
    # without Square the whitebox run's worst case is the transfer run's, image by image
    from snnadv.adaptive import run_protocol

    kw = dict(protocol="paper", target_ckpt=str(ckpts["snn"]), eval_draws=2)
    w2 = run_protocol(_cfg(shared_data, tmp_path / "w2.json", **kw))
    t2 = run_protocol(_cfg(shared_data, tmp_path / "t2.json", source_ckpt=str(ckpts["snn"]), **kw))
    assert w2["protocol"] == t2["protocol"] == "paper" and t2["mode"] == "transfer"
    assert t2["correct"] == w2["correct"] and t2["worst_case"] == w2["worst_case"]  # per image and draw
    md = (tmp_path / "t-evaluate.md").read_text()
    assert "transfer: crafted on snn-conv tiny (snn.pt)" in md and "Transfer: every attack crafted on" in md
    # --source-timesteps: the source at another T (reproduce: conv_ii at the table's conv_timesteps)
    t3 = run_protocol(_cfg(shared_data, tmp_path / "t3.json", source_ckpt=str(ckpts["snn"]), source_timesteps=2, **kw))
    assert t3["source"]["num_steps"] == 2 and t3["target"]["num_steps"] == w2["target"]["num_steps"] != 2


def test_cli_transfer_resumes_and_never_shares_whitebox_pieces(tmp_path, shared_data, ckpts):
    """Interrupted after one piece, the rerun gives the uninterrupted run's result; a
    whitebox run writing to the same place computes its own pieces."""
    pytest.importorskip("torchattacks")
    from snnadv.adaptive import run_protocol

    def cfg(name, **kw):
        return _cfg(shared_data, tmp_path / name / "r.json", target_ckpt=str(ckpts["snn"]),
                    source_ckpt=str(ckpts["ann"]), **kw)

    ref = run_protocol(cfg("ref"))
    assert ref["mode"] == "transfer" and ref["pieces"]["computed"] > 1
    with pytest.raises(RuntimeError, match="interrupted"):
        run_protocol(cfg("run"), fail_after=1)
    got = run_protocol(cfg("run"))
    assert got["pieces"] == {"computed": ref["pieces"]["computed"] - 1, "resumed": 1}
    assert got["worst_case"] == ref["worst_case"] and got["correct"] == ref["correct"]
    assert [[c["cumulative"] for c in r["cells"]] for r in got["rows"]] == \
        [[c["cumulative"] for c in r["cells"]] for r in ref["rows"]]
    white = run_protocol({**cfg("run", overwrite=True), "source_ckpt": None})
    assert white["mode"] == "whitebox" and white["pieces"]["resumed"] == 0


def test_cli_bad_sources_are_one_line_errors(tmp_path, shared_data, ckpts, capsys):
    from snnadv.cli.main import main

    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(b"PK\x03\x04 not a checkpoint")
    torch.manual_seed(0)
    c100 = _save(tmp_path / "c100.pt", ANN(get_spec("tiny", 100)), dataset="cifar100")
    s16 = _save(tmp_path / "s16.pt", ANN(replace(get_spec("tiny", 10), image_size=16)))  # 16 x 16 inputs
    base = ["evaluate", "--target-ckpt", str(ckpts["snn"]), "--data-dir", str(shared_data), "--device", "cpu",
            "--test-subset", "8", "--quiet", "--out", str(tmp_path / "o.json")]
    cases = [(["--protocol", "quick", "--source-ckpt", str(tmp_path / "missing.pt")], ["--source-ckpt", "missing.pt"]),
             (["--protocol", "quick", "--source-ckpt", str(garbled)], ["--source-ckpt", "garbled.pt"]),
             (["--protocol", "quick", "--source-ckpt", str(c100)], ["cifar100"]),
             (["--protocol", "quick", "--source-ckpt", str(s16)], ["different sizes"]),
             (["--protocol", "quick", "--blackbox-ckpt", str(ckpts["ann"])], ["--source-ckpt"]),
             (["--suite", "paper", "--source-ckpt", str(ckpts["ann"])], ["--protocol"])]
    for extra, words in cases:
        rc = main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2, (extra, err)
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
        assert all(w in lines[0] for w in words), (words, err)
    assert not (tmp_path / "o.json").exists()
