"""The adaptive evaluation suite: attacks that adapt to an SNN, expected accuracy, worst case.

The paper's numbers (Sec. 3.3) come from 7-step PGD with one encoder draw through
Algorithm 1's first-layer gradient.  A stochastic encoder and surrogate gradients
can make such a weak attack look like robustness (Athalye et al. 2018, Carlini et
al. 2019).  :func:`evaluate_model` evaluates one target model with attacks that adapt
to that, and the signs of gradient masking (:mod:`snnadv.masking`) beside the
numbers; ``snnadv evaluate`` (:mod:`snnadv.adaptive`) runs it on a checkpoint.

Expected accuracy.  An SNN's prediction is a random variable (the encoder's
spikes).  Its accuracy on a set of images is reported as the mean over K
independent encoder draws (``eval_draws``) with the spread (std over draws),
never one lucky draw.  Draw k always uses the same keyed spikes, for every
attack: the draws are *common random numbers*, so two attacks are compared on
identical spike noise.

Processes.  Under ``torchrun`` every attack and evaluation is sharded over the
processes and gathered in order (:func:`snnadv.attacks.craft`,
:func:`snnadv.evaluation.correctness`), with spikes keyed by image index
(:func:`snnadv.encoding.encoder_keys`): the result is the same for any number of
processes and any batch size, except torchattacks' attacks (APGD, Square), which draw
their own random numbers per batch: the same only for the same batches (the same batch
size, every shard boundary at a multiple of it).  The gradient statistics run on every
process on the same few images.

EOT.  Gradient-based attacks on a stochastic model use the mean input gradient of
M independent draws per step (``eot``; M = 1 is the paper's setting):
g = (1/M) sum_m dJ/dx(x, spikes_m), an unbiased estimate of d E[J] / dx.

Gradient paths (SNN targets): every path registered in
:data:`snnadv.registry.GRADIENTS` (see :mod:`snnadv.gradients`): ``alg1`` (the
paper's), ``bptt-<surrogate>`` for every registered surrogate (BPTT with a surrogate
chosen at attack time; ``slope`` is the fast sigmoid's k), ``rate`` (back-propagation
through spike rates), ``ann`` (the ANN the SNN was converted from, a proxy).  ``bptt``
is BPTT with the training surrogate (the same direction as ``alg1``), left out of
``all``.  An ANN target has one path, ``autograd``.

Per-sample worst case.  Each attack a yields x_adv^a; evaluating it over the K
draws gives a boolean matrix C^a[k, i] (image i correct at draw k).  An image
counts as robust at draw k only if it is correct clean and under *every* attack:
W[k, i] = C^clean[k, i] AND_a C^a[k, i]; the worst-case accuracy is the mean over
k of mean_i W[k, i] (with its std over k).  By construction it is no higher than
any single attack's accuracy, draw by draw.

Suites:

* ``paper``: FGSM and PGD-7 (alpha = eps/4, i.e. 2/255 at 8/255) with the paper's
  gradient (alg1 for SNNs, autograd for ANNs), one EOT sample.
* ``adaptive``: PGD with ``steps`` steps and ``restarts`` restarts (the first from
  the clean image, the others from random points in the eps-ball), EOT M, keeping
  per image the best iterate of all steps and restarts (lowest margin
  z_y - max_{j != y} z_j, read from the EOT-averaged logits of the target that come
  with each gradient; for a proxy path (``ann``) measured on the target over M fixed
  draws independent of the evaluation draws), on every chosen gradient path, and
  their per-sample worst case; then
  APGD-CE, APGD-DLR (EOT M) and Square (score-based, no gradients) from
  torchattacks, run directly on the model (an SNN draws fresh spikes on every
  call); an optional transfer attack from a blackbox model.
* ``full``: paper + adaptive + a budget ladder on the paper path (PGD-7 ->
  PGD-``steps`` -> + EOT M -> + restarts) + an accuracy-vs-eps sweep + the checks.

Adaptive PGD step size: ``alpha`` if given, else max(2.5 eps / steps, eps / 8).

Computations only: nothing here prints or writes a file (progress goes to an
optional ``progress`` callable).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..encoding import current_keys, encoder_keys, encoder_seed
from ..errors import SnnadvError
from ..evaluation import correctness, is_snn, summarize
from ..gradients import make_gradient
from ..masking import MASKING_FLAGS, gradient_stats, sanity_flags
from .base import craft, make_attack
from .pgd import PGD, margins
from .settings import (EvalSettings, adaptive_alpha, eps_label, paper_path, proxy_path, resolve_paths,
                       stochastic_path)

#: the paper suite: attack -> (steps, encoder seed offset); alpha eps/4, the last iterate
PAPER = {"fgsm": (1, 1), "pgd": (7, 2)}
#: the adaptive suite's library-style attacks (APGD: :mod:`snnadv.attacks.apgd`; Square: torchattacks)
LIBRARY = ("apgd-ce", "apgd-dlr", "square")
#: what torchattacks differentiates on an SNN (the module itself: BPTT, training surrogate)
LIBRARY_PATH = "bptt"


# --------------------------------------------------------------------------- evaluation pieces
def correct_matrix(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                   draws: int = 1, seed: int = 0) -> torch.Tensor:
    """Boolean [K, N] (on the CPU): image i classified correctly at encoder draw k.

    Draw k uses the keyed spikes of :func:`snnadv.evaluation.correctness` (the same
    seeds for every call: common random numbers; the same for any batch size and number
    of processes), so row means are exactly the per-draw accuracies ``accuracy_on``
    reports.  K = 1 for a deterministic model.
    """
    return correctness(model, images, labels, batch_size, draws, seed)


def accuracy_summary(correct: torch.Tensor) -> dict:
    """``{"mean", "std", "draws"}`` (percent) of a [K, N] correctness matrix."""
    return summarize([100.0 * float(r.float().mean()) for r in correct])


def worst_case(corrects: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample, per-draw worst case: robust only if correct under every attack."""
    if not corrects:
        raise SnnadvError("worst case of no attacks")
    out = corrects[0].clone()
    for c in corrects[1:]:
        if c.shape != out.shape:
            raise SnnadvError("worst case needs correctness matrices of one shape (same images and draws)")
        out &= c
    return out


@torch.no_grad()
def _margin(model, images, labels, seeds) -> torch.Tensor:
    """Mean margin of ``model`` over the encoder draws of ``seeds`` (inside a keyed attack:
    keyed draws of the attacked images, :func:`snnadv.encoding.encoder_keys`)."""
    total = torch.zeros(len(images), device=images.device)
    keyed = current_keys(model) is not None
    for s in seeds:
        with encoder_keys(model, s) if keyed else encoder_seed(model, s):
            total += margins(model(images), labels)
    return total / len(seeds)


def _select_seeds(seed: int, draws: int) -> list[int]:
    """Seeds for choosing iterates by the target's margin: independent of the evaluation draws."""
    return [seed * 1000003 + 700001 + d for d in range(draws)]


def pgd_attack(model, source, images, labels, eps: float, alpha: float, steps: int, restarts: int = 1,
               batch_size: int = 64, seed: int = 0, select_draws: int | None = None) -> torch.Tensor:
    """PGD (:class:`snnadv.attacks.PGD`) keeping, per image, the best iterate over all
    steps and restarts, batch by batch, reproducibly from ``seed``.

    "Best" = the lowest margin z_y - max_{j != y} z_j.  By default it is read from the
    logits the gradient source returns with each gradient (for an SNN: the EOT mean
    of that step's draws, on the target itself).  With ``select_draws`` the margin is
    instead measured on ``model`` over that many fixed independent draws (needed when
    the source is a proxy, e.g. the ``ann`` path).  The first restart starts at the
    clean image, the others at uniform random points of the eps-ball.  Keyed and sharded
    (:func:`snnadv.attacks.craft` with a seed): the same for any batch size and number of
    processes.
    """
    if eps == 0:
        return images.clone()
    select = None
    if select_draws:
        seeds = _select_seeds(seed, select_draws)
        select = lambda x, y: _margin(model, x, y, seeds)  # noqa: E731
    attack = PGD(model, eps, alpha, steps, gradient=source, restarts=restarts, keep_best=True, select=select)
    return craft(attack, images, labels, batch_size, seed=seed * 7919 + 104729)


def run_library(attack, model, images, labels, eps: float, batch_size: int, seed: int) -> torch.Tensor:
    """Run a torchattacks attack (:mod:`snnadv.attacks.adapters`) batch by batch, sharded
    over the processes; an SNN's encoder gets a generator seeded from ``seed`` and the
    batch's first image (fresh spikes on every call, reproducibly).  torchattacks draws
    its random numbers for a whole batch, so the result is the same across numbers of
    processes only for the same batches (:func:`snnadv.attacks.craft`)."""
    if eps == 0:
        return images.clone()
    return craft(attack, images, labels, batch_size, seed=seed)


# --------------------------------------------------------------------------- the suite
@dataclass(frozen=True)
class AttackSetting:
    """One attack of the suite with its settings (its ``key`` identifies the crafted images)."""

    attack: str               # a registered attack (fgsm, pgd, apgd-ce, ...) or "transfer"
    path: str                 # gradient path (library: bptt; square: none; transfer: source kind)
    steps: int = 1
    restarts: int = 1
    eot: int = 1
    alpha: str = "adaptive"   # "paper" (eps / 4) or "adaptive"
    group: str = "adaptive"   # paper | adaptive | library | transfer | ladder
    early_exit: bool = False  # pgd: the best iterate, each image dropped once adversarial

    @property
    def key(self) -> tuple:
        key = (self.attack, self.path, self.steps, self.restarts, self.eot, self.alpha)
        return key + ("early-exit",) if self.early_exit else key

    @property
    def label(self) -> str:
        if self.attack == "pgd":
            return f"PGD-{self.steps}"
        if self.attack == "square":
            return f"Square-{self.steps}"
        if self.attack.startswith("apgd"):
            return f"APGD-{self.attack.split('-')[1].upper()}-{self.steps}"
        if self.attack == "transfer":
            return f"PGD-{self.steps} transfer"
        return self.attack.upper()


def build_suite(model, s: EvalSettings, paths: list[str], has_blackbox: bool = False,
                blackbox_path: str = "autograd") -> tuple[list[AttackSetting], list[tuple]]:
    """The attacks of ``s.suite`` (deduplicated) and the ladder (keys, weakest first)."""
    pp = paper_path(model)
    M = s.eot if is_snn(model) else 1
    specs: list[AttackSetting] = []
    if s.suite in ("paper", "full"):
        specs += [AttackSetting(a, pp, steps, 1, 1, "paper", "paper") for a, (steps, _) in PAPER.items()]
    if s.suite in ("adaptive", "full"):
        for p in paths:
            specs.append(AttackSetting("pgd", p, s.steps, s.restarts, M if stochastic_path(model, p) else 1))
        if s.library:  # torchattacks differentiates the module itself: BPTT with the training surrogate
            lp = LIBRARY_PATH if is_snn(model) else "autograd"
            for a in LIBRARY:
                if a == "square":  # score-based: no gradient path, no EOT, one restart
                    specs.append(AttackSetting(a, "none", s.square_queries, 1, 1, group="library"))
                else:
                    specs.append(AttackSetting(a, lp, s.apgd_steps, s.restarts, M, group="library"))
        if has_blackbox:
            specs.append(AttackSetting("transfer", blackbox_path, s.steps, 1,
                                       s.eot if blackbox_path != "autograd" else 1, group="transfer"))
    ladder: list[tuple] = []
    if s.suite == "full":
        rungs = [AttackSetting("pgd", pp, PAPER["pgd"][0], 1, 1, "paper", "paper"),
                 AttackSetting("pgd", pp, s.steps, 1, 1, group="ladder"),
                 AttackSetting("pgd", pp, s.steps, 1, M, group="ladder"),
                 AttackSetting("pgd", pp, s.steps, s.restarts, M, group="ladder")]
        for r in rungs:
            if not ladder or ladder[-1] != r.key:
                ladder.append(r.key)
            if r.key not in {x.key for x in specs}:
                specs.append(r)
    seen, out = set(), []
    for sp in specs:
        if sp.key not in seen:
            seen.add(sp.key)
            out.append(sp)
    return out, ladder


@contextmanager
def _no_progress(description: str, total: int):
    yield lambda n=1, info=None: None


def evaluate_model(model, images: torch.Tensor, labels: torch.Tensor, settings: EvalSettings,
                   progress=None, proxy=None, blackbox=None) -> dict:
    """Run the suite on an in-memory model (any ``nn.Module`` mapping [0, 1] images to logits).

    ``progress``: ``progress(description, total)``, a context manager yielding
    ``advance(n, info=...)`` (e.g. :meth:`snnadv.report.Reporter.progress`); ``proxy``:
    the ANN for the ``ann`` path; ``blackbox``: a model to craft transfer attacks on.
    Returns the result dict (rows, worst case, sweep, gradient statistics, flags);
    :func:`snnadv.adaptive.run_evaluate` adds the checkpoint information.
    """
    s = settings.check()
    progress = progress or _no_progress
    snn = is_snn(model)
    paths = resolve_paths(model, s.paths, s.slope)
    if any(proxy_path(p) for p in paths) and proxy is None:
        raise SnnadvError("the 'ann' gradient path needs the ANN the SNN was converted from (proxy)")
    K = s.eval_draws if snn else 1
    M = s.eot if snn else 1
    bs, seed, N = s.batch_size, s.seed, len(images)
    bb_path = None if blackbox is None else paper_path(blackbox)
    specs, ladder = build_suite(model, s, paths, blackbox is not None, bb_path or "autograd")
    model.eval()

    def source_for(path: str, eot: int):
        if path == "autograd":
            return make_gradient(model, None, eot)
        return make_gradient(model, path, eot if not proxy_path(path) else 1, slope=s.slope, proxy=proxy)

    def adversarial(sp: AttackSetting, eps: float) -> torch.Tensor:
        if eps == 0:
            return images.clone()
        if sp.alpha == "paper":  # the paper's FGSM and PGD: alpha eps/4, the last iterate, no restarts
            return craft(make_attack(sp.attack, model, eps, eps / 4, sp.steps, gradient=source_for(sp.path, sp.eot)),
                         images, labels, bs, seed=seed * 7919 + PAPER[sp.attack][1])
        if sp.attack == "pgd":
            return pgd_attack(model, source_for(sp.path, sp.eot), images, labels, eps,
                              adaptive_alpha(eps, sp.steps, s.alpha), sp.steps, sp.restarts, bs, seed,
                              (M if snn else 1) if proxy_path(sp.path) else None)
        if sp.attack == "transfer":  # crafted on the blackbox model alone (it never queries the target)
            src = make_gradient(blackbox, None, sp.eot)
            return pgd_attack(blackbox, src, images, labels, eps, adaptive_alpha(eps, sp.steps, s.alpha),
                              sp.steps, 1, bs, seed)
        atk = make_attack(sp.attack, model, eps, steps=sp.steps, restarts=sp.restarts, eot=sp.eot, seed=seed)
        return run_library(atk, model, images, labels, eps, bs, seed * 7919 + 3)

    clean = correct_matrix(model, images, labels, bs, K, seed)
    corrects: dict[tuple, list[torch.Tensor]] = {}
    rows: list[dict] = []
    sweep_eps = sorted(set(s.sweep_eps)) if s.suite == "full" else []
    total = len(specs) * len(s.eps) + len(sweep_eps)
    warnings: list[str] = []
    t_start = time.perf_counter()
    with progress(f"evaluating ({s.suite} suite)", total) as advance:
        for sp in specs:
            t0 = time.perf_counter()
            mats, linf = [], 0.0
            for eps in s.eps:
                advance(0, info=f"{sp.label} {sp.path} eps={eps_label(eps)}")
                x_adv = adversarial(sp, eps)
                dist = float((x_adv - images).abs().amax()) if N else 0.0
                if dist > eps + 1e-5:
                    raise SnnadvError(f"{sp.label} left the eps-ball ({dist:.4f} > {eps:.4f})")  # a bug guard
                linf = max(linf, dist)
                mats.append(correct_matrix(model, x_adv, labels, bs, K, seed))
                advance(1)
            corrects[sp.key] = mats
            rows.append({"label": sp.label, "attack": sp.attack, "group": sp.group, "path": sp.path,
                         "steps": sp.steps, "restarts": sp.restarts, "eot": sp.eot,
                         "alpha": "eps/4" if sp.alpha == "paper" else
                         ("adaptive" if s.alpha is None else s.alpha),
                         "acc": [accuracy_summary(m) for m in mats], "max_linf": linf,
                         "key": list(map(str, sp.key)),
                         "seconds": time.perf_counter() - t0})
        # accuracy vs eps (full suite): PGD on the paper path, EOT M
        sweep = None
        if sweep_eps:
            pp = paper_path(model)
            sp = AttackSetting("pgd", pp, s.sweep_steps, 1, M if stochastic_path(model, pp) else 1)
            points = []
            for eps in sweep_eps:
                advance(0, info=f"sweep eps={eps_label(eps)}")
                x_adv = adversarial(sp, eps)
                points.append({"eps": eps, "label": eps_label(eps),
                               "acc": accuracy_summary(correct_matrix(model, x_adv, labels, bs, K, seed))})
                advance(1)
            sweep = {"attack": sp.label, "path": pp, "eot": sp.eot, "steps": sp.steps, "points": points}

    # per-sample worst cases
    pgd_keys = [sp.key for sp in specs if sp.group == "adaptive" and sp.attack == "pgd"]
    worst_paths = None
    if len(pgd_keys) > 1:
        worst_paths = [accuracy_summary(worst_case([corrects[k][j] for k in pgd_keys])) for j in range(len(s.eps))]
    worst_all = [accuracy_summary(worst_case([clean] + [corrects[sp.key][j] for sp in specs]))
                 for j in range(len(s.eps))]

    # gradient statistics (adaptive and full suites)
    stats = {}
    if s.suite != "paper":
        n = min(s.stat_images, N)
        for p in dict.fromkeys([paper_path(model)] + paths):
            stats[p] = gradient_stats(model if not proxy_path(p) else proxy, source_for(p, 1), images[:n],
                                      labels[:n], M, seed, stochastic_path(model, p))

    result = {
        "suite": s.suite, "settings": s.to_dict(), "paths": paths, "images": N, "eval_draws": K,
        "eot": M, "stochastic": snn, "eps": list(s.eps), "eps_labels": [eps_label(e) for e in s.eps],
        "clean": accuracy_summary(clean), "rows": rows, "worst_paths": worst_paths, "worst_case": worst_all,
        "ladder": [list(map(str, k)) for k in ladder], "sweep": sweep, "gradient_stats": stats,
        "warnings": warnings, "seconds": time.perf_counter() - t_start,
    }
    result["flags"] = sanity_flags(result, s.flag_tol, s.zero_tol)
    result["masking_suspected"] = any(f["flag"] for k, f in result["flags"].items()
                                      if k in MASKING_FLAGS)
    return result
