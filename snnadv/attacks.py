"""Gradient-sign attacks, torchattacks' calling convention (paper Sec. 2.1, Eq. 1-2).

    attack = PGD(model, eps=8/255, alpha=2/255, steps=7, random_start=False)
    x_adv = attack(images, labels)

Images are in [0, 1]; any normalisation lives inside the model.  Attacks are
untargeted unless ``targeted=True``, in which case ``attack(images, labels,
target_labels)`` moves towards the given targets (they are really used, unlike the
original code).  Every adversarial image lies in [0, 1] and within the L-inf
eps-ball of its clean image.  The gradient comes from a swappable source
(:mod:`snnadv.gradients`): autograd for an ANN, Algorithm 1 or BPTT for an SNN.
The model is put in eval mode while attacking and returned to the mode it was in.

Large T.  On a GPU, an SNN's gradient is taken in pieces of the batch when the whole
batch would not fit the free memory by the estimate of :mod:`snnadv.memory` (BPTT at
T=2500 keeps ~0.4 MB per image and step); the loss is a sum over images, so the
pieces' gradients are the batch's gradient (with the encoder's draws in a different
order).  On a CPU the batch is never split.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SnnadvError
from .gradients import make_gradient


def check_eps(eps: float, alpha: float | None = None, steps: int | None = None) -> list[str]:
    """Validate attack settings; returns warnings (alpha > eps)."""
    if not 0.0 <= eps <= 1.0:
        raise SnnadvError(f"eps must be in [0, 1] (pixel scale), got {eps:g}")
    if steps is not None and steps < 1:
        raise SnnadvError(f"steps must be at least 1, got {steps}")
    warnings = []
    if alpha is not None:
        if alpha <= 0:
            raise SnnadvError(f"alpha must be positive, got {alpha:g}")
        if alpha > eps:
            warnings.append(f"alpha {alpha:g} > eps {eps:g}: each step overshoots the eps-ball")
    return warnings


class Attack:
    """Base: holds the model, eps, the gradient source and the target mode."""

    name = "attack"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, gradient=None, targeted: bool = False):
        check_eps(eps)
        self.model, self.eps, self.targeted = model, float(eps), targeted
        self.gradient = gradient or make_gradient(model)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 target_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.targeted and target_labels is None:
            raise SnnadvError(f"targeted {self.name} needs target labels")
        was_training = self.model.training
        self.model.eval()
        try:
            return self.perturb(images.detach(), labels, target_labels).detach()
        finally:
            self.model.train(was_training)

    def step_direction(self, x: torch.Tensor, labels, target_labels) -> torch.Tensor:
        """sign of the loss gradient, uphill (untargeted) or towards the targets."""
        if self.targeted:
            return -self.input_gradient(x, target_labels).sign()
        return self.input_gradient(x, labels).sign()

    def input_gradient(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The gradient source's dJ/dx, in pieces of the batch where it would not fit."""
        piece = self.piece_size(x)
        if piece >= len(x):
            return self.gradient(x, labels)[0]
        return torch.cat([self.gradient(x[i:i + piece], labels[i:i + piece])[0] for i in range(0, len(x), piece)])

    def piece_size(self, x: torch.Tensor) -> int:
        """Images per gradient call: the whole batch, unless an SNN's gradient at its T
        would not fit the device's free memory (:func:`snnadv.memory.free_bytes`)."""
        from . import memory
        from .models import SNN

        budget = memory.free_bytes(x.device)
        if budget is None or not isinstance(self.model, SNN):
            return len(x)
        kind = "alg1" if getattr(self.gradient, "name", "").startswith("alg1") else "bptt"
        return memory.max_batch(self.model, len(x), self.model.num_steps, kind, budget)

    def project(self, x_adv: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Clip to the eps-ball around ``images`` and to [0, 1]."""
        return torch.min(torch.max(x_adv, images - self.eps), images + self.eps).clamp(0.0, 1.0)

    def perturb(self, images, labels, target_labels):
        raise NotImplementedError


class FGSM(Attack):
    """Eq. 1: x_adv = x + eps * sign(grad_x J(x, y))."""

    name = "fgsm"

    def perturb(self, images, labels, target_labels):
        return self.project(images + self.eps * self.step_direction(images, labels, target_labels), images)


class PGD(Attack):
    """Eq. 2: k steps x <- Proj_{x+eps}(x + alpha * sign(grad)), optional random start."""

    name = "pgd"

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 7,
                 random_start: bool = False, gradient=None, targeted: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__(model, eps, gradient, targeted)
        check_eps(eps, alpha, steps)
        self.alpha, self.steps, self.random_start, self.generator = float(alpha), int(steps), random_start, generator

    def perturb(self, images, labels, target_labels):
        x = images
        if self.random_start:
            noise = torch.rand(images.shape, generator=self.generator, device=images.device) * 2 - 1
            x = self.project(images + self.eps * noise, images)
        for _ in range(self.steps):
            x = self.project(x + self.alpha * self.step_direction(x, labels, target_labels), images)
        return x


ATTACKS = {"fgsm": FGSM, "pgd": PGD}


def make_attack(name: str, model, eps: float, alpha: float = 2 / 255, steps: int = 7,
                random_start: bool = False, gradient=None, targeted: bool = False, generator=None) -> Attack:
    if name == "fgsm":
        return FGSM(model, eps, gradient, targeted)
    if name == "pgd":
        return PGD(model, eps, alpha, steps, random_start, gradient, targeted, generator)
    raise SnnadvError(f"unknown attack '{name}' (choose fgsm or pgd)")


def parse_eps(text) -> float:
    """'8/255', '0.03' or a number -> float."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        if "/" in str(text):
            num, den = str(text).split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise SnnadvError(f"cannot read '{text}' as a number (e.g. 8/255 or 0.031)") from None
