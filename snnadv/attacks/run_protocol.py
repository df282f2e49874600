"""Evaluate one model under a named protocol (:mod:`snnadv.attacks.protocols`) as a
cascade (:mod:`snnadv.attacks.cascade`): every number labelled with the protocol,
attack, estimator, steps, EOT, restarts, draws, eps and images, and for the package's
own attacks (FGSM, PGD) the iterate returned (``last``, or ``best`` with the
protocol's ``early_exit``) and whether images left early; 95 % Wilson intervals and
the spread over the evaluation draws (:func:`snnadv.stats.accuracy_stats`); the cost
of every attack and estimator (seconds per 100 attacked images).

Gradient attacks on an SNN differentiate an estimator: the paper's FGSM / PGD-7 use the
paper's path (alg1; PGD with the protocol's ``early_exit``: the best iterate, each
image dropped once adversarial); APGD-CE / APGD-DLR run through
:class:`snnadv.estimator.EstimatorModule` (the SNN's logits forward, the path's gradient
backward, EOT M: the mean of M draws' logits and gradients per call) for every path of
the protocol.  With the sharpness search, ``bptt-fast-sigmoid`` uses the slope found by
:func:`snnadv.sharpness.search_sharpness` on a held-out batch (never the evaluated
images), once per model.  Square queries the real model.  An ANN target: plain autograd,
no EOT, one draw.  EOT draws run batched into the batch dimension (``batched_eot``,
:mod:`snnadv.eot`).

Transfer (blackbox) mode, ``source=``: the protocol's attacks are crafted on another
model (the *source*: an ANN, SNN-conv or SNN-BP, e.g. the same architecture trained
from another seed, the paper's Table 1 blackbox cells) and scored on the *target*.
Everything that makes an attack is the source's: its estimators and EOT, the sharpness
search and the ``ann`` proxy (its ANN), so the attack never queries the target.  Early
exit is off in a transfer run whatever the protocol says: an image leaving as soon as it
fools the source keeps a barely-adversarial iterate, which transfers worse than the one
the remaining steps reach (measured: ``strong-cpu`` from one medium-profile VGG5 ANN to
another, 200 images, 31.5 % robust with APGD's exit, 30.0 % without).  With the source
the target itself and the exit off, the run equals the whitebox one (tested).  What
scores is the target's: the clean correctness, the keyed evaluation draws of :func:`snnadv.attacks.cascade.keyed_correct`
(so clean and per-image results pair with a whitebox run on the same images), and the
cascade (an image is attacked while it is still correct on the target under the worst
case so far).  Square, a query attack, is left out (querying the source says nothing
about the target): ``skipped_attacks`` says so.  APGD, as AutoAttack's, leaves an image
its model already misclassifies as it is: in a transfer run, an image the source gets
wrong (on its first pass) and the target right stays clean under APGD (FGSM and PGD
perturb every image).  Every row and the result say ``mode``
(``whitebox`` or ``transfer``) and the ``source`` (the caller's description of it);
the result's ``cascade`` says whether the images were cascaded (False: every attack on
every image).

Computations only (no printing, no files).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..eot import BatchedEOT
from ..errors import SnnadvError
from ..evaluation import is_snn
from ..gradients import make_gradient
from ..registry import GRADIENTS
from ..stats import accuracy_stats
from .base import make_attack
from .cascade import run_cascade
from .protocols import Protocol
from .settings import eps_label, paper_path, proxy_path, resolve_paths, stochastic_path
from .suite import PAPER, AttackSetting

SHARP_PATH = "bptt-fast-sigmoid"


def protocol_specs(model, p: Protocol, paths: list[str]) -> list[AttackSetting]:
    """The attacks of protocol ``p`` on ``model`` in cascade order."""
    snn = is_snn(model)
    M = p.eot if snn else 1
    pp = paper_path(model)
    out: list[AttackSetting] = []
    for a in p.attacks:
        if a in PAPER:
            steps = 1 if a == "fgsm" else p.steps
            out.append(AttackSetting(a, pp, steps, 1, 1, "paper", "paper",
                                     early_exit=p.early_exit and a == "pgd" and a in p.exit_attacks))
        elif a in ("apgd-ce", "apgd-dlr"):
            for q in paths:
                out.append(AttackSetting(a, q, p.apgd_steps, p.restarts, M if stochastic_path(model, q) else 1,
                                         group="library", early_exit=p.early_exit and a in p.exit_attacks))
        elif a == "square":
            out.append(AttackSetting("square", "none", p.square_queries, 1, 1, group="library"))
        else:
            raise SnnadvError(f"protocol {p.name}: unknown attack '{a}' (fgsm, pgd, apgd-ce, apgd-dlr, square)")
    return out


def attack_builder(model, sp: AttackSetting, *, slope: float | None, proxy=None, seed: int = 0,
                   batched: bool = True, draws: int = 1, batch_size: int = 64):
    """``build(eps)`` for one attack setting (see the module docstring); ``batched``: EOT
    draws in the batch dimension (:mod:`snnadv.eot`); ``draws``/``seed``: the evaluation
    draws that score the attack, which APGD's early exit on an SNN asks before an image
    leaves (:class:`snnadv.attacks.apgd.FooledOnEveryDraw`)."""
    snn = is_snn(model)

    def build(eps: float):
        if sp.alpha == "paper":
            src = make_gradient(model, None if sp.path == "autograd" else sp.path, 1, slope=slope, proxy=proxy)
            if sp.eot > 1 and snn:
                src = BatchedEOT(src, sp.eot, model)
            exit_early = {"keep_best": True, "early_exit": True} if sp.early_exit else {}
            return make_attack(sp.attack, model, eps, eps / 4, sp.steps, gradient=src, **exit_early)
        if sp.attack == "square":
            return make_attack("square", model, eps, steps=sp.steps, seed=seed)
        target = model
        if snn:
            from ..estimator import EstimatorModule

            opts = {"slope": slope} if sp.path.startswith("bptt-") else {}
            if proxy_path(sp.path):
                opts["proxy"] = proxy
            target = EstimatorModule(model, sp.path, eot=sp.eot, batched=batched, **opts)
        exit_early = {}
        if sp.early_exit:
            from .apgd import FooledOnEveryDraw

            exit_early = {"early_exit": True,
                          "confirm": FooledOnEveryDraw(model, draws, seed, batch_size) if snn else None}
        return make_attack(sp.attack, target, eps, steps=sp.steps, restarts=sp.restarts, eot=1, seed=seed,
                           **exit_early)

    return build


#: query attacks: they ask the model they attack, so crafted on a source they say nothing
#: about the target (left out of transfer runs)
QUERY_ATTACKS = ("square",)
QUERY_REASON = "a query attack: crafted on the source it says nothing about the target"


def _require_search_memory(model, images: int) -> None:
    """Refuse, before it starts, a sharpness search whose BPTT pass over ``images`` held-out
    images would not fit the free memory (:func:`snnadv.memory.require`, naming the
    ``--sharpness-images`` that fits): one golden-section objective is one FGSM gradient
    of the whole held-out batch under fixed draws, so it is not split into pieces."""
    from .. import memory

    memory.require(model, images, model.num_steps, "bptt", None, f"sharpness search ({SHARP_PATH})",
                   option="--sharpness-images")


def protocol_attacks(model, p: Protocol, *, proxy=None, heldout: tuple | None = None, slope: float = 5.0,
                     seed: int = 0, batch_size: int = 64, transfer: bool = False, clock=time.perf_counter) -> dict:
    """The attacks of protocol ``p`` crafted on ``model`` (the target whitebox, the source
    in a transfer run): the sharpness search (on ``heldout``), the estimators, the specs in
    cascade order and their builders.  ``transfer``: query attacks left out.  Returns
    ``{"specs", "attacks" ((key, build) pairs for run_cascade), "paths", "skipped_paths",
    "skipped_attacks", "sharpness", "slope"}``."""
    snn = is_snn(model)
    sharp = None
    if snn and p.sharpness and SHARP_PATH in GRADIENTS:
        if heldout is None:
            raise SnnadvError(f"protocol {p.name}: the sharpness search needs a held-out batch")
        from ..sharpness import search_sharpness

        t0 = clock()
        hx, hy = heldout
        hx, hy = hx[:p.sharpness_images], hy[:p.sharpness_images]
        _require_search_memory(model, len(hx))
        found = search_sharpness(model, hx, hy, SHARP_PATH, iters=p.sharpness_iters, eps=max(p.eps), seed=seed)
        slope = found.best
        sharp = {"path": SHARP_PATH, "option": "slope", "best": found.best, "objective": found.value,
                 "iters": p.sharpness_iters, "images": len(hx), "held_out": True,
                 "evaluations": [list(e) for e in found.evaluations], "seconds": clock() - t0}
    paths = resolve_paths(model, p.paths if snn else "all", slope)  # an ANN: autograd
    if sharp is not None and SHARP_PATH not in paths and p.paths == "all":
        paths.append(SHARP_PATH)
    if any(proxy_path(q) for q in paths) and proxy is None:
        paths = [q for q in paths if not proxy_path(q)]  # no ANN to differentiate: left out, said in the result
        skipped = ["ann (no proxy ANN given)"]
    else:
        skipped = []
    specs = protocol_specs(model, p, paths)
    skipped_attacks = []
    if transfer:
        skipped_attacks = [f"{sp.label} ({QUERY_REASON})"
                           for sp in specs if sp.attack in QUERY_ATTACKS]
        specs = [sp for sp in specs if sp.attack not in QUERY_ATTACKS]
    K = p.eval_draws if snn else 1  # the crafting model's draws: APGD's early exit asks them
    attacks = [(sp.key, attack_builder(model, sp, slope=slope, proxy=proxy, seed=seed, batched=p.batched_eot,
                                       draws=K, batch_size=batch_size))
               for sp in specs]
    return {"specs": specs, "attacks": attacks, "paths": paths, "skipped_paths": skipped,
            "skipped_attacks": skipped_attacks, "sharpness": sharp, "slope": slope}


def evaluate_protocol(model, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol, *, proxy=None,
                      heldout: tuple | None = None, slope: float = 5.0, seed: int = 0, batch_size: int = 64,
                      cascade: bool = True, store=None, advance=None, clock=time.perf_counter,
                      source=None, source_info: dict | None = None) -> dict:
    """Run ``protocol`` on ``model`` (result dict: rows with provenance, worst case, costs).

    ``source``: craft the attacks on this model and score them on ``model`` (transfer
    mode, the module docstring); ``source_info``: its description, copied into the result
    and every row.  ``proxy``: the ANN of the ``ann`` path of the model the attacks are
    crafted on; ``heldout``: (images, labels) for its sharpness search (required when the
    protocol searches and that model is an SNN); ``store``/``advance``/``clock``: see
    :func:`snnadv.attacks.cascade.run_cascade`."""
    p = protocol
    transfer = source is not None
    if transfer and p.early_exit:  # a transfer attack wants its strongest iterate, not the first that fools the source
        p = replace(p, early_exit=False)
    crafter = source if transfer else model
    snn, snn_src = is_snn(model), is_snn(crafter)
    K = p.eval_draws if snn else 1  # the target's evaluation draws
    M = p.eot if snn_src else 1
    model.eval()
    crafter.eval()
    t0 = clock()
    made = protocol_attacks(crafter, p, proxy=proxy, heldout=heldout, slope=slope, seed=seed,
                            batch_size=batch_size, transfer=transfer, clock=clock)
    specs, slope, sharp = made["specs"], made["slope"], made["sharpness"]
    eps = [float(e) for e in p.eps]
    run = run_cascade(model, images, labels, made["attacks"], eps, draws=K, seed=seed, batch_size=batch_size,
                      chunk=p.chunk, cascade=cascade, store=store, advance=advance, clock=clock)
    N = len(images)
    mode = "transfer" if transfer else "whitebox"
    rows = []
    for sp in specs:
        k = sp.key
        cells = []
        for j, e in enumerate(eps):
            n_att, secs = run.attacked[k][j], run.seconds[k][j]
            cells.append({
                "eps": e, "eps_label": eps_label(e), "attacked": n_att, "seconds": secs,
                "untimed": run.untimed[k][j],  # resumed pieces of unknown cost: seconds a lower bound
                "seconds_per_100": 100.0 * secs / n_att if n_att else None,
                # robust accuracy after this attack (the cascade's running worst case)
                "cumulative": accuracy_stats(run.cumulative[k][j].numpy()),
                # this attack alone (only when every image was attacked)
                "alone": None if cascade else accuracy_stats(run.matrices[k][j].numpy()),
            })
        apgd = sp.attack.startswith("apgd")
        ours = sp.group == "paper" or apgd  # the package's FGSM / PGD / APGD
        exit_test = None
        if sp.early_exit:  # what makes an image leave an attack early (never in a transfer run)
            exit_test = "wrong on every evaluation draw" if apgd and snn_src else "the step's logits"
        rows.append({"protocol": p.name, "mode": mode, "source": source_info if transfer else None,
                     "label": sp.label, "attack": sp.attack, "group": sp.group,
                     "estimator": sp.path, "path": sp.path, "steps": sp.steps, "restarts": sp.restarts,
                     "eot": sp.eot, "draws": K, "images": N, "key": list(map(str, sp.key)),
                     "iterate": ("best" if sp.early_exit or apgd else "last") if ours else None,
                     "early_exit": sp.early_exit if ours else None, "exit_test": exit_test,
                     "slope": slope if sp.path == SHARP_PATH else None, "cells": cells})
    worst = [{"eps": e, "eps_label": eps_label(e), **accuracy_stats(w.numpy())} for e, w in zip(eps, run.worst)]
    cost = cost_table(rows, N)
    return {
        "protocol": p.name, "protocol_settings": p.to_dict(), "mode": mode, "cascade": bool(cascade),
        "source": source_info if transfer else None,
        "stochastic": snn, "paths": made["paths"], "skipped_paths": made["skipped_paths"],
        "skipped_attacks": made["skipped_attacks"], "sharpness": sharp, "images": N,
        "eval_draws": K, "eot": M, "eps": eps, "eps_labels": [eps_label(e) for e in eps], "seed": seed,
        "batch_size": batch_size, "clean": accuracy_stats(run.clean.numpy()), "rows": rows, "worst_case": worst,
        "cost": cost, "eval_seconds": run.eval_seconds, "pieces": {"computed": run.pieces, "resumed": run.resumed},
        "seconds": clock() - t0,  # this run's; with resumed pieces, what the whole protocol cost is cost_seconds
        "cost_seconds": (sharp or {}).get("seconds", 0.0) + run.eval_seconds + sum(c["seconds"] for c in cost),
        "untimed_pieces": sum(c["untimed"] for c in cost),
        # per image: clean, the worst case, and the running worst case after each row (rows' order)
        "correct": {"clean": run.clean, "worst": run.worst,
                    "cumulative": [run.cumulative[sp.key] for sp in specs]},
    }


def cost_table(rows: list[dict], images: int) -> list[dict]:
    """Per attack and estimator: seconds, images attacked and seconds per 100 attacked
    images (summed over eps), and the seconds per 100 evaluated images; ``untimed``:
    resumed pieces whose cost was not recorded (the seconds are then a lower bound)."""
    out = []
    for r in rows:
        secs = sum(c["seconds"] for c in r["cells"])
        n = sum(c["attacked"] for c in r["cells"])
        out.append({"attack": r["label"], "estimator": r["estimator"], "eot": r["eot"], "steps": r["steps"],
                    "early_exit": r["early_exit"], "untimed": sum(c.get("untimed", 0) for c in r["cells"]),
                    "seconds": secs, "attacked": n, "per_100_attacked": 100.0 * secs / n if n else None,
                    "per_100_images": 100.0 * secs / images if images else None})
    return out
