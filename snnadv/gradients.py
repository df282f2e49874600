"""Where an attack's input gradient comes from (paper Sec. 3.3, Eq. 5-6, Algorithm 1).

An attack (:mod:`snnadv.attacks`) asks a *gradient source* for dJ/dx at the current
images and uses only that; swapping the source changes how the gradient is
obtained, never the attack.  A source is a callable

    source(images [B, C, H, W] in [0, 1], labels [B]) -> (gradient [B, C, H, W], logits)

with the loss J = cross-entropy(model(images), labels).  Sources:

* :class:`Autograd`: ordinary backpropagation.  For an ANN this is the exact
  gradient.  For an SNN it is full BPTT through the surrogate gradients *and*
  through the encoder, whose Bernoulli sampling gets a straight-through (identity)
  gradient: BPDA (Athalye et al. 2018).  Reports call it ``bptt``.
* :class:`Algorithm1`: the paper's SNN-crafted gradient.  Run the SNN on fresh
  encoder spikes, accumulate dJ/d(first-layer output) over all timesteps through
  the surrogate gradients, and map it back to the input with the transposed
  first-layer convolution (Eq. 6: convolution with the 180-degree rotated kernel).
  Reports call it ``alg1``.

Note.  Because the first layer is linear and the encoder's straight-through
gradient is the identity per frame, sum_t conv^T(g_t) = conv^T(sum_t g_t): Algorithm 1
and straight-through BPTT give the same direction (they differ only through a
positive factor, e.g. 2 for the signed [-1, 1] encoder).  ``tests/test_attacks.py``
checks Algorithm 1 against an independent ``torch.nn.grad.conv2d_input``.

Every call draws fresh encoder spikes, so SNN gradients are stochastic: pass a
``generator`` to make them reproducible; :class:`EOT` averages M draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SnnadvError
from .models import SNN

GRADIENTS = ("alg1", "bptt")


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="sum")


class Autograd:
    """dJ/dx by backpropagation (for SNNs: BPTT + straight-through encoder)."""

    name = "bptt"

    def __init__(self, model: nn.Module, loss=_loss):
        self.model, self.loss = model, loss

    def __call__(self, images, labels):
        x = images.detach().clone().requires_grad_(True)
        logits = self.model(x)
        (grad,) = torch.autograd.grad(self.loss(logits, labels), x)
        return grad, logits.detach()


class Algorithm1:
    """Paper Algorithm 1: accumulate dJ/d(first-layer output) over T, then Eq. 6."""

    name = "alg1"

    def __init__(self, model: SNN, loss=_loss):
        if not isinstance(model, SNN):
            raise SnnadvError("Algorithm 1 needs an SNN source")
        first = model.first_conv
        if not isinstance(first, nn.Conv2d):
            raise SnnadvError("Algorithm 1 needs an SNN whose first layer is a convolution")
        self.model, self.loss = model, loss

    def first_layer_grad(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over t of dJ/dX_conv1(t) [B, C1, H1, W1], logits)."""
        m = self.model
        m.capture_first_layer = True
        try:
            with torch.enable_grad():
                logits = m(images.detach())
                self.loss(logits, labels).backward(inputs=[o for o in m.first_layer_outputs])
                acc = sum(o.grad.sum(0) for o in m.first_layer_outputs)
        finally:
            m.capture_first_layer = False
            m.first_layer_outputs = []
        return acc, logits.detach()

    def __call__(self, images, labels):
        acc, logits = self.first_layer_grad(images, labels)
        conv = self.model.first_conv
        # Eq. 6: dJ/dX_rate = conv(dJ/dX_conv1, W rotated 180 degrees) = conv^T(dJ/dX_conv1)
        grad = torch.nn.functional.conv_transpose2d(
            acc, conv.weight.detach(), stride=conv.stride, padding=conv.padding,
            output_padding=_output_padding(images.shape[-1], acc.shape[-1], conv))
        return grad, logits


def _output_padding(size_in: int, size_out: int, conv: nn.Conv2d) -> int:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return size_in - ((size_out - 1) * s - 2 * p + k)


class EOT:
    """Expectation over transformation: the mean gradient of ``m`` independent draws."""

    def __init__(self, source, m: int):
        if m < 1:
            raise SnnadvError(f"--eot must be at least 1, got {m}")
        self.source, self.m = source, m
        self.name = f"{source.name}+eot{m}" if m > 1 else source.name

    def __call__(self, images, labels):
        grad, logits = self.source(images, labels)
        for _ in range(self.m - 1):
            g, l = self.source(images, labels)
            grad, logits = grad + g, logits + l
        return grad / self.m, logits / self.m


def make_gradient(model: nn.Module, kind: str | None = None, eot: int = 1):
    """The gradient source for ``model``: ``alg1`` or ``bptt`` for SNNs (default alg1),
    autograd for ANNs (``kind`` must then be None)."""
    if isinstance(model, SNN):
        kind = kind or "alg1"
        if kind not in GRADIENTS:
            raise SnnadvError(f"unknown gradient '{kind}' (choose {', '.join(GRADIENTS)})")
        source = Algorithm1(model) if kind == "alg1" else Autograd(model)
    else:
        if kind is not None:
            raise SnnadvError("--gradient applies to SNN sources only; an ANN source uses autograd")
        source = Autograd(model)
        source.name = "autograd"
    return EOT(source, eot) if eot > 1 else source
