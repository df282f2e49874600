"""Attacks (paper Sec. 2.1, Eq. 1-2): one file per attack, each registered by name.

:class:`Attack` (the base, torchattacks' calling convention), :func:`project` (the
eps-ball projection every attack ends with), :func:`make_attack` (any registered
attack by name, :data:`snnadv.registry.ATTACKS`); the built-ins: ``fgsm``
(:class:`FGSM`), ``pgd`` (:class:`PGD`, also the adaptive evaluation's PGD with
restarts and the best iterate), ``apgd-ce`` and ``apgd-dlr`` (:class:`APGD`, with a
per-sample early exit; their reference twins ``apgd-*-torchattacks``) and ``square``
(torchattacks, :mod:`snnadv.attacks.adapters`).  The adaptive evaluation suite is
:mod:`snnadv.attacks.suite`; the named protocols (``paper``, ``strong``, ``quick``) are
:mod:`snnadv.attacks.protocols`, run as a resumable cascade by
:mod:`snnadv.attacks.cascade` and :mod:`snnadv.attacks.run_protocol`.  A new attack is one file::

    @snnadv.register_attack("noise")
    class Noise(snnadv.attacks.Attack):
        def forward(self, images, labels):
            return self.project(images + self.eps * torch.randn_like(images).sign(), images)
"""

# (in this order: the registry lists the attacks in the order they register)
from .base import Attack, check_eps, craft, make_attack, parse_eps, project, takes
from .fgsm import FGSM
from .pgd import PGD, margins
from .apgd import APGD, APGDDLR
from .adapters import LibraryAPGD, LibraryAPGDDLR, LibraryAttack, Square  # noqa: I001

__all__ = ["Attack", "FGSM", "PGD", "APGD", "APGDDLR", "Square", "LibraryAttack", "LibraryAPGD", "LibraryAPGDDLR", "make_attack", "check_eps",
           "parse_eps", "project", "craft", "takes", "margins"]
