"""Gradient-masking checks of an attack suite's result, and gradient statistics.

A stochastic encoder and surrogate gradients can make a weak attack look like
robustness (Athalye et al. 2018, Carlini et al. 2019).  :func:`sanity_flags` reads a
result of :func:`snnadv.attacks.suite.evaluate_model` and reports the signs of
gradient masking beside its numbers; :func:`gradient_stats` measures the gradients
themselves.

Sanity checks (:func:`sanity_flags`): each is ``{"flag": True/False/None, "explain",
"detail"}``; ``True`` means a warning sign, ``None`` not checked.  Accuracies are
compared with a tolerance (``flag_tol`` percentage points; default: one image, or
twice the standard error of the difference over the draws when K > 1, at least
1 point for a stochastic model evaluated on one draw).

* ``eps_not_monotone``: sweep accuracy rises with eps.
* ``eps_not_zero``: at the largest sweep eps (>= 32/255) accuracy is above
  ``zero_tol`` percent.
* ``stronger_attack_higher_acc``: a rung of the ladder (more steps, EOT samples,
  restarts) has higher accuracy than the rung before it.
* ``single_step_beats_iterative``: FGSM gets lower accuracy than every PGD run on
  the same gradient path (Carlini et al. 2019's checklist).
* ``square_beats_gradient`` / ``transfer_beats_gradient``: Square, or a transfer
  attack (the ANN proxy, the blackbox checkpoint), gets lower accuracy than every
  white-box gradient attack on the target itself.
* ``zero_gradients``: more than half of the input-gradient entries are exactly 0
  on some path (single draw, clean test images).
* ``noisy_gradients``: two independent EOT-M gradient estimates have mean cosine
  similarity below 0.5 on some stochastic path (raise ``--eot``).
"""

from __future__ import annotations

import math

import torch

from .encoding import encoder_seed


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean per-image cosine similarity over images where both gradients are non-zero."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    ok = (na > 0) & (nb > 0)
    if not ok.any():
        return None
    return float(((a[ok] * b[ok]).sum(1) / (na[ok] * nb[ok])).mean())


def gradient_stats(model, source, images, labels, eot: int = 1, seed: int = 0, stochastic: bool = True) -> dict:
    """Fraction of zero input gradients and agreement of independent estimates.

    ``source`` gives single-draw gradients; 2M draws are taken (2 for a deterministic
    path).  ``zero_frac``: fraction of exactly-zero entries of one draw's gradient;
    ``zero_images``: fraction of images whose whole gradient is zero; ``cos_single``:
    mean cosine similarity of two single-draw gradients; ``cos_eot``: of two
    independent EOT-M estimates (each the mean of M draws).
    """
    n = 2 * eot if stochastic else 2
    gs = []
    with encoder_seed(model, seed * 1000003 + 900001):
        for _ in range(n):
            gs.append(source(images, labels)[0].detach().flatten(1))
    g = gs[0]
    m = eot if stochastic else 1
    return {
        "zero_frac": float((g == 0).float().mean()),
        "zero_images": float((g.abs().amax(1) == 0).float().mean()),
        "cos_single": _cosine(gs[0], gs[1]),
        "cos_eot": _cosine(torch.stack(gs[:m]).mean(0), torch.stack(gs[m:2 * m]).mean(0)) if stochastic else
        _cosine(gs[0], gs[1]),
        "eot": m, "images": len(images), "stochastic": stochastic,
    }


MASKING_FLAGS = ("eps_not_monotone", "eps_not_zero", "stronger_attack_higher_acc", "single_step_beats_iterative",
                 "square_beats_gradient", "transfer_beats_gradient", "zero_gradients")


def _tolerance(result: dict, a: dict, b: dict, fixed: float | None) -> float:
    if fixed is not None:
        return float(fixed)
    base = 100.0 / max(1, result["images"])
    k = len(a["draws"])
    if k > 1:
        return max(base, 2.0 * math.sqrt((a["std"] ** 2 + b["std"] ** 2) / k))
    return max(base, 1.0) if result.get("stochastic") else base


def _flag(flag, explain: str, detail=None) -> dict:
    return {"flag": flag, "explain": explain, "detail": detail if detail is not None else []}


def sanity_flags(result: dict, tol: float | None = None, zero_tol: float = 5.0) -> dict:
    """The sanity checks of a result (see the module docstring); True = warning sign."""
    flags = {}
    rows = [r for r in result["rows"]]
    labels = result["eps_labels"]

    sweep = result.get("sweep")
    if sweep and len(sweep["points"]) > 1:
        pts = sorted(sweep["points"], key=lambda p: p["eps"])
        rises = [f"{a['label']} -> {b['label']}: {a['acc']['mean']:.1f} -> {b['acc']['mean']:.1f}"
                 for a, b in zip(pts, pts[1:])
                 if b["acc"]["mean"] > a["acc"]["mean"] + _tolerance(result, a["acc"], b["acc"], tol)]
        flags["eps_not_monotone"] = _flag(bool(rises), "accuracy must fall as eps grows; a rise means the attack, "
                                          "not the model, fails", rises)
    else:
        flags["eps_not_monotone"] = _flag(None, "accuracy vs eps not measured (full suite)")
    if sweep and sweep["points"] and max(p["eps"] for p in sweep["points"]) >= 32 / 255 - 1e-9:
        top = max(sweep["points"], key=lambda p: p["eps"])
        flags["eps_not_zero"] = _flag(top["acc"]["mean"] > zero_tol,
                                      f"at eps {top['label']} accuracy should be about 0 (<= {zero_tol:g}%); "
                                      "more means the gradient does not lead the attack",
                                      [f"{top['label']}: {top['acc']['mean']:.1f}%"])
    else:
        flags["eps_not_zero"] = _flag(None, "no sweep eps >= 32/255 measured")

    by_key = {tuple(r["key"]): r for r in rows}
    ladder = [by_key[tuple(k)] for k in result.get("ladder", []) if tuple(k) in by_key]
    if len(ladder) > 1:
        bad = []
        for a, b in zip(ladder, ladder[1:]):
            for j, lab in enumerate(labels):
                if b["acc"][j]["mean"] > a["acc"][j]["mean"] + _tolerance(result, a["acc"][j], b["acc"][j], tol):
                    bad.append(f"eps {lab}: {_rung(a)} {a['acc'][j]['mean']:.1f} -> {_rung(b)} "
                               f"{b['acc'][j]['mean']:.1f}")
        flags["stronger_attack_higher_acc"] = _flag(bool(bad), "more steps, EOT samples or restarts must not raise "
                                                    "accuracy", bad)
    else:
        flags["stronger_attack_higher_acc"] = _flag(None, "budget ladder not run (full suite)")

    fgsm = [r for r in rows if r["attack"] == "fgsm"]
    iterative = [r for r in rows if fgsm and r["attack"] == "pgd" and r["path"] == fgsm[0]["path"]]
    if fgsm and iterative:
        bad = []
        for j, lab in enumerate(labels):
            best = min(iterative, key=lambda r: r["acc"][j]["mean"])
            if fgsm[0]["acc"][j]["mean"] < best["acc"][j]["mean"] - _tolerance(result, fgsm[0]["acc"][j],
                                                                               best["acc"][j], tol):
                bad.append(f"eps {lab}: FGSM {fgsm[0]['acc'][j]['mean']:.1f} < best PGD {_rung(best)} "
                           f"{best['acc'][j]['mean']:.1f}")
        flags["single_step_beats_iterative"] = _flag(bool(bad), "one FGSM step beating every PGD run on the same "
                                                     "gradient means the iterations are misled", bad)
    else:
        flags["single_step_beats_iterative"] = _flag(None, "FGSM and PGD on one path not both run")

    gradient_rows = [r for r in rows if r["group"] in ("paper", "adaptive", "ladder", "library")
                     and r["attack"] != "square" and r["path"] != "ann"]
    for name, pick, what in (
            ("square_beats_gradient", lambda r: r["attack"] == "square", "Square (no gradients)"),
            ("transfer_beats_gradient", lambda r: r["group"] == "transfer" or r["path"] == "ann",
             "a transfer attack (ANN proxy or blackbox model)")):
        others = [r for r in rows if pick(r)]
        if not others or not gradient_rows:
            flags[name] = _flag(None, f"{what} or white-box gradient attacks not run")
            continue
        bad = []
        for j, lab in enumerate(labels):
            best_g = min(gradient_rows, key=lambda r: r["acc"][j]["mean"])
            best_o = min(others, key=lambda r: r["acc"][j]["mean"])
            if best_o["acc"][j]["mean"] < best_g["acc"][j]["mean"] - _tolerance(result, best_o["acc"][j],
                                                                                 best_g["acc"][j], tol):
                bad.append(f"eps {lab}: {best_o['label']} ({best_o['path']}) {best_o['acc'][j]['mean']:.1f} < "
                           f"best gradient attack {best_g['label']} ({best_g['path']}) {best_g['acc'][j]['mean']:.1f}")
        flags[name] = _flag(bool(bad), f"{what} beating the white-box gradients is a sign of gradient masking", bad)

    stats = result.get("gradient_stats") or {}
    if stats:
        zeros = [f"{p}: {v['zero_frac'] * 100:.0f}% zero" for p, v in stats.items() if v["zero_frac"] > 0.5]
        flags["zero_gradients"] = _flag(bool(zeros), "more than half of the input gradient is exactly 0 on a path: "
                                        "gradient attacks cannot move", zeros)
        st = {p: v for p, v in stats.items() if v["stochastic"]}
        if st:
            noisy = [f"{p}: cos {v['cos_eot']:.2f} (eot {v['eot']})" if v["cos_eot"] is not None else f"{p}: no signal"
                     for p, v in st.items() if v["cos_eot"] is None or v["cos_eot"] < 0.5]
            flags["noisy_gradients"] = _flag(bool(noisy), "independent EOT gradient estimates disagree "
                                             "(cosine < 0.5): raise --eot", noisy)
        else:
            flags["noisy_gradients"] = _flag(None, "deterministic model: no encoder noise")
    else:
        flags["zero_gradients"] = _flag(None, "gradient statistics not measured (adaptive/full suite)")
        flags["noisy_gradients"] = _flag(None, "gradient statistics not measured (adaptive/full suite)")
    return flags


def _rung(r: dict) -> str:
    return f"{r['label']}/eot{r['eot']}/x{r['restarts']}"
