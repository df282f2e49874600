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
"""

from __future__ import annotations

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
    ``restarts`` / ``keep_best`` / ``select``: see the module docstring."""

    name = "pgd"

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 7,
                 random_start: bool = False, gradient=None, targeted: bool = False,
                 generator: torch.Generator | None = None, *, restarts: int = 1, keep_best: bool = False,
                 select=None):
        super().__init__(model, eps, gradient, targeted)
        check_eps(eps, alpha, steps)
        if not isinstance(restarts, int) or restarts < 1:
            raise SnnadvError(f"restarts must be an integer of at least 1, got {restarts}")
        if (restarts > 1 or select is not None) and not keep_best:
            raise SnnadvError("PGD restarts and select choose among iterates: they need keep_best=True")
        self.alpha, self.steps, self.random_start, self.generator = float(alpha), int(steps), random_start, generator
        self.restarts, self.keep_best, self.select = restarts, keep_best, select

    def forward(self, images, labels, target_labels=None):
        best = best_m = None
        for r in range(self.restarts):
            start = None
            if self.random_start or r > 0:
                start = self.uniform(images.shape, r, self.generator, images.device) * 2 - 1
            x, m = self.run(images, labels, target_labels, start)
            if best is None:
                best, best_m = x, m
            else:
                better = m < best_m
                best = torch.where(_per_image(better, x), x, best)
                best_m = torch.where(better, m, best_m)
        return best

    def run(self, images, labels, target_labels=None, start: torch.Tensor | None = None):
        """One run from ``images + eps * start`` (``start`` in [-1, 1]; None: the clean
        images): (the last iterate, None), or with ``keep_best`` (the best iterate, its margin)."""
        x = images if start is None else self.project(images + self.eps * start, images)
        best = best_m = None
        if self.keep_best:
            best, best_m = images.clone(), torch.full((len(images),), float("inf"), device=images.device)
        for t in range(self.steps + 1):
            last = t == self.steps
            if last and not self.keep_best:
                break
            if not last or self.select is None:  # with select, the last iterate needs no gradient
                direction, logits = self.step_direction(x, labels, target_labels)
            if self.keep_best:
                m = self.select(x, labels) if self.select is not None else self.margin(logits, labels, target_labels)
                better = m < best_m
                best = torch.where(_per_image(better, x), x, best)
                best_m = torch.where(better, m, best_m)
            if not last:
                x = self.project(x + self.alpha * direction, images)
        return (best, best_m) if self.keep_best else (x, None)

    def margin(self, logits, labels, target_labels=None) -> torch.Tensor:
        """The attack's measure of an iterate (lower = better for the attack)."""
        return -margins(logits, target_labels) if self.targeted else margins(logits, labels)


def _per_image(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))
