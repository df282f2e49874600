"""Statistics of the tables: Wilson intervals, exact McNemar, paired bootstrap, the paper beside ours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from snnadv import stats


# --------------------------------------------------------------------------- the statistics
def test_wilson_known_values():
    lo, hi = stats.wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    lo, hi = stats.wilson(0, 10)  # Wilson stays inside [0, 1] and is not degenerate at 0 %
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = stats.wilson(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)


def test_mcnemar_exact_known_values():
    assert stats.mcnemar(1, 9) == pytest.approx(0.02148, abs=1e-5)
    assert stats.mcnemar(9, 1) == stats.mcnemar(1, 9)
    assert stats.mcnemar(5, 5) == 1.0 and stats.mcnemar(0, 0) == 1.0
    assert stats.mcnemar(0, 6) == pytest.approx(2 * 0.5 ** 6)


def test_paired_bootstrap_is_the_image_bootstrap():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.6).astype(float)
    b = np.where(rng.random(300) < 0.8, a, 1 - a)
    lo, hi = stats.paired_bootstrap(a, b, n_boot=20000, seed=3)
    # the naive bootstrap (resample image indices) gives the same interval up to Monte Carlo noise
    idx = rng.integers(0, 300, size=(20000, 300))
    naive = np.quantile((a[idx] - b[idx]).mean(axis=1), [0.025, 0.975])
    assert lo == pytest.approx(naive[0], abs=0.01) and hi == pytest.approx(naive[1], abs=0.01)
    assert lo < a.mean() - b.mean() < hi
    assert stats.paired_bootstrap(a, a) == (0.0, 0.0)
    assert stats.paired_bootstrap(a, b, seed=5) == stats.paired_bootstrap(a, b, seed=5)


def test_majority_vote_ties_follow_the_first_draw():
    correct = [[1, 0, 1, 0, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 1], [0, 1, 1, 0, 1]]
    # scores 3/4, 2/4 (tie, first draw 0), 2/4 (tie, first draw 1), 0, 3/4
    assert stats.majority(correct).tolist() == [1, 0, 1, 0, 1]
    assert stats.per_image(correct).tolist() == [0.75, 0.5, 0.5, 0.0, 0.75]


def test_compare_and_accuracy_stats():
    a = np.array([[1] * 30 + [0] * 10])          # 75 %
    b = np.array([[1] * 18 + [0] * 22])          # 45 %, same images: A right on 12 more, never worse
    c = stats.compare(a, b)
    assert c["diff"] == pytest.approx(30.0) and (c["only_a"], c["only_b"]) == (12, 0)
    assert c["p"] == pytest.approx(2 * 0.5 ** 12) and c["significant"]
    assert c["ci95"][0] > 0
    s = stats.accuracy_stats(np.array([[1] * 8 + [0] * 2, [1] * 6 + [0] * 4]))
    assert (s["mean"], s["min"], s["max"]) == (70.0, 60.0, 80.0) and s["draws"] == [80.0, 60.0]
    assert s["ci95"] == pytest.approx([100 * x for x in stats.wilson(7, 10)])
    with pytest.raises(ValueError):
        stats.compare(a, b[:, :20])


# --------------------------------------------------------------------------- per-sample accuracies
def test_accuracy_on_keeps_per_sample_correctness():
    from snnadv.evaluation import accuracy_on, decode_correct
    from snnadv.models import ANN, SNN
    from snnadv.models.spec import get_spec

    torch.manual_seed(0)
    spec = get_spec("tiny", 10)
    images, labels = torch.rand(24, 3, 32, 32), torch.randint(0, 10, (24,))
    snn = SNN(spec, num_steps=4)
    plain = accuracy_on(snn, images, labels, batch_size=10, draws=3, seed=7)
    full = accuracy_on(snn, images, labels, batch_size=10, draws=3, seed=7, per_sample=True)
    assert full["draws"] == plain["draws"] and full["mean"] == pytest.approx(plain["mean"])
    rows = decode_correct(full["correct"])
    assert len(rows) == 3 and all(len(r) == 24 for r in rows)
    assert [100 * sum(r) / 24 for r in rows] == pytest.approx(plain["draws"])
    assert full["ci95"][0] <= full["mean"] <= full["ci95"][1] and full["min"] <= full["max"]
    ann = accuracy_on(ANN(spec), images, labels, draws=3, per_sample=True)
    assert len(ann["correct"]) == 1  # deterministic: one draw


# --------------------------------------------------------------------------- tables and the paper
def _cell(bits: list[int]) -> dict:
    from snnadv.evaluation import encode_correct

    c = torch.tensor([bits], dtype=torch.bool)
    return {**stats.accuracy_stats(c.numpy()), "correct": encode_correct(c)}


def _result(n=400, bb_bp=0.5, bb_ann=0.2, conv_delta=0, t2_snn=0.6):
    """A table result on n images: cell accuracies set by how many images are right (nested sets)."""
    cell = lambda frac: _cell([1] * int(frac * n) + [0] * (n - int(frac * n)))  # noqa: E731
    roles = {"ann": bb_ann, "snn_conv": bb_ann + conv_delta, "snn_bp": bb_bp}
    t1 = {"clean": {r: cell(0.9) for r in roles},
          "whitebox": {a: {r: cell(0.1) for r in roles} for a in ("fgsm", "pgd")},
          "blackbox": {a: {r: cell(f) for r, f in roles.items()} for a in ("fgsm", "pgd")}}
    t2 = {a: {"ann_ii": {**t1["blackbox"][a]}, "snn_conv_ii": {r: cell(t2_snn) for r in roles},
              "snn_bp_ii": {r: cell(t2_snn) for r in roles}} for a in ("fgsm", "pgd")}
    info = {"arch": "vgg5", "dataset": "cifar10", "stage": "ann", "path": "ann.pt", "sha256": "0" * 64}
    return {"settings": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 7, "random_start": False},
            "gradient": "alg1", "eval_draws": 1, "images": n, "models": {"ann": info},
            "table1": t1, "table2": t2}


def test_tables_mark_significant_differences():
    from snnadv.robustness import comparisons, tables_markdown

    r = _result(bb_bp=0.5, bb_ann=0.2)
    r["comparisons"] = comparisons(r)
    by_label = {c["label"]: c for c in r["comparisons"]}
    bb = by_label["Table 1 blackbox FGSM: SNN-BP − ANN (Δ)"]
    assert bb["diff"] == pytest.approx(30.0) and bb["significant"] and (bb["only_a"], bb["only_b"]) == (120, 0)
    wb = by_label["Table 1 whitebox FGSM: SNN-BP − ANN (Δ)"]
    assert wb["diff"] == 0 and not wb["significant"] and wb["p"] == 1.0
    md = tables_markdown(r)
    assert "+30.0* [" in md and "+0.0 [" in md and "McNemar" in md
    assert "20.0 [16.4, 24.2]" in md  # Wilson interval of 80/400 beside the accuracy
    assert json.loads(json.dumps(r))["comparisons"][0]["p"] == r["comparisons"][0]["p"]


def test_claims_are_judged_with_the_tests():
    from snnadv.paper import claims
    from snnadv.robustness import comparisons

    r = _result(bb_bp=0.5, bb_ann=0.2, conv_delta=0, t2_snn=0.6)
    r["comparisons"] = comparisons(r)
    first, second, third = claims(r)
    assert "highest" in first and ": holds" in first
    assert "about as accurate" in second and ": holds" in second
    assert "ANN-crafted" in third and ": holds" in third
    # a small effect on few images: the same direction, honestly "not significant"
    small = _result(n=50, bb_bp=0.24, bb_ann=0.2, conv_delta=0.1, t2_snn=0.1)
    small["comparisons"] = comparisons(small)
    first, second, third = claims(small)
    assert "not significant" in first
    assert "does not hold" in second or "inconclusive" in second
    assert "does not hold" in third
    old = _result()
    assert "cannot be judged" in claims(old)[0]


def test_report_puts_the_paper_beside_ours(tmp_path):
    from snnadv.analysis import build_report
    from snnadv.paper import CITATION, TABLE1, TABLE2
    from snnadv.robustness import comparisons

    r = _result()
    r["comparisons"] = comparisons(r)
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "tables.json").write_text(json.dumps(r))
    text = build_report(tmp_path).read_text()
    assert CITATION in text
    paper_bb = TABLE1[("vgg5", "cifar10")]["blackbox"]["fgsm"]["snn_bp"]
    assert f"50.0 [45.1, 54.9] / {paper_bb:.1f}" in text          # ours [interval] / paper, one cell
    assert f" / {TABLE2[('vgg5', 'cifar10')]['pgd']['snn_bp_ii']['snn_conv']:.1f}" in text
    assert "/ +6.7" in text                                          # the paper's blackbox PGD Δ
    assert text.count("- SNN-BP has the highest") == 1 and "ANN-crafted attacks are stronger" in text
    # another architecture: said so, no invented numbers
    r["models"]["ann"]["arch"] = "tiny"
    (tmp_path / "tables" / "tables.json").write_text(json.dumps(r))
    assert "The paper has no tables for tiny" in build_report(tmp_path).read_text()
