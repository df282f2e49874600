"""The machinery of the unrolled gradient paths (``hart``, ``pdsg``).

HART and PDSG change more than ds/du: HART cuts the membrane's path through time and
averages a layer's input-current gradient over time, PDSG sets the surrogate's width from
the layer's membrane statistics up to each step.  Both run the real SNN forward (the
fused scan, so the spikes and the logits are exactly the SNN's for that draw) and replace
each LIF layer's backward by an unrolled recurrence built from the observed spikes.
Memory: autograd keeps a few fp32 tensors per layer and timestep for that recurrence
(the scan keeps one byte per neuron and step): fine at attack batch sizes and moderate
T, heavy for VGG11 at T in the thousands (attack in smaller batches there).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import SnnadvError
from ..models import SNN


@contextmanager
def one_chunk(model: SNN):
    """Run ``model``'s whole time loop as one chunk in the fused mode inside the block (the
    estimators below need every timestep of a layer at once); settings restored after."""
    mode, chunk = model.mode, model.chunk_steps
    model.mode, model.chunk_steps = "fused", 2 ** 31
    try:
        yield model
    finally:
        model.mode, model.chunk_steps = mode, chunk


def lif_membranes(current: torch.Tensor, spikes: torch.Tensor, mem0: torch.Tensor, leak: float, thr: float,
                  reset: str, through_time: bool = True) -> list[torch.Tensor]:
    """The membrane before each step's reset, u[t] [B, ...] (fp32), for input currents
    ``current`` [T, B, ...] and the layer's observed ``spikes`` (Eq. 3, the scan's order):

        u[t] = lam * u[t-1] + I[t] - thr * s[t-1]         (subtract)
        u[t] = lam * (1 - s[t-1]) * u[t-1] + I[t]         (zero)
        u[t] = lam * u[t-1] + I[t]                        (none)

    with u[-1] = ``mem0`` and s[-1] = H(mem0 - thr).  Differentiable w.r.t. ``current``;
    the reset carries no gradient (as in the scan's BPTT); ``through_time=False`` cuts the
    path u[t-1] -> u[t] too (HART), so that du[t]/dI[t'] = 1[t = t']."""
    u_prev, s_prev = mem0.float(), (mem0 > thr).float()
    out = []
    for t in range(current.shape[0]):
        h = u_prev if through_time else u_prev.detach()
        if reset == "zero":
            h = h * (1.0 - s_prev)
        u = leak * h + current[t].float()
        if reset == "subtract":
            u = u - thr * s_prev
        out.append(u)
        u_prev, s_prev = u, spikes[t].float()
    return out


class _ObservedSpike(torch.autograd.Function):
    """Forward: the observed spikes; backward: ``grad * sg`` (a given surrogate value)."""

    @staticmethod
    def forward(ctx, mem, spikes, sg):
        ctx.save_for_backward(sg)
        return spikes.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (sg,) = ctx.saved_tensors
        return grad_out.float() * sg, None, None


@contextmanager
def layer_backward(model: SNN, rule):
    """Inside the block, every LIF layer of ``model`` runs its real scan forward (no graph)
    and returns ``rule(current, spikes, mem0, leak, thr, reset)`` when its input needs a
    gradient: the observed spikes with the rule's backward."""
    neurons = model.neurons
    for n in neurons:
        if n.leak is None or getattr(n, "reset_mechanism", None) not in ("subtract", "zero", "none"):
            raise SnnadvError(f"this gradient path needs LIF neurons (leak, reset), not {type(n).__name__}")

    def patched(neuron):
        def multistep(current):
            frame = current.shape[1:]
            mem = getattr(neuron, "mem", None)
            mem0 = mem.detach().float() if torch.is_tensor(mem) and mem.shape == frame else \
                torch.zeros(frame, device=current.device)
            with torch.no_grad():
                spikes = type(neuron).multistep(neuron, current.detach())
            if not current.requires_grad:
                return spikes
            return rule(current, spikes, mem0, neuron.leak, neuron.thr, neuron.reset_mechanism)
        return multistep

    for n in neurons:
        n.multistep = patched(n)
    try:
        with one_chunk(model):
            yield model
    finally:
        for n in neurons:
            del n.multistep
