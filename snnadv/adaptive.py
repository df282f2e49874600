"""Honest robustness: adaptive attacks, expected accuracy, gradient-masking checks (``snnadv evaluate``).

The paper's numbers (Sec. 3.3) come from 7-step PGD with one encoder draw through
Algorithm 1's first-layer gradient.  A stochastic encoder and surrogate gradients
can make such a weak attack look like robustness (Athalye et al. 2018, Carlini et
al. 2019).  This module evaluates one target model with attacks that adapt to
that, and reports the signs of gradient masking beside the numbers.

Expected accuracy.  An SNN's prediction is a random variable (the encoder's
spikes).  Its accuracy on a set of images is reported as the mean over K
independent encoder draws (``eval_draws``) with the spread (std over draws),
never one lucky draw.  Draw k always uses the same generator seed, for every
attack: the draws are *common random numbers*, so two attacks are compared on
identical spike noise.

EOT.  Gradient-based attacks on a stochastic model use the mean input gradient of
M independent draws per step (``eot``; M = 1 is the paper's setting):
g = (1/M) sum_m dJ/dx(x, spikes_m), an unbiased estimate of d E[J] / dx.

Gradient paths (SNN targets; see :mod:`snnadv.gradients`): ``alg1`` (the paper's),
``bptt-stdb`` / ``bptt-linear`` / ``bptt-fast-sigmoid`` (BPTT with a surrogate chosen
at attack time; ``slope`` is the fast sigmoid's k), ``rate`` (back-propagation
through spike rates), ``ann`` (the ANN the SNN was converted from, found through
the checkpoint's parent chain; ``--proxy-ckpt`` overrides; if the chain is broken
the SNN's own weights are loaded into an ANN, with a warning).  ``bptt`` is BPTT with
the training surrogate (the same direction as ``alg1``).  An ANN target has one
path, ``autograd``.

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
  with each gradient; for the ``ann`` path measured on the target over M fixed
  draws independent of the evaluation draws), on every chosen gradient path, and
  their per-sample worst case; then
  APGD-CE, APGD-DLR (EOT M) and Square (score-based, no gradients) from
  torchattacks, run directly on the model (an SNN draws fresh spikes on every
  call); an optional transfer attack from ``blackbox_ckpt``.
* ``full``: paper + adaptive + a budget ladder on the paper path (PGD-7 ->
  PGD-``steps`` -> + EOT M -> + restarts) + an accuracy-vs-eps sweep + the checks.

Adaptive PGD step size: ``alpha`` if given, else max(2.5 eps / steps, eps / 8).

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
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .attacks import FGSM, PGD, check_eps, parse_eps
from .checkpoint import build_model, file_hash, load_checkpoint, versions
from .config import parse_list, resolve_device
from .data import load_split, to_float
from .errors import SnnadvError
from .evaluate import _draw_seeds, is_snn, summarize
from .gradients import SNN_PATHS, make_gradient
from .surrogates import make_surrogate
from .outputs import Outputs, guarded
from .report import Reporter, atomic_target, atomic_write_text, write_json
from .robustness import check_compatible, craft, load_attack_model

SUITES = ("paper", "adaptive", "full")
#: the paths ``--paths all`` expands to for an SNN target (``bptt`` = alg1's direction)
ALL_PATHS = ("alg1", "bptt-stdb", "bptt-linear", "bptt-fast-sigmoid", "rate", "ann")
LIBRARY = ("apgd-ce", "apgd-dlr", "square")
DEFAULT_SWEEP = "0,2/255,4/255,8/255,16/255,32/255,64/255"


# --------------------------------------------------------------------------- settings
def parse_eps_list(value) -> list[float]:
    """'2/255,8/255', a list of such, or one number -> a list of eps in [0, 1]."""
    items = parse_list(value)
    out = [parse_eps(v) for v in items]
    if not out:
        raise SnnadvError("eps needs at least one value (e.g. 8/255 or 2/255,8/255)")
    for e in out:
        check_eps(e)
    return out


def eps_label(eps: float) -> str:
    """8/255 for multiples of 1/255, else the number."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


@dataclass
class EvalSettings:
    """Everything an evaluation depends on (sizes are small-able for tests)."""

    suite: str = "full"
    eps: list = field(default_factory=lambda: [8 / 255])
    eot: int = 4
    eval_draws: int = 4
    paths: object = "all"
    steps: int = 20
    restarts: int = 2
    alpha: float | None = None
    apgd_steps: int = 20
    square_queries: int = 1000
    sweep_eps: list = field(default_factory=lambda: parse_eps_list(DEFAULT_SWEEP))
    sweep_steps: int = 20
    slope: float = 5.0
    library: bool = True
    flag_tol: float | None = None
    zero_tol: float = 5.0
    stat_images: int = 64
    batch_size: int = 64
    seed: int = 0

    def check(self) -> "EvalSettings":
        if self.suite not in SUITES:
            raise SnnadvError(f"unknown suite '{self.suite}' (choose {', '.join(SUITES)})")
        self.eps = parse_eps_list(self.eps)
        self.sweep_eps = parse_eps_list(self.sweep_eps)
        for key, name in (("eot", "--eot"), ("eval_draws", "--eval-draws"), ("steps", "--steps"),
                          ("restarts", "--restarts"), ("apgd_steps", "--apgd-steps"),
                          ("square_queries", "--square-queries"), ("sweep_steps", "--sweep-steps"),
                          ("stat_images", "--stat-images"), ("batch_size", "--batch-size")):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SnnadvError(f"{name} must be an integer of at least 1, got {v}")
        if self.alpha is not None:
            self.alpha = parse_eps(self.alpha)
            if self.alpha <= 0:
                raise SnnadvError(f"alpha must be positive, got {self.alpha:g}")
        for key in ("slope", "zero_tol", "flag_tol"):
            v = getattr(self, key)
            if v is None and key == "flag_tol":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "slope" and v == 0):
                kind = "positive" if key == "slope" else "non-negative"
                raise SnnadvError(f"{key.replace('_', '-')} must be a {kind} number, got {v}")
            setattr(self, key, float(v))
        return self

    @classmethod
    def from_config(cls, cfg: dict) -> "EvalSettings":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: cfg[k] for k in names if k in cfg and cfg[k] is not None}).check()

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_paths(model, paths, slope: float | None = None) -> list[str]:
    """The gradient paths to attack ``model`` with (``all``, ``paper`` or a list).

    ``all`` leaves out ``bptt-<s>`` when s (with ``slope``) is exactly the model's
    training surrogate: that path then has alg1's direction (a duplicate).
    """
    items = parse_list(paths if isinstance(paths, (list, tuple)) else str(paths))
    if not items:
        raise SnnadvError("--paths needs at least one gradient path (or 'all')")
    if not is_snn(model):
        for p in items:
            if p not in ("all", "paper", "autograd"):
                if p in SNN_PATHS:
                    raise SnnadvError(f"gradient path '{p}' applies to SNN targets only; an ANN target uses autograd")
                raise SnnadvError(f"unknown gradient path '{p}' (an ANN target has one: autograd)")
        return ["autograd"]
    own = model.surrogate
    same = f"bptt-{own.name}" if make_surrogate(own.name, slope=slope).params() == own.params() else None
    out: list[str] = []
    for p in items:
        expanded = [q for q in ALL_PATHS if q != same] if p == "all" else ["alg1"] if p == "paper" else [p]
        for q in expanded:
            if q not in SNN_PATHS:
                raise SnnadvError(f"unknown gradient path '{q}' (choose all, {', '.join(SNN_PATHS)})")
            if q not in out:
                out.append(q)
    return out


def paper_path(model) -> str:
    return "alg1" if is_snn(model) else "autograd"


def stochastic_path(model, path: str) -> bool:
    """Whether the path's gradient depends on the encoder draw."""
    return is_snn(model) and path != "ann"


def adaptive_alpha(eps: float, steps: int, alpha: float | None = None) -> float:
    """PGD step size: ``alpha`` if given, else max(2.5 eps / steps, eps / 8)."""
    return float(alpha) if alpha is not None else max(2.5 * eps / steps, eps / 8)


# --------------------------------------------------------------------------- evaluation pieces
def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def encoder_seed(model, seed: int | None):
    """Give an SNN's encoder a fixed generator for the block (then restore the old one)."""
    if not is_snn(model) or seed is None:
        yield
        return
    old = model.encoder.generator
    model.encoder.generator = torch.Generator(device=_device(model)).manual_seed(int(seed))
    try:
        yield
    finally:
        model.encoder.generator = old


@torch.no_grad()
def correct_matrix(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                   draws: int = 1, seed: int = 0) -> torch.Tensor:
    """Boolean [K, N]: image i classified correctly at encoder draw k.

    Draw k uses the generator seed of :func:`snnadv.evaluate.accuracy_on` (the same
    seeds for every call: common random numbers), so row means are exactly the
    per-draw accuracies ``accuracy_on`` reports.  K = 1 for a deterministic model.
    """
    snn = is_snn(model)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for s in _draw_seeds(seed, draws if snn else 1):
            with encoder_seed(model, s):
                pred = torch.cat([model(images[i:i + batch_size]).argmax(1)
                                  for i in range(0, len(images), batch_size)])
            rows.append(pred == labels)
    finally:
        model.train(was_training)
    return torch.stack(rows)


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


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per image (negative = misclassified)."""
    zy = logits.gather(1, labels[:, None])[:, 0]
    return zy - logits.scatter(1, labels[:, None], float("-inf")).amax(1)


@torch.no_grad()
def _margin(model, images, labels, seeds) -> torch.Tensor:
    """Mean margin of ``model`` over the encoder draws of ``seeds``."""
    total = torch.zeros(len(images), device=images.device)
    for s in seeds:
        with encoder_seed(model, s):
            total += margins(model(images), labels)
    return total / len(seeds)


def _select_seeds(seed: int, draws: int) -> list[int]:
    """Seeds for choosing iterates by the target's margin: independent of the evaluation draws."""
    return [seed * 1000003 + 700001 + d for d in range(draws)]


def _pgd_batch(model, source, x0, y, eps, alpha, steps, start, select):
    """One PGD run on one batch; returns (best iterate, its margin) per image."""
    def project(x):
        return torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0.0, 1.0)

    x = x0 if start is None else project(x0 + eps * start)
    best, best_m = x0.clone(), torch.full((len(x0),), float("inf"), device=x0.device)
    for t in range(steps + 1):
        if t < steps or select is None:
            grad, logits = source(x, y)
            m = margins(logits, y) if select is None else select(x)
        else:
            m = select(x)  # the last iterate needs no gradient
        better = m < best_m
        best = torch.where(better[:, None, None, None], x, best)
        best_m = torch.where(better, m, best_m)
        if t < steps:
            x = project(x + alpha * grad.sign())
    return best, best_m


def pgd_attack(model, source, images, labels, eps: float, alpha: float, steps: int, restarts: int = 1,
               batch_size: int = 64, seed: int = 0, select_draws: int | None = None) -> torch.Tensor:
    """PGD keeping, per image, the best iterate over all steps and restarts.

    "Best" = the lowest margin z_y - max_{j != y} z_j.  By default it is read from the
    logits the gradient source returns with each gradient (for an SNN: the EOT mean
    of that step's draws, on the target itself).  With ``select_draws`` the margin is
    instead measured on ``model`` over that many fixed independent draws (needed when
    the source is a proxy, e.g. the ``ann`` path).  The first restart starts at the
    clean image, the others at uniform random points of the eps-ball.  Returning the
    best rather than the last iterate makes more steps or restarts never worse by
    the attack's own measure (the paper's PGD, :class:`snnadv.attacks.PGD`, returns
    the last iterate).
    """
    if eps == 0:
        return images.clone()
    check_eps(eps, alpha, steps)
    gen = torch.Generator(device=images.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        with encoder_seed(model, seed * 7919 + 104729):
            for i in range(0, len(images), batch_size):
                x0, y = images[i:i + batch_size].detach(), labels[i:i + batch_size]
                select = None
                if select_draws:
                    seeds = _select_seeds(seed, select_draws)
                    select = lambda x, y=y, seeds=seeds: _margin(model, x, y, seeds)  # noqa: E731
                best, best_m = None, None
                for r in range(restarts):
                    start = None if r == 0 else torch.rand(x0.shape, generator=gen, device=x0.device) * 2 - 1
                    x, m = _pgd_batch(model, source, x0, y, eps, alpha, steps, start, select)
                    if best is None:
                        best, best_m = x, m
                    else:
                        better = m < best_m
                        best = torch.where(better[:, None, None, None], x, best)
                        best_m = torch.where(better, m, best_m)
                out.append(best.detach())
    finally:
        model.train(was_training)
    return torch.cat(out)


def library_attack(name: str, model, eps: float, steps: int, restarts: int, eot: int, queries: int, seed: int):
    """A torchattacks attack on ``model`` (APGD-CE, APGD-DLR, Square), L-inf."""
    try:
        import torchattacks
    except ImportError:
        raise SnnadvError("APGD and Square need torchattacks: pip install 'snnadv[attacks]'") from None
    if name in ("apgd-ce", "apgd-dlr"):
        return torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, seed=seed,
                                 loss=name.split("-")[1], eot_iter=eot)
    if name == "square":
        return torchattacks.Square(model, norm="Linf", eps=eps, n_queries=queries, n_restarts=1, seed=seed,
                                   loss="margin")
    raise SnnadvError(f"unknown library attack '{name}' (choose {', '.join(LIBRARY)})")


def run_library(attack, model, images, labels, eps: float, batch_size: int, seed: int) -> torch.Tensor:
    """Run a torchattacks attack batch by batch.  torchattacks re-seeds the global RNG,
    so it runs inside :func:`torch.random.fork_rng`; an SNN's encoder gets a seeded
    generator (fresh spikes on every call, reproducibly)."""
    if eps == 0:
        return images.clone()
    devices = [images.device.index or 0] if images.device.type == "cuda" else []
    out = []
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=devices), encoder_seed(model, seed):
            for i in range(0, len(images), batch_size):
                out.append(attack(images[i:i + batch_size], labels[i:i + batch_size]).detach())
    finally:
        model.train(was_training)
    x = torch.cat(out)
    return torch.min(torch.max(x, images - eps), images + eps).clamp(0.0, 1.0)


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


# --------------------------------------------------------------------------- the suite
@dataclass(frozen=True)
class Spec:
    """One attack configuration (its ``key`` identifies the crafted images)."""

    attack: str               # fgsm | pgd | apgd-ce | apgd-dlr | square | transfer
    path: str                 # gradient path (library: bptt; square: none; transfer: source kind)
    steps: int = 1
    restarts: int = 1
    eot: int = 1
    alpha: str = "adaptive"   # "paper" (eps / 4) or "adaptive"
    group: str = "adaptive"   # paper | adaptive | library | transfer | ladder

    @property
    def key(self) -> tuple:
        return (self.attack, self.path, self.steps, self.restarts, self.eot, self.alpha)

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
                blackbox_path: str = "autograd") -> tuple[list[Spec], list[tuple]]:
    """The attacks of ``s.suite`` (deduplicated) and the ladder (keys, weakest first)."""
    pp = paper_path(model)
    M = s.eot if is_snn(model) else 1
    specs: list[Spec] = []
    if s.suite in ("paper", "full"):
        specs += [Spec("fgsm", pp, 1, 1, 1, "paper", "paper"), Spec("pgd", pp, 7, 1, 1, "paper", "paper")]
    if s.suite in ("adaptive", "full"):
        for p in paths:
            specs.append(Spec("pgd", p, s.steps, s.restarts, M if stochastic_path(model, p) else 1))
        if s.library:  # torchattacks differentiates the module itself: BPTT with the training surrogate
            lp = "bptt" if is_snn(model) else "autograd"
            specs += [Spec("apgd-ce", lp, s.apgd_steps, s.restarts, M, group="library"),
                      Spec("apgd-dlr", lp, s.apgd_steps, s.restarts, M, group="library"),
                      Spec("square", "none", s.square_queries, 1, 1, group="library")]
        if has_blackbox:
            specs.append(Spec("transfer", blackbox_path, s.steps, 1, s.eot if blackbox_path == "alg1" else 1,
                              group="transfer"))
    ladder: list[tuple] = []
    if s.suite == "full":
        rungs = [Spec("pgd", pp, 7, 1, 1, "paper", "paper"), Spec("pgd", pp, s.steps, 1, 1, group="ladder"),
                 Spec("pgd", pp, s.steps, 1, M, group="ladder"),
                 Spec("pgd", pp, s.steps, s.restarts, M, group="ladder")]
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


def evaluate_model(model, images: torch.Tensor, labels: torch.Tensor, settings: EvalSettings,
                   reporter: Reporter | None = None, proxy=None, blackbox=None) -> dict:
    """Run the suite on an in-memory model (any ``nn.Module`` mapping [0, 1] images to logits).

    ``proxy``: the ANN for the ``ann`` path; ``blackbox``: a model to craft transfer
    attacks on.  Returns the result dict (rows, worst case, sweep, gradient
    statistics, flags); :func:`run_evaluate` adds the checkpoint information.
    """
    s = settings.check()
    reporter = reporter or Reporter(quiet=True)
    snn = is_snn(model)
    paths = resolve_paths(model, s.paths, s.slope)
    if "ann" in paths and proxy is None:
        raise SnnadvError("the 'ann' gradient path needs the ANN the SNN was converted from (proxy)")
    K = s.eval_draws if snn else 1
    M = s.eot if snn else 1
    bs, seed, N = s.batch_size, s.seed, len(images)
    bb_path = None if blackbox is None else ("alg1" if is_snn(blackbox) else "autograd")
    specs, ladder = build_suite(model, s, paths, blackbox is not None, bb_path or "autograd")
    model.eval()

    def source_for(path: str, eot: int):
        if path == "autograd":
            return make_gradient(model, None, eot)
        return make_gradient(model, path, eot if path != "ann" else 1, slope=s.slope, proxy=proxy)

    def adversarial(sp: Spec, eps: float) -> torch.Tensor:
        if eps == 0:
            return images.clone()
        if sp.attack == "fgsm":
            with encoder_seed(model, seed * 7919 + 1):
                return craft(FGSM(model, eps, source_for(sp.path, sp.eot)), images, labels, bs)
        if sp.attack == "pgd" and sp.alpha == "paper":  # the paper's PGD: last iterate, no restarts
            with encoder_seed(model, seed * 7919 + 2):
                return craft(PGD(model, eps, eps / 4, sp.steps, gradient=source_for(sp.path, sp.eot)),
                             images, labels, bs)
        if sp.attack == "pgd":
            return pgd_attack(model, source_for(sp.path, sp.eot), images, labels, eps,
                              adaptive_alpha(eps, sp.steps, s.alpha), sp.steps, sp.restarts, bs, seed,
                              (M if snn else 1) if sp.path == "ann" else None)
        if sp.attack == "transfer":  # crafted on the blackbox model alone (it never queries the target)
            src = make_gradient(blackbox, "alg1" if is_snn(blackbox) else None, sp.eot)
            return pgd_attack(blackbox, src, images, labels, eps, adaptive_alpha(eps, sp.steps, s.alpha),
                              sp.steps, 1, bs, seed)
        atk = library_attack(sp.attack, model, eps, sp.steps, sp.restarts, sp.eot, sp.steps, seed)
        return run_library(atk, model, images, labels, eps, bs, seed * 7919 + 3)

    clean = correct_matrix(model, images, labels, bs, K, seed)
    corrects: dict[tuple, list[torch.Tensor]] = {}
    rows: list[dict] = []
    sweep_eps = sorted(set(s.sweep_eps)) if s.suite == "full" else []
    total = len(specs) * len(s.eps) + len(sweep_eps)
    warnings: list[str] = []
    t_start = time.perf_counter()
    with reporter.progress(f"evaluating ({s.suite} suite)", total) as advance:
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
            sp = Spec("pgd", pp, s.sweep_steps, 1, M if stochastic_path(model, pp) else 1)
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
            stats[p] = gradient_stats(model if p != "ann" else proxy, source_for(p, 1), images[:n], labels[:n],
                                      M, seed, stochastic_path(model, p))

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


# --------------------------------------------------------------------------- checks
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


# --------------------------------------------------------------------------- models
def find_proxy(target_path, ckpt: dict, device, proxy_ckpt=None, input_bits=None, warn=None):
    """The ANN for the ``ann`` path: ``proxy_ckpt``, else the parent chain's ANN (paths
    as recorded, else beside the child; sha256 checked), else the SNN's own weights
    loaded into an ANN.  Returns (model, info)."""
    warn = warn or (lambda msg: None)
    if proxy_ckpt is not None:
        model, info, _ = load_attack_model(proxy_ckpt, "ann", device, None, input_bits)
        return model, {**info, "source": "config"}
    cur_path, cur, why = Path(target_path), ckpt, None
    for _ in range(8):
        if cur["stage"] == "ann":
            break
        parent = cur.get("parent") or {}
        if not parent.get("path"):
            why = f"'{cur_path}' records no parent"
            break
        recorded = Path(parent["path"])
        found = next((c for c in (recorded, cur_path.parent / recorded.name) if c.is_file()), None)
        if found is None:
            why = f"parent '{recorded}' of '{cur_path}' not found"
            break
        if parent.get("sha256") and file_hash(found) != parent["sha256"]:
            why = f"parent '{found}' changed since '{cur_path}' was made (sha256 differs)"
            break
        cur_path, cur = found, load_checkpoint(found)
    if why is None and cur["stage"] == "ann":
        model = build_model(cur, device, input_bits=input_bits)
        return model, {"source": "parent", "path": str(cur_path), "sha256": file_hash(cur_path), "stage": "ann",
                       "arch": cur["spec"]["arch"], "dataset": cur["dataset"]}
    warn(f"ann path: {why or 'no ANN in the parent chain'}; using the SNN's own weights in an ANN")
    model = build_model({**ckpt, "stage": "ann"}, device, input_bits=input_bits)
    return model, {"source": "own-weights", "path": str(target_path), "sha256": file_hash(target_path),
                   "stage": "ann", "arch": ckpt["spec"]["arch"], "dataset": ckpt["dataset"], "why": why}


@guarded
def run_evaluate(cfg: dict, reporter: Reporter | None = None, outputs: Outputs | None = None) -> dict:
    """``snnadv evaluate``: load the target, run the suite, print, write JSON/Markdown/plot.

    The outputs are claimed (:mod:`snnadv.outputs`) once the target is loaded, before any attack."""
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    if cfg.get("target_ckpt") is None:
        raise SnnadvError("evaluate needs --target-ckpt")
    s = EvalSettings.from_config({**cfg, "batch_size": cfg.get("batch_size") or 64})
    device = resolve_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    model, info, ckpt = load_attack_model(cfg["target_ckpt"], None, device, cfg.get("timesteps"),
                                          cfg.get("input_bits"), cfg.get("precision"))
    paths = resolve_paths(model, s.paths, s.slope)
    json_path, md_path, png_path = output_paths(cfg.get("out"), info)
    outputs.claim([json_path, md_path, png_path], cfg, inputs={
        f"--{k.replace('_', '-')}": cfg.get(k) for k in ("target_ckpt", "proxy_ckpt", "blackbox_ckpt")})
    warnings: list[str] = []

    def warn(msg):
        warnings.append(msg)
        reporter.print(f"[yellow]warning:[/] {msg}")

    proxy = proxy_info = None
    if is_snn(model) and "ann" in paths:
        proxy, proxy_info = find_proxy(cfg["target_ckpt"], ckpt, device, cfg.get("proxy_ckpt"),
                                       cfg.get("input_bits"), warn)
        check_compatible(info, proxy_info, ckpt, load_checkpoint(proxy_info["path"]))
    blackbox = bb_info = None
    if cfg.get("blackbox_ckpt"):
        blackbox, bb_info, bb_ckpt = load_attack_model(cfg["blackbox_ckpt"], None, device, None, cfg.get("input_bits"),
                                                       cfg.get("precision"))
        check_compatible(bb_info, info, bb_ckpt, ckpt)
    if s.library and s.suite != "paper":
        try:
            import torchattacks  # noqa: F401
        except ImportError:
            warn("torchattacks is not installed: APGD and Square skipped (pip install 'snnadv[attacks]')")
            s.library = False
    for e in s.eps + s.sweep_eps:
        for w in check_eps(e, s.alpha) if s.alpha is not None and e > 0 else []:
            warn(w)
    test = load_split(info["dataset"], cfg["data_dir"], train=False, device=device, subset=cfg["test_subset"],
                      download=cfg["download"])
    images, labels = to_float(test.images), test.labels
    result = evaluate_model(model, images, labels, s, reporter, proxy, blackbox)
    lib = None
    try:
        import torchattacks

        lib = torchattacks.__version__
    except ImportError:
        pass
    result.update(target=info, proxy=proxy_info, blackbox=bb_info, config=cfg,
                  versions={**versions(), "torchattacks": lib})
    warnings.extend(result["warnings"])
    result["warnings"] = warnings  # the same list: the plot's warning lands in the JSON too
    print_result(result, reporter)
    result["plot"] = plot_eps(result, png_path, warn)
    write_json(json_path, result)
    atomic_write_text(md_path, evaluate_markdown(result))
    reporter.print(f"[green]saved[/] {json_path} and {md_path}" + (f" and {png_path}" if result["plot"] else ""))
    return result


def output_paths(out, info: dict) -> tuple[Path, Path, Path]:
    """``--out`` ending in .json: that file, the Markdown and -eps.png beside it; else a
    folder (default runs/evaluate) with evaluate-<stage>.json/.md/-eps.png.  The
    Markdown name always contains "evaluate": ``snnadv report`` includes such files."""
    if out and Path(out).suffix == ".json":
        p = Path(out)
        md = p.with_suffix(".md") if "evaluate" in p.stem else p.with_name(p.stem + "-evaluate.md")
        return p, md, p.with_name(p.stem + "-eps.png")
    folder = Path(out or "runs/evaluate")
    stem = f"evaluate-{info['stage']}"
    return folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}-eps.png"


# --------------------------------------------------------------------------- output
def _cell(d: dict) -> str:
    return f"{d['mean']:.1f}" if d["std"] == 0 else f"{d['mean']:.1f}±{d['std']:.1f}"


def result_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The table (header, rows): clean first, the per-sample worst case last."""
    header = ["attack", "path", "steps", "restarts", "eot", "group"] + [f"acc % eps={l}" for l in result["eps_labels"]]
    n = len(result["eps"])
    rows = [["clean", "-", "-", "-", "-", "-"] + [_cell(result["clean"])] * n]
    order = {"paper": 0, "adaptive": 1, "library": 3, "transfer": 4, "ladder": 5}
    body = sorted(result["rows"], key=lambda r: order[r["group"]])
    worst_paths_done = False
    for r in body:
        if r["group"] != "adaptive" and not worst_paths_done and result.get("worst_paths") and order[r["group"]] > 1:
            rows.append(["worst over paths", "per sample", "", "", "", "adaptive"]
                        + [_cell(d) for d in result["worst_paths"]])
            worst_paths_done = True
        rows.append([r["label"], r["path"], str(r["steps"]), str(r["restarts"]), str(r["eot"]), r["group"]]
                    + [_cell(d) for d in r["acc"]])
    if result.get("worst_paths") and not worst_paths_done:
        rows.append(["worst over paths", "per sample", "", "", "", "adaptive"]
                    + [_cell(d) for d in result["worst_paths"]])
    rows.append(["WORST CASE", "all attacks", "", "", "", "per sample"] + [_cell(d) for d in result["worst_case"]])
    return header, rows


def flag_lines(result: dict, markdown: bool = False) -> list[str]:
    out = []
    for name, f in result["flags"].items():
        mark = {True: "FLAG", False: "ok", None: "n/a"}[f["flag"]]
        detail = f" ({'; '.join(f['detail'])})" if f["detail"] else ""
        mark = f"- **{mark}**" if markdown else mark
        out.append(f"{mark} {name}: {f['explain']}{detail}")
    return out


def _stats_rows(result: dict) -> list[list[str]]:
    def c(v):
        return "-" if v is None else f"{v:.2f}"

    return [[p, f"{v['zero_frac'] * 100:.1f}", f"{v['zero_images'] * 100:.1f}", c(v["cos_single"]), c(v["cos_eot"]),
             str(v["eot"])] for p, v in result.get("gradient_stats", {}).items()]


STATS_HEADER = ["path", "zero grad %", "all-zero images %", "cos (1 draw)", "cos (EOT)", "eot"]


def _title(result: dict) -> str:
    t = result.get("target") or {}
    who = f"{t.get('stage', 'model')} {t.get('arch', '')}".strip()
    return (f"Robustness of {who} ({result['suite']} suite): accuracy %, "
            f"{result['images']} images, mean±std over {result['eval_draws']} encoder draw(s)")


def print_result(result: dict, reporter: Reporter) -> None:
    from rich.table import Table

    from .report import fmt

    header, rows = result_rows(result)
    caption = "\n".join(flag_lines(result))
    t = Table(title=_title(result), title_justify="left", caption=caption, caption_justify="left")
    for c in header:
        text = c in ("attack", "path", "group")
        t.add_column(c, justify="left" if text else "right", no_wrap=not text, min_width=10 if text else None)
    for r in rows:
        t.add_row(*[fmt(v) for v in r], end_section=r[0] == "clean")
    console = reporter.console
    if not console.is_terminal and not console.quiet:  # a log file or pipe: the whole table, not 80 columns
        from rich.console import Console

        console = Console(file=console.file, width=max(console.width, 160), highlight=False)
    console.print(t)
    if result.get("sweep"):
        sw = result["sweep"]
        reporter.table(f"Accuracy vs eps: {sw['attack']} ({sw['path']}, eot {sw['eot']})", ["eps", "acc %"],
                       [[p["label"], _cell(p["acc"])] for p in sw["points"]])
    if result.get("gradient_stats"):
        reporter.table("Gradient statistics (clean images)", STATS_HEADER, _stats_rows(result))
    if result.get("masking_suspected"):
        reporter.print("[red]gradient masking suspected[/]: the numbers above are upper bounds on robustness")


def evaluate_markdown(result: dict) -> str:
    """A Markdown section (for ``snnadv report``): settings, table, checks, statistics."""
    t = result.get("target") or {}
    s = result["settings"]
    header, rows = result_rows(result)
    lines = [f"### {_title(result)}", ""]
    if t:
        lines += [f"Target `{t.get('path')}` (sha256 `{str(t.get('sha256'))[:16]}`, T = {t.get('num_steps')}); "
                  f"paths: {', '.join(result['paths'])}; EOT {result['eot']}; PGD {s['steps']} steps x "
                  f"{s['restarts']} restarts; APGD {s['apgd_steps']} steps; Square {s['square_queries']} queries; "
                  f"seed {s['seed']}.", ""]
    if result.get("proxy"):
        p = result["proxy"]
        lines += [f"ANN proxy ({p['source']}): `{p['path']}` (sha256 `{str(p['sha256'])[:16]}`)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + ["", "**Sanity checks**", ""] + flag_lines(result, True)
    if result.get("sweep"):
        sw = result["sweep"]
        lines += ["", f"**Accuracy vs eps** ({sw['attack']}, {sw['path']}, eot {sw['eot']}): "
                  + ", ".join(f"{p['label']}: {_cell(p['acc'])}" for p in sw["points"])]
    if result.get("gradient_stats"):
        lines += ["", "**Gradient statistics** (clean images)", "", "| " + " | ".join(STATS_HEADER) + " |",
                  "|" + "---|" * len(STATS_HEADER)] + ["| " + " | ".join(r) + " |" for r in _stats_rows(result)]
    if result.get("plot"):  # named, not embedded: the report includes this text from another folder
        lines += ["", f"Accuracy-vs-eps plot: `{Path(result['plot']).name}`."]
    if result.get("masking_suspected"):
        lines += ["", "**Gradient masking suspected**: these accuracies are upper bounds on robustness."]
    return "\n".join(lines) + "\n"


def plot_eps(result: dict, path: Path, warn=None) -> str | None:
    """Accuracy vs eps: the sweep and, when several eps were given, the paper's PGD, Square
    and the worst cases (error bars: std over encoder draws); needs matplotlib."""
    warn = warn or (lambda msg: None)
    series = []
    if result.get("sweep"):
        pts = result["sweep"]["points"]
        series.append((f"{result['sweep']['attack']} ({result['sweep']['path']}) sweep", [p["eps"] for p in pts],
                       [p["acc"]["mean"] for p in pts], [p["acc"]["std"] for p in pts]))
    if len(result["eps"]) > 1:  # the paper's PGD, Square, the worst cases; from the clean accuracy at eps 0
        c = result["clean"]
        xs = [0.0] + list(result["eps"])
        picked = [(f"{r['label']} ({r['path']}, {r['group']})", r["acc"]) for r in result["rows"]
                  if (r["group"] == "paper" and r["attack"] == "pgd") or r["attack"] == "square"]
        if result.get("worst_paths"):
            picked.append(("worst over gradient paths", result["worst_paths"]))
        picked.append(("worst case", result["worst_case"]))
        for name, accs in picked:
            series.append((name, xs, [c["mean"]] + [d["mean"] for d in accs], [c["std"]] + [d["std"] for d in accs]))
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn("matplotlib is not installed: accuracy-vs-eps plot skipped (pip install matplotlib)")
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, xs, ys, es in series:
        ax.errorbar([x * 255 for x in xs], ys, yerr=es, marker="o", capsize=3, label=name,
                    linewidth=2.5 if name.endswith("sweep") or name == "worst case" else 1)
    t = result.get("target") or {}
    ax.set_title(f"{t.get('stage', 'model')} {t.get('arch', '')}: accuracy vs eps")
    ax.set_xlabel("eps (x 1/255)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_target(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return str(path)
