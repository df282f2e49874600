"""PGD (paper Eq. 2), and the options of adaptive attacks: restarts and the best iterate.

One loop serves the paper's attack (:class:`PGD` with its defaults: one run from the
clean image, or from a random point with ``random_start``, returning the last
iterate) and the adaptive evaluation (:mod:`snnadv.attacks.suite`): ``restarts`` runs,
the first from the clean image (or a random point with ``random_start``), the others
from uniform random points of the eps-ball (drawn from ``generator``; inside
:meth:`~snnadv.attacks.Attack.keyed`, keyed by image and restart instead), keeping per
image the best iterate of all steps and runs (``keep_best``).  "Best" = the lowest
margin z_y - max_{j != y} z_j (targeted: max_{j != t} z_j - z_t), read from the logits
the gradient source returns with each gradient (for an SNN: the EOT mean of that
step's draws), or from ``select(x, labels)`` when given (needed when the gradient
comes from a proxy).  Returning the best rather than the last iterate makes more steps
or restarts never worse by the attack's own measure.

Early exit per sample (``early_exit``, with ``keep_best``; AutoAttack-style): an image
whose current iterate is already adversarial (margin < 0: misclassified, or targeted:
the target reached) stops there: that iterate is its result, and the image leaves the
batch for the remaining steps and restarts, so later steps compute only on the images
still standing.  The images adversarial at the end are the same as without early exit
(each one's margins are the same up to the step it leaves at); the others never leave,
and inside :meth:`~snnadv.attacks.Attack.keyed` their iterates are bit for bit those of
the run without early exit: the images left keep their global indices and the
encoder's call count (:meth:`~snnadv.attacks.Attack.rows`), so they draw the same
spikes and random starts (as for any other batching, up to the float rounding of a
batch of one image, which PyTorch's CPU kernels compute differently: ~1e-9 in the
logits, which matters only to a margin or gradient component that close to 0).  An
image that leaves returns its first adversarial iterate, not the lowest-margin one of
all steps: for a deterministic model that decides robust accuracy the same way, but on
a stochastic SNN an iterate adversarial on one step's draws often does not fool fresh
ones (measured on the quick run's VGG5 SNN-BP, T = 16, 8/255, cifar10-mini images
correct on one of 4 draws: PGD-20 x2 with one draw per step, 1.5x less time but robust
accuracy over 4 fresh draws 78.5 % against 65.6 % without early exit; PGD-20 with EOT
4: 1.35x, 81.2 % against 71.9 %).  The paper's PGD (the last iterate) never exits.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from ..errors import SnnadvError
from ..registry import register_attack
from .base import Attack, check_eps


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per image (negative = misclassified)."""
    zy = logits.gather(1, labels[:, None])[:, 0]
    return zy - logits.scatter(1, labels[:, None], float("-inf")).amax(1)


@register_attack("pgd")
class PGD(Attack):
    """Eq. 2: k steps x <- Proj_{x+eps}(x + alpha * sign(grad)), optional random start;
    ``restarts`` / ``keep_best`` / ``select`` / ``early_exit``: see the module docstring."""

    name = "pgd"

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 7,
                 random_start: bool = False, gradient=None, targeted: bool = False,
                 generator: torch.Generator | None = None, *, restarts: int = 1, keep_best: bool = False,
                 select=None, early_exit: bool = False):
        super().__init__(model, eps, gradient, targeted)
        check_eps(eps, alpha, steps)
        if not isinstance(restarts, int) or restarts < 1:
            raise SnnadvError(f"restarts must be an integer of at least 1, got {restarts}")
        if (restarts > 1 or select is not None) and not keep_best:
            raise SnnadvError("PGD restarts and select choose among iterates: they need keep_best=True")
        if early_exit and not keep_best:
            raise SnnadvError("PGD early_exit keeps each image's adversarial iterate: it needs keep_best=True")
        self.alpha, self.steps, self.random_start, self.generator = float(alpha), int(steps), random_start, generator
        self.restarts, self.keep_best, self.select, self.early_exit = restarts, keep_best, select, bool(early_exit)

    def forward(self, images, labels, target_labels=None):
        return self.search(images, labels, target_labels)[0]

    def search(self, images, labels, target_labels=None):
        """(the adversarial images, their margins by the attack's measure): the last iterate
        and None, or with ``keep_best`` the best iterate of all steps and restarts (with
        ``early_exit``: an image's first adversarial one) and its margin."""
        if not self.keep_best:
            start = None
            if self.random_start:
                start = self.uniform(images.shape, 0, self.generator, images.device) * 2 - 1
            return self.run(images, labels, target_labels, start)
        best = images.clone()
        best_m = torch.full((len(images),), float("inf"), device=images.device)
        live = torch.arange(len(images), device=images.device)  # the images still attacked
        with ExitStack() as narrowed:
            for r in range(self.restarts):
                x0, y, t = images[live], labels[live], None if target_labels is None else target_labels[live]
                start = None
                if self.random_start or r > 0:
                    start = self.uniform(x0.shape, r, self.generator, images.device) * 2 - 1
                _keep_lower(best, best_m, live, *self.run(x0, y, t, start))
                if self.early_exit and r + 1 < self.restarts:
                    stay = ~(best_m[live] < 0)
                    if not stay.any():
                        break
                    if not stay.all():
                        keep = stay.nonzero()[:, 0]
                        narrowed.enter_context(self.rows(keep))
                        live = live[keep]
        return best, best_m

    def run(self, images, labels, target_labels=None, start: torch.Tensor | None = None):
        """One run from ``images + eps * start`` (``start`` in [-1, 1]; None: the clean
        images): (the last iterate, None), or with ``keep_best`` (the best iterate, its
        margin); with ``early_exit`` an image stops at its first adversarial iterate."""
        x = images if start is None else self.project(images + self.eps * start, images)
        best = best_m = None
        if self.keep_best:
            best, best_m = images.clone(), torch.full((len(images),), float("inf"), device=images.device)
        rows = torch.arange(len(images), device=images.device)  # the images still stepping
        with ExitStack() as narrowed:
            for t in range(self.steps + 1):
                last = t == self.steps
                if last and not self.keep_best:
                    break
                if not last or self.select is None:  # with select, the last iterate needs no gradient
                    direction, logits = self.step_direction(x, labels, target_labels)
                if self.keep_best:
                    m = self.select(x, labels) if self.select is not None else \
                        self.margin(logits, labels, target_labels)
                    _keep_lower(best, best_m, rows, x, m)
                    if self.early_exit and not last:
                        stay = ~(m < 0)  # (a NaN margin stays)
                        if not stay.any():
                            break
                        if not stay.all():
                            keep = stay.nonzero()[:, 0]
                            narrowed.enter_context(self.rows(keep))
                            rows, x, direction, images, labels = (v[keep] for v in (rows, x, direction, images, labels))
                            target_labels = None if target_labels is None else target_labels[keep]
                if not last:
                    x = self.project(x + self.alpha * direction, images)
        return (best, best_m) if self.keep_best else (x, None)

    def margin(self, logits, labels, target_labels=None) -> torch.Tensor:
        """The attack's measure of an iterate (lower = better for the attack)."""
        return -margins(logits, target_labels) if self.targeted else margins(logits, labels)


def _keep_lower(best: torch.Tensor, best_m: torch.Tensor, rows: torch.Tensor, x: torch.Tensor,
                m: torch.Tensor) -> None:
    """``best[rows]``, ``best_m[rows]`` <- ``x``, ``m`` where ``m`` is lower (in place)."""
    better = m < best_m[rows]
    best[rows] = torch.where(_per_image(better, x), x, best[rows])
    best_m[rows] = torch.where(better, m, best_m[rows])


def _per_image(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))
