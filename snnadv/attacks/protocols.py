"""Named evaluation protocols: frozen presets of ``snnadv evaluate --protocol NAME``.

A protocol fixes everything a robustness number depends on (eps list, attacks, their
steps, EOT, encoder draws, gradient paths, the sharpness search); individual options
given on the command line or in the config still override it (:func:`resolve_protocol`).
Protocols run as a cascade (:mod:`snnadv.attacks.cascade`): per eps, the attacks in
order, each only on the images still correct under the worst case so far.  An ANN target
is attacked with autograd whatever paths a preset names (its only gradient).

* ``paper``: FGSM and PGD-7 (alpha eps/4, the paper's gradient: alg1 for SNNs,
  autograd for ANNs), one EOT draw, eps 8/255 (the paper's Sec. 3.3).
* ``strong``: APGD-CE and APGD-DLR, 100 steps, through every estimator (every path of
  ``all`` and ``bptt-fast-sigmoid`` at the sharpness found by
  :func:`snnadv.sharpness.search_sharpness` on a held-out batch), EOT 10 for SNNs
  (:class:`snnadv.estimator.EstimatorModule`), then Square with 5,000 queries on the
  real model (the gradient-free check), eps 2/255, 4/255, 8/255; per-sample worst case.
* ``strong-cpu``: ``strong`` cut to what 2 CPU cores finish on a few hundred images of a
  T = 32 VGG5: the paper's FGSM and PGD-7 run first as cheap filters (they stay in the
  worst case, so ``strong-cpu`` is never weaker than ``paper`` on the same images and its
  ``pgd`` row's cumulative column *is* the paper protocol's result), then APGD-CE and
  APGD-DLR at 25 steps with EOT 4 through alg1, ``bptt-fast-sigmoid`` at the searched
  sharpness and ``rate``, then Square with 300 queries; eps 8/255; early exit for APGD
  only (PGD stays the paper's, last iterate).
* ``quick``: the shape of ``strong`` at test size (APGD 5 steps on the paper path, EOT
  2, Square 50 queries, 2 draws, eps 8/255).

``early_exit`` (on in ``strong`` and ``quick``, where only robust accuracy counts; off in
``paper``): APGD (:mod:`snnadv.attacks.apgd`) drops an image from the batch once it is
fooled; on an SNN only when the iterate is wrong on *every* evaluation draw that will
score it (:class:`snnadv.attacks.apgd.FooledOnEveryDraw`: the exit then never weakens
the cascade's result), on an ANN when its logits misclassify it.  A protocol's ``pgd``
keeps each image's best iterate and drops the image as soon as one step's logits call it
adversarial (:mod:`snnadv.attacks.pgd`); on a stochastic SNN that makes PGD weaker, not
only faster (fresh draws often classify that iterate correctly), so no preset runs it.
Square stops querying an image once it is fooled (torchattacks).  Every row of a result
says whether its attack exited early and on what test.

Every protocol also runs as a transfer (blackbox) attack, crafted on a source model and
scored on the target (``--source-ckpt``; :mod:`snnadv.attacks.run_protocol`): the same
attacks on the source, without Square (a query attack).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import SnnadvError
from ..values import parse_list


@dataclass(frozen=True)
class Protocol:
    """One preset.  ``attacks``: in cascade order; ``fgsm``/``pgd`` are the paper's (alpha
    eps/4, last iterate), ``apgd-ce``/``apgd-dlr`` run once per gradient path in ``paths``
    (``paper``: the paper's path only; ``all``: every estimator), ``square`` once."""

    name: str
    description: str
    eps: tuple = (8 / 255,)
    attacks: tuple = ("fgsm", "pgd")
    paths: str = "paper"
    eot: int = 1
    eval_draws: int = 4
    steps: int = 7             # the paper's PGD
    apgd_steps: int = 100
    restarts: int = 1
    square_queries: int = 5000
    sharpness: bool = False    # golden-section search of bptt-fast-sigmoid's slope (held-out batch)
    sharpness_iters: int = 8
    sharpness_images: int = 32
    chunk: int = 100           # images per resumable piece
    batched_eot: bool = True   # EOT draws as one pass over [M*B] (snnadv.eot)
    early_exit: bool = False   # pgd: the best iterate, each image dropped once adversarial
    exit_attacks: tuple = ("pgd", "apgd-ce", "apgd-dlr")  # the attacks ``early_exit`` applies to

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eps"] = list(self.eps)
        d["attacks"] = list(self.attacks)
        d["exit_attacks"] = list(self.exit_attacks)
        return d


PROTOCOLS: dict[str, Protocol] = {
    "paper": Protocol("paper", "FGSM and PGD-7 with the paper's gradient, one EOT draw (Sec. 3.3)",
                      eps=(8 / 255,), attacks=("fgsm", "pgd"), paths="paper", eot=1, eval_draws=4),
    "strong": Protocol("strong", "APGD-CE and APGD-DLR (100 steps, EOT 10) through every estimator with the "
                       "sharpness search, Square 5,000 queries; per-sample worst case",
                       eps=(2 / 255, 4 / 255, 8 / 255), attacks=("apgd-ce", "apgd-dlr", "square"), paths="all",
                       eot=10, eval_draws=4, apgd_steps=100, square_queries=5000, sharpness=True,
                       early_exit=True),
    "quick": Protocol("quick", "test size: FGSM, APGD-CE (5 steps, EOT 2), Square 50 queries",
                      eps=(8 / 255,), attacks=("fgsm", "apgd-ce", "square"), paths="paper", eot=2, eval_draws=2,
                      apgd_steps=5, square_queries=50, sharpness=False, sharpness_iters=2, sharpness_images=8,
                      chunk=8, early_exit=True),
    "strong-cpu": Protocol("strong-cpu", "strong sized for 2 CPU cores: the paper's FGSM and PGD-7 first, then "
                           "APGD-CE and APGD-DLR (25 steps, EOT 4) through alg1, bptt-fast-sigmoid at the searched "
                           "sharpness and rate, Square 300 queries, eps 8/255; per-sample worst case",
                           eps=(8 / 255,), attacks=("fgsm", "pgd", "apgd-ce", "apgd-dlr", "square"),
                           paths="alg1,bptt-fast-sigmoid,rate", eot=4, eval_draws=4, apgd_steps=25,
                           square_queries=300, sharpness=True, sharpness_iters=6, sharpness_images=32, chunk=50,
                           early_exit=True, exit_attacks=("apgd-ce", "apgd-dlr")),
}

#: the attacks a protocol may run, in the order the cascade should run them (cheap first)
ATTACK_NAMES = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "square")

#: the settings a command-line option or config key may override (the option's name)
OVERRIDABLE = ("eps", "attacks", "paths", "eot", "eval_draws", "steps", "apgd_steps", "restarts", "square_queries",
               "chunk", "early_exit", "sharpness_images")


def resolve_protocol(name: str, overrides: dict | None = None) -> Protocol:
    """The protocol ``name`` with the given ``overrides`` (keys of :data:`OVERRIDABLE`;
    None values are ignored).  ``eps`` may be a list of floats."""
    if name not in PROTOCOLS:
        raise SnnadvError(f"unknown protocol '{name}' (choose {', '.join(PROTOCOLS)})")
    p = PROTOCOLS[name]
    changes = {}
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in OVERRIDABLE:
            raise SnnadvError(f"protocol setting '{k}' cannot be overridden (choose {', '.join(OVERRIDABLE)})")
        if k == "attacks":
            v = parse_list(v) if isinstance(v, str) else list(v)
            bad = [a for a in v if a not in ATTACK_NAMES]
            if bad or not v or len(set(v)) != len(v):
                raise SnnadvError(f"protocol attacks must be distinct names of {', '.join(ATTACK_NAMES)}, got "
                                  f"{','.join(map(str, v)) or 'none'}")
        changes[k] = tuple(v) if k in ("eps", "attacks") else v
    if not changes:
        return p
    d = {**asdict(p), **changes}
    return Protocol(**d)

