"""Adaptive surrogate sharpness: search, per model and gradient path, the attack-time
surrogate's sharpness that makes the strongest attack.

The attack-time surrogate of a ``bptt-<surrogate>`` path only shapes the backward pass,
and which sharpness gives the most useful gradient depends on the model (its thresholds,
its membrane distributions).  Following Wang et al. 2025 (arXiv 2512.22522, adaptive
sharpness), :func:`search_sharpness` maximises an attack objective over the sharpness k
by golden-section search over log k (:func:`golden_section`), assuming the objective is
unimodal in log k.  The default objective is the cross-entropy of the real SNN after
one FGSM step (paper Eq. 1) crafted with the path at sharpness k, on a held-out batch:

    f(k) = mean_i CE(z(clip(x_i + eps * sign(g_k(x_i)), 0, 1)), y_i)

with the crafting and the evaluation draws fixed by seeds (``seed``, ``seed + 1``), so f
is a deterministic function of k and every candidate sees the same draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .encoding import encoder_seed
from .errors import SnnadvError
from .gradients import make_gradient

#: 1 / golden ratio
INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass
class SharpnessSearch:
    """The result: the best sharpness, its objective, and every evaluation (k, f(k)) in order."""

    best: float
    value: float
    evaluations: list[tuple[float, float]] = field(default_factory=list)


def golden_section(f: Callable[[float], float], lo: float, hi: float, iters: int) -> tuple[float, float, list]:
    """Maximise ``f`` on [lo, hi] (unimodal) by golden-section search: ``iters`` interval
    reductions by 1/phi, ``iters + 2`` evaluations.  Returns (best x, f(best x), [(x, f(x))])
    with the best among the evaluated points."""
    if not hi > lo:
        raise SnnadvError(f"golden-section search needs lo < hi, got [{lo}, {hi}]")
    if iters < 0:
        raise SnnadvError(f"golden-section search needs iters >= 0, got {iters}")
    seen: list[tuple[float, float]] = []

    def ev(x):
        v = float(f(x))
        seen.append((x, v))
        return v

    a, b = float(lo), float(hi)
    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc, fd = ev(c), ev(d)
    for _ in range(iters):
        if fc >= fd:  # the maximum is in [a, d]
            b, d, fd = d, c, fc
            c = b - INV_PHI * (b - a)
            fc = ev(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + INV_PHI * (b - a)
            fd = ev(d)
    x, v = max(seen, key=lambda p: p[1])
    return x, v, seen


def fgsm_objective(model, images: torch.Tensor, labels: torch.Tensor, path: str, option: str,
                   eps: float = 8 / 255, seed: int = 0, **options) -> Callable[[float], float]:
    """f(k): the SNN's mean cross-entropy after one FGSM step crafted with ``path`` at
    ``option = k`` (see the module docstring)."""
    def f(k: float) -> float:
        source = make_gradient(model, path, **{**options, option: float(k)})
        with encoder_seed(model, seed):
            grad, _ = source(images, labels)
        adv = (images + eps * grad.sign()).clamp(0.0, 1.0)
        with torch.no_grad(), encoder_seed(model, seed + 1):
            return F.cross_entropy(model(adv), labels).item()
    return f


def search_sharpness(model, images: torch.Tensor, labels: torch.Tensor, path: str = "bptt-fast-sigmoid", *,
                     option: str = "slope", lo: float = 0.5, hi: float = 100.0, iters: int = 8,
                     eps: float = 8 / 255, seed: int = 0, objective: Callable[[float], float] | None = None,
                     **options) -> SharpnessSearch:
    """The sharpness ``option`` of ``path`` in [lo, hi] that maximises ``objective``
    (default :func:`fgsm_objective` on ``images``, ``labels``), by golden-section search
    over its logarithm with ``iters`` reductions (the bracket shrinks by 0.618^iters).

    ``option``: the path's sharpness option (``slope`` of ``bptt-fast-sigmoid``, ``gamma``
    of ``hart``, ``sigma`` of ``pdsg``; for a width, larger is smoother).
    """
    if not 0 < lo < hi:
        raise SnnadvError(f"the sharpness range must satisfy 0 < lo < hi, got [{lo}, {hi}]")
    f = objective or fgsm_objective(model, images, labels, path, option, eps, seed, **options)
    x, v, seen = golden_section(lambda t: f(math.exp(t)), math.log(lo), math.log(hi), iters)
    return SharpnessSearch(math.exp(x), v, [(math.exp(t), fv) for t, fv in seen])
