"""The attack base, the eps-ball projection and the attack factory (paper Sec. 2.1).

torchattacks' calling convention::

    attack = PGD(model, eps=8/255, alpha=2/255, steps=7, random_start=False)
    x_adv = attack(images, labels)

An attack is a subclass of :class:`Attack` that overrides ``forward(images, labels)``
(``forward(images, labels, target_labels)`` if it can be targeted) and registers its
name with ``@register_attack("name")``; :func:`make_attack` builds any registered
attack by name.  Images are in [0, 1]; any normalisation lives inside the model.
Attacks are untargeted unless ``targeted=True``, in which case ``attack(images,
labels, target_labels)`` moves towards the given targets (they are really used, unlike
the original code).  Every attack ends its steps with :func:`project`, so every
adversarial image lies in [0, 1] and within the L-inf eps-ball of its clean image.
The gradient comes from a swappable source (:mod:`snnadv.gradients`): autograd for an
ANN, Algorithm 1 or BPTT for an SNN.  The model is put in eval mode while attacking
and returned to the mode it was in.

Large T.  On a GPU, an SNN's gradient is taken in pieces of the batch when the whole
batch would not fit the free memory by the estimate of :mod:`snnadv.memory` (BPTT at
T=2500 keeps ~0.4 MB per image and step); the loss is a sum over images, so the
pieces' gradients are the batch's gradient (with the encoder's draws in a different
order; with keyed spikes, each piece draws exactly what it would in the whole
batch).  On a CPU the batch is never split.

Keyed and sharded (:func:`craft` with a ``seed``): each process crafts its contiguous
shard of the images (:mod:`snnadv.parallel`) and the adversarial images are gathered
back in order on every process.  The package's own attacks (:attr:`Attack.keyable`:
FGSM, PGD) run each batch inside :meth:`Attack.keyed`: every forward pass of the SNN
in the attack (each step, each EOT draw) draws spikes keyed by the seed, the image's
global index and the pass's number (:func:`snnadv.encoding.encoder_keys`), and PGD's
random starts are keyed by image too, so the crafted images are the same for any
number of processes and any batch size.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from .. import parallel
from ..encoding import STREAM_START, current_keys, encoder_keys, encoder_seed, image_keys, keyed_uniform, mix32
from ..errors import SnnadvError
from ..gradients import make_gradient
from ..registry import ATTACKS


@contextmanager
def attack_index(attack, index: torch.Tensor):
    """Inside the block ``attack.index`` is ``index`` (the batch's global image indices)."""
    attack.index = index
    try:
        yield attack
    finally:
        attack.index = None


def project(x: torch.Tensor, images: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``x`` to the L-inf ball of radius ``eps`` around ``images``, then to [0, 1]."""
    return torch.min(torch.max(x, images - eps), images + eps).clamp(0.0, 1.0)


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
    #: whether the attack's randomness is keyed by image inside :meth:`keyed` (its only
    #: random numbers: the model's encoder spikes, and starts drawn from :meth:`uniform`);
    #: a subclass that draws other random numbers should say False (or draw them from
    #: :meth:`uniform`)
    keyable = True
    #: (seed, global image indices) of the batch being attacked inside :meth:`keyed`
    key: tuple | None = None
    #: the global indices of the batch being attacked (set by :func:`craft` and
    #: :func:`~snnadv.attacks.cascade.craft_at` for every attack, keyable or not)
    index: torch.Tensor | None = None

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
            images = images.detach()
            if target_labels is None:  # an untargeted attack may define forward(images, labels) only
                return self.forward(images, labels).detach()
            return self.forward(images, labels, target_labels).detach()
        finally:
            self.model.train(was_training)

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                target_labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @contextmanager
    def keyed(self, seed: int, index: torch.Tensor):
        """Attack the batch of images with global indices ``index`` with keyed randomness:
        the model's spikes come from :func:`snnadv.encoding.encoder_keys` (``seed``,
        ``index``; every forward pass in the block is a new call), and :meth:`uniform`
        draws from the same hash."""
        self.key = (int(seed), index)
        try:
            with encoder_keys(self.model, seed, index):
                yield self
        finally:
            self.key = None

    @contextmanager
    def rows(self, rows: torch.Tensor):
        """Inside the block the attack works on the images ``rows`` (positions in its batch)
        only, e.g. the ones still standing after an early exit: inside :meth:`keyed`, their
        global indices key :meth:`uniform` and the encoder, whose call count goes on
        (:meth:`snnadv.encoding.EncoderKeys.selected`), so each image left draws exactly
        what it would in the whole batch.  Afterwards the whole batch again."""
        key, keys = self.key, current_keys(self.model)
        if key is not None:
            self.key = (key[0], key[1][rows.to(key[1].device)])
        try:
            if keys is None:
                yield self
            else:
                with keys.selected(rows):
                    yield self
        finally:
            self.key = key

    def uniform(self, shape, draw: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform numbers in [0, 1) of ``shape`` (a batch): keyed by (seed, image index,
        ``draw``) inside :meth:`keyed` (:func:`snnadv.encoding.keyed_uniform`, a stream
        apart from the spikes'), else drawn from ``generator``."""
        if self.key is None:
            return torch.rand(shape, generator=generator, device=device)
        seed, index = self.key
        keys = image_keys(seed, index.to(device), draw, STREAM_START)
        return keyed_uniform(keys, tuple(shape[1:]))[0]

    def project(self, x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """:func:`project` with this attack's eps."""
        return project(x, images, self.eps)

    def step_direction(self, x: torch.Tensor, labels, target_labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sign of the loss gradient, uphill (untargeted) or towards the targets; the
        logits that came with it)."""
        if self.targeted:
            grad, logits = self.input_gradient(x, target_labels)
            return -grad.sign(), logits
        grad, logits = self.input_gradient(x, labels)
        return grad.sign(), logits

    def input_gradient(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient source's (dJ/dx, logits), in pieces of the batch where it would not fit."""
        piece = self.piece_size(x)
        if piece >= len(x):
            return self.gradient(x, labels)
        keys = current_keys(self.model)
        parts = []
        for i in range(0, len(x), piece):
            if keys is None:
                parts.append(self.gradient(x[i:i + piece], labels[i:i + piece]))
                continue
            with keys.narrowed(i, i + piece):  # each piece draws the spikes the whole batch would
                parts.append(self.gradient(x[i:i + piece], labels[i:i + piece]))
        if keys is not None:
            keys.calls = keys.piece_calls
        return torch.cat([g for g, _ in parts]), torch.cat([z for _, z in parts])

    def piece_size(self, x: torch.Tensor) -> int:
        """Images per gradient call: the whole batch, unless an SNN's gradient at its T
        (with its batched EOT copies) would not fit the free memory
        (:func:`snnadv.memory.free_bytes`; keyed draws make the pieces' result the
        whole batch's)."""
        from .. import memory
        from ..eot import BatchedEOT
        from ..models import SNN

        budget = memory.free_bytes(x.device)
        if budget is None or not isinstance(self.model, SNN):
            return len(x)
        kind = memory.gradient_kind(self.gradient)
        copies = self.gradient.m if isinstance(self.gradient, BatchedEOT) else 1
        rows = memory.max_batch(self.model, len(x) * copies, self.model.num_steps, kind, budget, x.device.type)
        return max(1, rows // copies)


def craft(attack, images: torch.Tensor, labels: torch.Tensor, batch_size: int, advance=None,
          target_labels: torch.Tensor | None = None, seed: int | None = None, start: int = 0) -> torch.Tensor:
    """Adversarial versions of ``images`` (float [0, 1]), batch by batch.

    ``seed=None``: every image here, in batches, with whatever randomness the caller set
    up.  With a ``seed``: keyed and sharded (the module docstring): this process crafts
    its shard of the images, gathered in order on every process.  A :attr:`~Attack.keyable`
    attack runs each batch inside :meth:`Attack.keyed` (``seed``, the batch's global
    indices): the same result for any number of processes and any batch size.  Any other
    (torchattacks' APGD and Square, which draw their own random numbers for the whole
    batch) runs each batch with the model's encoder seeded from ``seed`` and the batch's
    first global index: the same result only for the same batches, i.e. the same batch
    size with every shard boundary at a multiple of it.

    ``start``: the global index of ``images[0]`` (keyed only), so a set crafted in pieces,
    ``images[a:b]`` with ``start=a``, equals the set crafted whole (a non-keyable attack:
    when every piece starts at a multiple of ``batch_size``, in one process).

    ``advance(n)`` after every batch (keyed: n times the number of processes, about the
    whole set's progress counted on one process's share).
    """
    if seed is None:
        out = []
        for i in range(0, len(images), batch_size):
            t = None if target_labels is None else target_labels[i:i + batch_size]
            out.append(attack(images[i:i + batch_size], labels[i:i + batch_size], t))
            if advance:
                advance(len(out[-1]))
        return torch.cat(out) if out else images.clone()
    w = parallel.world()
    part = parallel.shard(len(images), w)
    out = []
    for i in range(part.start, part.stop, batch_size):
        j = min(i + batch_size, part.stop)
        t = None if target_labels is None else target_labels[i:j]
        if getattr(attack, "keyable", False):
            block = attack.keyed(seed, torch.arange(start + i, start + j, device=images.device))
        else:
            block = encoder_seed(attack.model, batch_seed(seed, start + i), images.device)
        with block, attack_index(attack, torch.arange(start + i, start + j, device=images.device)):
            out.append(attack(images[i:j], labels[i:j], t))
        if advance:
            advance((j - i) * w.size)
    mine = torch.cat(out) if out else images[:0].clone()
    return parallel.gather_cat(mine, w)


def batch_seed(seed: int, start: int) -> int:
    """The encoder seed of an unkeyable attack's batch that starts at global index ``start``."""
    return ((int(seed) & 0x7FFFFFFF) << 32) | mix32((int(seed) * 0x9E3779B1 + int(start)) & 0xFFFFFFFF)


def _accepted(cls, settings: dict) -> dict:
    """The ``settings`` that ``cls``'s constructor takes (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(settings)
    return {k: v for k, v in settings.items() if k in params}


def takes(name: str, setting: str) -> bool:
    """Whether the attack registered as ``name`` takes ``setting`` (e.g. ``alpha``)."""
    return setting in _accepted(ATTACKS[name], {setting: None})


def make_attack(name: str, model, eps: float, alpha: float = 2 / 255, steps: int = 7,
                random_start: bool = False, gradient=None, targeted: bool = False, generator=None,
                **options) -> Attack:
    """The attack registered as ``name`` (:data:`snnadv.registry.ATTACKS`), given the
    settings its class takes (FGSM takes none of alpha, steps, random_start, generator);
    an unknown name is the registry's one-line error."""
    cls = ATTACKS[name]
    settings = dict(eps=eps, alpha=alpha, steps=steps, random_start=random_start, gradient=gradient,
                    targeted=targeted, generator=generator, **options)
    return cls(model, **_accepted(cls, settings))


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
