"""Fused multi-step LIF/IF recurrence: all T timesteps of a layer in one call.

This is the readable PyTorch implementation of the scan (CPU and any device).  It
computes exactly what T calls of :meth:`snnadv.neurons.LIF.forward` compute, but as
one autograd node whose backward is written out by hand, so that autograd does not
keep ~6 tensors per timestep per layer.  What it saves for backward:

* the spikes, as ``bool`` (1 byte per neuron per step);
* the membrane, only when the surrogate reads it (linear, fast-sigmoid), in fp32;
* the initial state (one frame).

The Eq. 4 surrogate needs only dt, which backward rebuilds from the saved spikes.

Forward (per step; see :mod:`snnadv.neurons` for the conventions):

    u[t] = lam * u[t-1] + I[t] - thr * s[t-1]          (soft reset)
    u[t] = lam * (1 - s[t-1]) * u[t-1] + I[t]          (hard reset)
    s[t] = H(u[t] - thr);  dt[t+1] = 1 if s[t] else dt[t] + 1

Backward (BPTT; the reset term carries no gradient):

    dL/du[t] = dL/ds[t] * sg[t] + dL/du[t+1] * lam * (1 - s[t] if hard else 1)
    dL/dI[t] = dL/du[t]
    dL/du[-1] = dL/du[0] * lam * (1 - s[-1] if hard else 1)     (the initial state)

(u[t+1] depends on u[t] through lam * (1 - s[t]) for a hard reset.)

where sg[t] is the surrogate ds/du at step t.
"""

from __future__ import annotations

import torch


def _step_dt(dt: torch.Tensor, spk: torch.Tensor) -> torch.Tensor:
    return torch.where(spk, torch.ones_like(dt), dt + 1.0)


class _LIFScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, mem0, dt0, leak, thr, hard, surrogate):
        T = current.shape[0]
        spikes = torch.empty(current.shape, dtype=torch.bool, device=current.device)
        keep_mem = surrogate.needs_mem and ctx.needs_input_grad[0]
        mems = torch.empty(current.shape, dtype=torch.float32, device=current.device) if keep_mem else None
        mem = mem0.detach().float()
        dt = dt0.clone()
        spk_prev = mem > thr
        for t in range(T):
            if hard:
                mem = leak * mem * (~spk_prev) + current[t]
            else:
                mem = leak * mem + current[t] - thr * spk_prev
            spk_prev = mem > thr
            spikes[t] = spk_prev
            dt = _step_dt(dt, spk_prev)
            if keep_mem:
                mems[t] = mem
        ctx.save_for_backward(spikes, mems if keep_mem else torch.empty(0), mem0.detach(), dt0)
        ctx.leak, ctx.thr, ctx.hard, ctx.surrogate, ctx.keep_mem = leak, thr, hard, surrogate, keep_mem
        ctx.mark_non_differentiable(dt)
        return spikes.to(current.dtype), mem, dt

    @staticmethod
    def backward(ctx, grad_spk, grad_mem_T, grad_dt):
        spikes, mems, mem0, dt0 = ctx.saved_tensors
        leak, thr, hard, surrogate = ctx.leak, ctx.thr, ctx.hard, ctx.surrogate
        T = spikes.shape[0]
        # surrogate ds/du for every step (dt rebuilt from the spikes)
        if surrogate.needs_mem:
            dts = None
        else:
            dts = torch.empty(spikes.shape, dtype=torch.float32, device=spikes.device)
            dt = dt0.float()
            for t in range(T):
                dts[t] = dt
                dt = _step_dt(dt, spikes[t])
        grad_in = torch.empty(spikes.shape, dtype=grad_spk.dtype, device=grad_spk.device)
        carry = torch.zeros_like(mem0, dtype=torch.float32)  # lam * dL/du[t+1]
        for t in range(T - 1, -1, -1):
            sg = surrogate.grad(mems[t] if surrogate.needs_mem else None, thr, dts[t] if dts is not None else None)
            g = grad_spk[t].float() * sg + (carry * (~spikes[t]) if hard else carry)
            if t == T - 1 and grad_mem_T is not None:
                g = g + grad_mem_T.float()  # the returned state is u[T-1] itself
            grad_in[t] = g
            carry = leak * g
        grad_mem0 = None
        if ctx.needs_input_grad[1]:  # u[0] depends on u[-1] through lam (1 - s[-1])
            grad_mem0 = carry * (~(mem0 > thr)) if hard else carry
        return grad_in, grad_mem0, None, None, None, None, None


def lif_scan(current: torch.Tensor, mem0: torch.Tensor, dt0: torch.Tensor, leak: float, thr: float,
             hard: bool, surrogate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the LIF recurrence over the first axis of ``current``.

    Args:
        current: input currents [T, ...] (the synaptic layer's output for T frames).
        mem0, dt0: the state before the first step (one frame each).
        leak, thr, hard: lambda, threshold, and whether the reset is to zero.
        surrogate: a :class:`snnadv.neurons.Surrogate` (used in backward only).

    Returns:
        ``(spikes [T, ...] in current's dtype, mem after step T, dt after step T)``.
    """
    return _LIFScan.apply(current, mem0, dt0, leak, thr, hard, surrogate)
