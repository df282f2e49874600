"""HART (Hao et al., ICLR 2024) as the gradient path ``hart``: rate and temporal gradients mixed."""

from __future__ import annotations

import torch

from ..errors import SnnadvError
from ..gradients import Autograd, _loss
from ..models import SNN
from ..registry import register_gradient
from ..surrogates import Triangle
from .unrolled import _ObservedSpike, layer_backward, lif_membranes


class _TimeMix(torch.autograd.Function):
    """Identity forward; backward ``(1 - mix) * mean_t(g) + mix * g`` over the first (time) axis."""

    @staticmethod
    def forward(ctx, x, mix):
        ctx.mix = mix
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        mix = ctx.mix
        mean = g.mean(0, keepdim=True).expand_as(g)
        return (mean if mix == 0.0 else (1.0 - mix) * mean + mix * g), None


def hart_spikes(current, spikes, mem0, leak: float, thr: float, reset: str, gamma: float = 1.0,
                mix: float = 0.0) -> torch.Tensor:
    """One LIF layer with HART's backward (see :class:`HARTGradient`); forward = ``spikes``."""
    x = _TimeMix.apply(current, float(mix))
    tri = Triangle(gamma)
    mems = lif_membranes(x, spikes, mem0, leak, thr, reset, through_time=False)
    return torch.stack([_ObservedSpike.apply(u, spikes[t], tri.grad(u.detach(), thr, None))
                        for t, u in enumerate(mems)])


class HARTGradient:
    """HART (Hao et al., "Threaten spiking neural networks through combining rate and
    temporal information", ICLR 2024): BPTT in which every LIF layer

    1. cuts the membrane's path through time (u[t-1] -> u[t] carries no gradient), so a
       spike's gradient reaches only the current of its own step;
    2. uses HART's triangle surrogate h(u) = max(0, w - |u - thr|) / w^2, w = gamma * thr
       (:class:`~snnadv.surrogates.Triangle`); and
    3. averages the input current's gradient over time (the rate part):

           g[t]      = dJ/ds[t] * h(u[t])                      (temporal, per step)
           dJ/dI[t]  = (1 - mix) * (1/T) sum_t' g[t'] + mix * g[t]

    ``mix = 0`` is HART as published (the code's "avg" mode: every step of a layer gets the
    time-averaged gradient); ``mix = 1`` keeps each step's own gradient (per-step surrogate
    gradients without the membrane path); ``gamma`` is HART's own rate/temporal knob (a
    wide triangle passes similar gradients at every step, a narrow one only near threshold;
    HART searches it per model).  The encoder is straight-through, as for ``bptt``.  The
    forward is the real SNN (fused scan; the whole time loop as one chunk).
    """

    name = "hart"
    one_chunk = True

    def __init__(self, model: SNN, gamma: float = 1.0, mix: float = 0.0, loss=_loss):
        if not isinstance(model, SNN):
            raise SnnadvError("the HART gradient needs an SNN source")
        if not 0.0 <= float(mix) <= 1.0:
            raise SnnadvError(f"HART's mix must be in [0, 1], got {mix}")
        if not float(gamma) > 0:
            raise SnnadvError(f"HART's gamma must be positive, got {gamma}")
        self.model, self.gamma, self.mix, self.loss = model, float(gamma), float(mix), loss
        self.inner = Autograd(model, loss)

    def rule(self, current, spikes, mem0, leak, thr, reset):
        return hart_spikes(current, spikes, mem0, leak, thr, reset, self.gamma, self.mix)

    def __call__(self, images, labels):
        self.inner.loss = self.loss
        with layer_backward(self.model, self.rule), torch.enable_grad():
            return self.inner(images, labels)


@register_gradient("hart")
def _hart(model, *, gamma: float | None = None, mix: float | None = None, loss=_loss, **_):
    return HARTGradient(model, 1.0 if gamma is None else gamma, 0.0 if mix is None else mix, loss)


# Not in the adaptive suite's "all" (snnadv.attacks.settings.all_paths): each has a parameter
# that its paper tunes per model (HART's gamma, searched per model; PDSG is defined for the
# whole batch at once), and "all" is the fixed list behind the existing tables.  Name them
# in --paths to run them.
_hart.opt_in = True
