"""The paper's Tables 1 and 2 as data, and its claims judged on our tables.

Values (accuracy, %) from S. Sharmin, N. Rathi, P. Panda, K. Roy, *Inherent
Adversarial Robustness of Deep Spiking Neural Networks: Effects of Discrete Input
Encoding and Non-Linear Activations*, ECCV 2020, Table 1 (FGSM eps = 8/255; PGD eps =
8/255, alpha = 2/255, 7 steps; blackbox = crafted on a separately trained ANN) and
Table 2 (VGG5, CIFAR-10, blackbox, ANN- vs SNN-crafted inputs).

Table 2 is stored as printed: rows are the sources (``*-II``), columns the targets
(``*-I``), the layout of :func:`snnadv.robustness.run_table`.  (The paper's text
reads its row 1 the other way round, "ANN-II attacked by ANN-I / SNN-conv-I /
SNN-BP-I": 18.9 / 32.7 / 31.3 %.  Either way ANN-crafted inputs are the stronger
attack on the ANN, the claim :func:`claims` checks.)

:func:`claims` states, one line each, whether the paper's three claims about these
tables hold on our models, judged with the paired tests of
:func:`snnadv.robustness.comparisons` (exact McNemar at 5 %, bootstrap intervals).
"""

from __future__ import annotations

from .robustness import find_comparison

CITATION = ("Sharmin, Rathi, Panda, Roy: Inherent Adversarial Robustness of Deep Spiking Neural Networks: "
            "Effects of Discrete Input Encoding and Non-Linear Activations, ECCV 2020")

ROLES = ("ann", "snn_conv", "snn_bp")


def _row(ann: float, conv: float, bp: float) -> dict:
    return dict(zip(ROLES, (ann, conv, bp)))


#: Table 1, keyed by (arch, dataset): clean, whitebox and blackbox accuracy (%)
TABLE1 = {
    ("vgg5", "cifar10"): {
        "clean": _row(90.0, 89.9, 89.3),
        "whitebox": {"fgsm": _row(10.4, 7.7, 15.0), "pgd": _row(1.8, 1.7, 3.8)},
        "blackbox": {"fgsm": _row(18.9, 19.3, 21.5), "pgd": _row(9.3, 9.6, 16.0)},
    },
    ("resnet20", "cifar10"): {
        "clean": _row(88.0, 87.5, 86.1),
        "whitebox": {"fgsm": _row(28.9, 28.8, 31.3), "pgd": _row(1.9, 1.4, 4.9)},
        "blackbox": {"fgsm": _row(56.7, 56.8, 56.8), "pgd": _row(41.5, 41.6, 46.5)},
    },
    ("vgg11", "cifar100"): {
        "clean": _row(67.1, 66.8, 64.4),
        "whitebox": {"fgsm": _row(17.1, 10.5, 15.5), "pgd": _row(8.5, 4.1, 6.3)},
        "blackbox": {"fgsm": _row(21.2, 21.4, 21.4), "pgd": _row(15.6, 15.8, 16.5)},
    },
}

#: Table 2 (VGG5, CIFAR-10): attack -> source (II) -> target (I) -> accuracy (%)
TABLE2 = {
    ("vgg5", "cifar10"): {
        "fgsm": {"ann_ii": _row(18.9, 32.7, 31.3), "snn_conv_ii": _row(19.2, 33.0, 31.4),
                 "snn_bp_ii": _row(21.5, 38.8, 32.9)},
        "pgd": {"ann_ii": _row(4.7, 31.7, 13.8), "snn_conv_ii": _row(11.6, 32.4, 14.3),
                "snn_bp_ii": _row(9.7, 43.6, 17.0)},
    },
}

#: "about equal": no significant difference and the 95 % interval of the difference inside +-2 points
EQUAL_MARGIN = 2.0


def paper_tables(result: dict) -> tuple[dict | None, dict | None]:
    """The paper's (Table 1, Table 2) for the architecture and dataset of ``result``'s models.

    Each accuracy is a cell like ours (``{"mean": value}``), so
    :func:`snnadv.robustness.table_rows` renders both the same way.
    """
    info = (result.get("models") or {}).get("ann") or {}
    key = (info.get("arch"), info.get("dataset"))
    return _cells(TABLE1.get(key)), _cells(TABLE2.get(key))


def _cells(table):
    if table is None or isinstance(table, float):
        return table if table is None else {"mean": table}
    return {k: _cells(v) for k, v in table.items()}


def _short(name: str, c: dict) -> str:
    return f"{name} {c['diff']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}], p = {c['p']:.3g}"


def _greater(name: str, found: list[tuple[str, dict]]) -> str:
    """Verdict for 'A > B in every listed comparison' (each c = A − B)."""
    details = "; ".join(_short(n, c) for n, c in found)
    if all(c["diff"] > 0 and c["significant"] for _, c in found):
        verdict = "holds (every difference positive and significant at 5 %)"
    elif all(c["diff"] > 0 for _, c in found):
        weak = sum(not c["significant"] for _, c in found)
        verdict = f"same direction, but {weak} of {len(found)} differences not significant"
    elif any(c["diff"] < 0 and c["significant"] for _, c in found):
        verdict = "does not hold (a significant difference the other way)"
    else:
        verdict = "does not hold (not every difference is positive; the reversals are not significant)"
    return f"{name}: {verdict} — {details}"


def _equal(name: str, found: list[tuple[str, dict]]) -> str:
    details = "; ".join(_short(n, c) for n, c in found)
    if any(c["significant"] for _, c in found):
        verdict = "does not hold (a significant difference)"
    elif all(-EQUAL_MARGIN <= c["ci95"][0] and c["ci95"][1] <= EQUAL_MARGIN for _, c in found):
        verdict = f"holds (no significant difference; every 95 % interval within ±{EQUAL_MARGIN:g} points)"
    else:
        verdict = (f"not significant, but inconclusive (an interval reaches beyond ±{EQUAL_MARGIN:g} points: "
                   "too few images to call them equal)")
    return f"{name}: {verdict} — {details}"


def claims(result: dict) -> list[str]:
    """One line per claim of the paper about Tables 1 and 2, judged on ``result``'s paired tests."""
    if not result.get("comparisons"):
        return ["The paper's claims cannot be judged: this table file has no per-image results "
                "(made by an older snnadv); run `snnadv table` again."]
    lines = []
    if "table1" in result:
        def get(atk: str, a: str, b: str) -> dict | None:
            return find_comparison(result, ("table1", "blackbox", atk, a), ("table1", "blackbox", atk, b))

        bb = [(f"{atk.upper()} vs {other}", get(atk, "snn_bp", key))
              for atk in ("fgsm", "pgd") for key, other in (("ann", "ANN"), ("snn_conv", "SNN-conv"))]
        lines.append(_greater("SNN-BP has the highest accuracy in every blackbox cell (Table 1)", bb))
        eq = [(atk.upper(), get(atk, "snn_conv", "ann")) for atk in ("fgsm", "pgd")]
        lines.append(_equal("SNN-conv is about as accurate as the ANN under blackbox attacks (Table 1, "
                            "SNN-conv − ANN)", eq))
    if "table2" in result:
        found = [(f"{atk.upper()} {src}-crafted − ANN-crafted",
                  find_comparison(result, ("table2", atk, key, "ann"), ("table2", atk, "ann_ii", "ann")))
                 for atk in ("fgsm", "pgd") for key, src in (("snn_conv_ii", "SNN-conv"), ("snn_bp_ii", "SNN-BP"))]
        lines.append(_greater("ANN-crafted attacks are stronger than SNN-crafted ones on the ANN (Table 2 row 1: "
                              "accuracy under SNN-crafted − under ANN-crafted inputs)", found))
    return lines
