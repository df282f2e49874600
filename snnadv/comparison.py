"""Protocol results side by side: the paper's Table 1 (whitebox) under ``paper`` and under
a stronger protocol, with paired tests (``snnadv compare``).

A protocol result (:func:`snnadv.attacks.run_protocol.evaluate_protocol`, as written by
``snnadv evaluate --protocol``) keeps, per image and encoder draw, whether the model was
right clean, after each attack of the cascade (the running worst case) and under the
final worst case.  So one result gives several *stages* on the same images:

* ``clean``;
* ``paper``: the running worst case after the paper's attacks (FGSM and PGD-7 with the
  paper's gradient), when the protocol runs them first (``paper``, ``strong-cpu``);
* the protocol's own name (e.g. ``strong-cpu``): the final per-sample worst case.

:func:`compare_results` puts models evaluated on the same images side by side: each
stage's accuracy with its 95 % Wilson interval and spread over draws
(:func:`snnadv.stats.accuracy_stats`); per model, how much the stronger protocol takes
off the paper's number (paired over images: exact McNemar and a paired bootstrap
interval, :func:`snnadv.stats.compare`); per stage, each model minus the reference model
(e.g. SNN-BP - ANN); and one verdict line per model on whether its advantage over the
reference under ``paper`` survives the strongest stage.  Computation only (no files).
"""

from __future__ import annotations

import numpy as np

from .errors import SnnadvError
from .evaluation import decode_correct
from .stats import accuracy_stats, compare

PAPER_STAGE = "paper"


def stages(result: dict) -> dict[str, list[np.ndarray]]:
    """``{stage: [per eps: [draws, images] 0/1]}`` of one protocol result (see the module
    docstring); the paper stage only when the protocol's first rows are the paper's
    attacks and a stronger attack follows them (else it is the final stage itself)."""
    corr = result.get("correct") or {}
    if "clean" not in corr or "worst" not in corr:
        raise SnnadvError("the result has no per-image correctness (write it with snnadv evaluate --protocol)")
    n_eps = len(result["eps"])
    clean = np.asarray(decode_correct(corr["clean"]), dtype=np.int8)
    out = {"clean": [clean] * n_eps}
    rows, cum = result.get("rows", []), corr.get("cumulative")
    last_paper = max((i for i, r in enumerate(rows) if r.get("group") == "paper"), default=None)
    if last_paper is not None and cum is not None and last_paper < len(rows) - 1:
        out[PAPER_STAGE] = [np.asarray(decode_correct(c), dtype=np.int8) for c in cum[last_paper]]
    out[result["protocol"]] = [np.asarray(decode_correct(w), dtype=np.int8) for w in corr["worst"]]
    return out


def same_images(results: dict[str, dict]) -> None:
    """Refuse results that were not computed on the same images (and eps)."""
    ids = {}
    for name, r in results.items():
        d = r.get("data") or {}
        cfg = r.get("config") or {}
        ident = (d.get("images"), d.get("labels")) if d.get("images") else \
            ("config", cfg.get("data_dir"), cfg.get("test_subset"), (r.get("target") or {}).get("dataset"))
        ids[name] = (ident, r.get("images"), tuple(round(float(e), 8) for e in r["eps"]))
    first = next(iter(ids))
    for name, ident in ids.items():
        if ident[1] != ids[first][1] or ident[0] != ids[first][0]:
            raise SnnadvError(f"'{name}' and '{first}' were not evaluated on the same images "
                              f"({ident[1]} vs {ids[first][1]} images); a paired comparison needs the same test set")
        if ident[2] != ids[first][2]:
            raise SnnadvError(f"'{name}' and '{first}' used different eps ({list(ident[2])} vs {list(ids[first][2])})")


def verdict(name: str, ref: str, weak: dict, strong: dict, strong_stage: str) -> str:
    """One line: does ``name``'s advantage over ``ref`` under the paper's attacks survive
    the strongest stage?  Judged by the paired tests at 5 %."""
    if not weak["significant"] or weak["diff"] <= 0:
        return (f"{name} has no significant advantage over {ref} under the paper's attacks "
                f"({weak['diff']:+.1f} points, p={weak['p']:.2g}); nothing to survive.")
    if strong["significant"] and strong["diff"] > 0:
        kept = strong["diff"] / weak["diff"]
        how = "survives" if kept >= 0.5 else "survives, shrunk"
        return (f"{name}'s advantage over {ref} {how} {strong_stage}: {weak['diff']:+.1f} -> {strong['diff']:+.1f} "
                f"points (p={strong['p']:.2g}, {100 * kept:.0f} % of it kept).")
    return (f"{name}'s advantage over {ref} does not survive {strong_stage}: {weak['diff']:+.1f} -> "
            f"{strong['diff']:+.1f} points (p={strong['p']:.2g}, not significant or reversed).")


def compare_results(results: dict[str, dict], reference: str | None = None, seed: int = 0) -> dict:
    """Side by side (see the module docstring).  ``results``: ``{model name: protocol
    result}`` in display order; ``reference``: the model the others are compared with
    (default the first).  Returns a JSON-ready dict."""
    if len(results) < 1:
        raise SnnadvError("compare needs at least one result")
    names = list(results)
    reference = reference or names[0]
    if reference not in results:
        raise SnnadvError(f"reference '{reference}' is not one of the results ({', '.join(names)})")
    same_images(results)
    per = {n: stages(r) for n, r in results.items()}
    order = ["clean"]
    for n in names:
        for s in per[n]:
            if s not in order:
                order.append(s)
    eps = [float(e) for e in results[names[0]]["eps"]]
    labels = results[names[0]].get("eps_labels") or [f"{e:.4g}" for e in eps]
    out = {"models": names, "reference": reference, "stages": order, "eps": eps, "eps_labels": labels,
           "images": results[names[0]]["images"], "accuracy": {}, "stronger": {}, "versus": {}, "verdicts": [],
           "sources": {n: {"protocol": r["protocol"], "target": (r.get("target") or {}).get("path"),
                           "stochastic": r.get("stochastic"), "eval_draws": r.get("eval_draws"),
                           "mode": r.get("mode") if r.get("mode") in ("whitebox", "transfer") else "whitebox",
                           "crafted_on": (r.get("source") or {}).get("path")}
                       for n, r in results.items()}}
    for n in names:
        out["accuracy"][n] = {s: [accuracy_stats(c) for c in per[n][s]] for s in per[n]}
        final = results[n]["protocol"]
        if PAPER_STAGE in per[n] and final != PAPER_STAGE:  # how much the stronger protocol takes off
            out["stronger"][n] = {"from": PAPER_STAGE, "to": final,
                                  "test": [compare(f, p, seed) for f, p in zip(per[n][final], per[n][PAPER_STAGE])]}
    for n in names:
        if n == reference:
            continue
        out["versus"][n] = {s: [compare(a, b, seed) for a, b in zip(per[n][s], per[reference][s])]
                            for s in order if s in per[n] and s in per[reference]}
        shared = [s for s in order if s in out["versus"][n] and s != "clean"]
        if PAPER_STAGE in shared and shared[-1] != PAPER_STAGE:
            for j, lab in enumerate(labels):
                weak, strong = out["versus"][n][PAPER_STAGE][j], out["versus"][n][shared[-1]][j]
                out["verdicts"].append(f"eps {lab}: " + verdict(n, reference, weak, strong, shared[-1]))
    return out
