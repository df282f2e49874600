"""``snnadv compare``: protocol results side by side with paired tests (snnadv.comparison)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from snnadv.comparison import compare_results, stages
from snnadv.errors import SnnadvError
from snnadv.evaluation import encode_correct
from snnadv.stats import mcnemar

N = 60


def result(protocol, clean, after_paper, worst, *, draws=1, images="h1"):
    """A protocol result as ``snnadv evaluate --protocol`` writes it (per-image 0/1 per draw):
    rows FGSM, PGD-7 (the paper's) then APGD when ``protocol`` is not paper."""
    import torch

    enc = lambda a: encode_correct(torch.as_tensor(np.asarray(a, dtype=bool).reshape(draws, N)))  # noqa: E731
    rows = [{"group": "paper", "label": "FGSM"}, {"group": "paper", "label": "PGD-7"}]
    cum = [[enc(after_paper)], [enc(after_paper)]]
    if protocol != "paper":
        rows.append({"group": "library", "label": "APGD-CE-25"})
        cum.append([enc(worst)])
    return {"protocol": protocol, "eps": [8 / 255], "eps_labels": ["8/255"], "images": N, "rows": rows,
            "eval_draws": draws, "stochastic": draws > 1, "target": {"path": f"{protocol}.pt"},
            "data": {"images": images, "labels": "l1"},
            "correct": {"clean": enc(clean), "worst": [enc(worst)], "cumulative": cum}}


def ones(k):
    a = np.zeros(N, dtype=int)
    a[:k] = 1
    return a


def test_stages_and_paired_tests_match_hand_counts():
    ann = result("strong-cpu", ones(50), ones(2), ones(1))
    # the SNN: 2 draws; right on images 0..44 clean, 0..19 after the paper, 0..4 under the strong worst case
    snn = result("strong-cpu", np.tile(ones(45), 2), np.tile(ones(20), 2), np.tile(ones(5), 2), draws=2)
    st = stages(snn)
    assert list(st) == ["clean", "paper", "strong-cpu"] and st["paper"][0].shape == (2, N)
    c = compare_results({"ANN": ann, "SNN-BP": snn})
    assert c["stages"] == ["clean", "paper", "strong-cpu"]
    acc = c["accuracy"]["SNN-BP"]
    assert [acc[s][0]["mean"] for s in c["stages"]] == pytest.approx([75.0, 100 / 3, 100 / 12])
    # SNN-BP - ANN after the paper's attacks: 18 images only the SNN gets right, none only the ANN
    vs = c["versus"]["SNN-BP"]["paper"][0]
    assert (vs["only_a"], vs["only_b"]) == (18, 0) and vs["p"] == pytest.approx(mcnemar(18, 0))
    assert vs["diff"] == pytest.approx(100 * 18 / N) and vs["significant"]
    strong = c["versus"]["SNN-BP"]["strong-cpu"][0]
    assert (strong["only_a"], strong["only_b"]) == (4, 0) and not strong["significant"]  # p = 0.125
    # the stronger protocol's cut on the SNN: 15 images fall, none rise (the cascade only removes)
    cut = c["stronger"]["SNN-BP"]["test"][0]
    assert (cut["only_a"], cut["only_b"]) == (0, 15) and cut["diff"] == pytest.approx(-25.0)
    assert len(c["verdicts"]) == 1 and "does not survive strong-cpu" in c["verdicts"][0]


def test_verdict_survives_and_no_advantage():
    ann = result("strong-cpu", ones(50), ones(2), ones(1))
    snn = result("strong-cpu", ones(50), ones(30), ones(25))
    assert "survives strong-cpu: +46.7 -> +40.0" in compare_results({"ANN": ann, "SNN": snn})["verdicts"][0]
    same = result("strong-cpu", ones(50), ones(2), ones(1))
    assert "no significant advantage" in compare_results({"ANN": ann, "B": same})["verdicts"][0]
    paper = result("paper", ones(50), ones(2), ones(2))
    assert list(stages(paper)) == ["clean", "paper"]  # the paper protocol: its worst case is the paper stage


def test_refuses_results_on_other_images():
    ann = result("strong-cpu", ones(50), ones(2), ones(1))
    other = result("strong-cpu", ones(50), ones(2), ones(1), images="h2")
    with pytest.raises(SnnadvError, match="not evaluated on the same images"):
        compare_results({"ANN": ann, "X": other})
    with pytest.raises(SnnadvError, match="reference 'Z'"):
        compare_results({"ANN": ann}, reference="Z")


def test_cli_compare_writes_json_and_markdown_and_refuses_bad_input(tmp_path, capsys):
    from cli.main import main

    ann = result("strong-cpu", ones(50), ones(2), ones(1))
    snn = result("strong-cpu", ones(50), ones(30), ones(25))
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "bp.json").write_text(json.dumps(snn))
    (tmp_path / "junk.json").write_text("{not json")
    out = tmp_path / "cmp.json"

    def run(*args):
        code = main(["compare", *map(str, args)])
        return code or 0, capsys.readouterr()

    code, io = run(f"ANN={tmp_path / 'ann.json'}", f"SNN-BP={tmp_path / 'bp.json'}", "--out", out)
    assert code == 0 and "survives" in io.out
    got = json.loads(out.read_text())
    assert got["models"] == ["ANN", "SNN-BP"] and got["versus"]["SNN-BP"]["paper"][0]["only_a"] == 28
    assert "| SNN-BP | strong-cpu |" in out.with_suffix(".md").read_text()
    for args, msg in (((f"ANN={tmp_path / 'junk.json'}",), "not a readable JSON"),
                      ((f"ANN={tmp_path / 'nope.json'}",), "no result file"),
                      (("ANN",), "is not NAME=RESULT.json"),
                      ((f"A={tmp_path / 'ann.json'}", f"A={tmp_path / 'bp.json'}"), "must be distinct"),
                      ((f"ANN={tmp_path / 'ann.json'}", "--out", out), "exists")):
        code, io = run(*args)
        assert code == 2 and msg in io.err and "Traceback" not in io.err and len(io.err.strip().splitlines()) == 1
