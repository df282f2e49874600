"""FGSM (paper Eq. 1): one signed-gradient step of size eps."""

from __future__ import annotations

from ..registry import register_attack
from .base import Attack


@register_attack("fgsm")
class FGSM(Attack):
    """Eq. 1: x_adv = x + eps * sign(grad_x J(x, y))."""

    name = "fgsm"

    def forward(self, images, labels, target_labels=None):
        direction, _ = self.step_direction(images, labels, target_labels)
        return self.project(images + self.eps * direction, images)
