"""torchattacks' APGD and Square as attacks of this package (``pip install 'snnadv[attacks]'``).

torchattacks differentiates the module itself: on an SNN that is BPTT with the
training surrogate through the straight-through encoder, an SNN drawing fresh spikes
on every call (seed its encoder, :func:`snnadv.encoding.encoder_seed`, to make a run
reproducible; :func:`snnadv.attacks.craft` with a seed does that per batch, from the
seed and the batch's first image).  Its random numbers are drawn per batch, not per
image: sharded over processes, the result is the same as one process's only for the
same batches (the same batch size, every shard boundary at a multiple of it).
torchattacks re-seeds the global RNG; here it runs inside
:func:`torch.random.fork_rng`, so the caller's RNG is untouched.  The result goes
through the package's eps-ball projection like every other attack's.

* ``apgd-ce-torchattacks`` / ``apgd-dlr-torchattacks``: APGD (Croce & Hein 2020), L-inf,
  cross-entropy or DLR loss, ``restarts`` restarts, ``eot`` EOT iterations per step: the
  reference twins of the package's own ``apgd-ce`` / ``apgd-dlr``
  (:mod:`snnadv.attacks.apgd`, with the per-sample early exit);
* ``square``: Square (score-based, no gradients), L-inf, margin loss, ``steps`` queries
  (one per iteration).
"""

from __future__ import annotations

import torch

from ..errors import SnnadvError
from ..registry import register_attack
from .base import Attack, check_eps


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise SnnadvError("APGD and Square need torchattacks: pip install 'snnadv[attacks]'") from None
    return torchattacks


class LibraryAttack(Attack):
    """A torchattacks attack behind :class:`Attack`'s interface (untargeted)."""

    #: torchattacks draws its own random numbers for the whole batch (and runs the model on
    #: parts of it), so its randomness cannot be keyed by image: :func:`~snnadv.attacks.craft`
    #: seeds the encoder per batch instead (the same result only for the same batches)
    keyable = False

    def __init__(self, model, eps: float = 8 / 255, targeted: bool = False):
        check_eps(eps)
        if targeted:
            raise SnnadvError(f"{self.name} runs untargeted only here")
        self.model, self.eps, self.targeted, self.gradient = model, float(eps), False, None
        self.library = self.build(_torchattacks())

    def build(self, torchattacks):
        raise NotImplementedError

    def forward(self, images, labels):
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            x = self.library(images, labels)
        return self.project(x.detach(), images)


@register_attack("apgd-ce-torchattacks")
class LibraryAPGD(LibraryAttack):
    """torchattacks' APGD, L-inf, cross-entropy loss: the reference twin of
    :class:`snnadv.attacks.apgd.APGD` (``apgd-ce``)."""

    name = "apgd-ce-torchattacks"
    loss = "ce"

    def __init__(self, model, eps: float = 8 / 255, steps: int = 20, restarts: int = 1, eot: int = 1, seed: int = 0,
                 targeted: bool = False):
        check_eps(eps, None, steps)
        self.steps, self.restarts, self.eot, self.seed = int(steps), int(restarts), int(eot), int(seed)
        super().__init__(model, eps, targeted)

    def build(self, torchattacks):
        return torchattacks.APGD(self.model, norm="Linf", eps=self.eps, steps=self.steps, n_restarts=self.restarts,
                                 seed=self.seed, loss=self.loss, eot_iter=self.eot)


@register_attack("apgd-dlr-torchattacks")
class LibraryAPGDDLR(LibraryAPGD):
    """torchattacks' APGD, L-inf, DLR loss (the twin of ``apgd-dlr``)."""

    name = "apgd-dlr-torchattacks"
    loss = "dlr"


@register_attack("square")
class Square(LibraryAttack):
    """torchattacks' Square, L-inf, margin loss (no gradients)."""

    name = "square"

    def __init__(self, model, eps: float = 8 / 255, steps: int = 1000, seed: int = 0, targeted: bool = False):
        check_eps(eps, None, steps)
        self.steps, self.seed = int(steps), int(seed)
        super().__init__(model, eps, targeted)

    def build(self, torchattacks):
        return torchattacks.Square(self.model, norm="Linf", eps=self.eps, n_queries=self.steps, n_restarts=1,
                                   seed=self.seed, loss="margin")
