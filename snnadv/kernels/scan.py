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


class _LIFScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, mem0, dt0, leak, thr, hard, surrogate):
        T = current.shape[0]
        out = torch.empty(current.shape, dtype=current.dtype, device=current.device)
        keep_mem = surrogate.needs_mem and ctx.needs_input_grad[0]
        mems = torch.empty(current.shape, dtype=torch.float32, device=current.device) if keep_mem else None
        mem = mem0.detach().float().clone()
        prev = (mem > thr).to(current.dtype)  # the spike of step -1 (resets at step 0)
        for t in range(T):  # in place: no allocation per step
            if hard:
                mem.mul_(1.0 - prev)
            if leak != 1.0:
                mem.mul_(leak)
            mem.add_(current[t])
            if not hard:
                mem.sub_(prev, alpha=thr)
            prev = torch.gt(mem, thr, out=out[t])
            if keep_mem:
                mems[t].copy_(mem)
        spikes = out.bool()
        dt = _final_dt(spikes, dt0)
        ctx.save_for_backward(spikes, mems if keep_mem else torch.empty(0), mem0.detach(), dt0)
        ctx.leak, ctx.thr, ctx.hard, ctx.surrogate = leak, thr, hard, surrogate
        ctx.mark_non_differentiable(dt)
        return out, mem, dt

    @staticmethod
    def backward(ctx, grad_spk, grad_mem_T, grad_dt):
        spikes, mems, mem0, dt0 = ctx.saved_tensors
        leak, thr, hard, surrogate = ctx.leak, ctx.thr, ctx.hard, ctx.surrogate
        T = spikes.shape[0]
        # a[t] = dL/ds[t] * sg[t], the direct term of every step
        if surrogate.needs_mem:
            a = grad_spk.float() * surrogate.grad(mems, thr, None)
        else:
            a = torch.empty(spikes.shape, dtype=torch.float32, device=spikes.device)
            dt = dt0.float().clone()
            for t in range(T):  # dt rebuilt from the spikes
                torch.mul(grad_spk[t], surrogate.grad(None, thr, dt), out=a[t])
                dt.add_(1.0).masked_fill_(spikes[t], 1.0)
        if grad_mem_T is not None:
            a[T - 1].add_(grad_mem_T)  # the returned state is u[T-1] itself
        # g[t] = a[t] + lam * (1 - s[t] if hard else 1) * g[t+1], computed into a in place
        keep = (~spikes).float() if hard else None
        for t in range(T - 2, -1, -1):
            if hard:
                a[t].addcmul_(a[t + 1], keep[t], value=leak)
            else:
                a[t].add_(a[t + 1], alpha=leak)
        grad_mem0 = None
        if ctx.needs_input_grad[1]:  # u[0] depends on u[-1] through lam (1 - s[-1])
            grad_mem0 = leak * a[0] * (~(mem0 > thr)) if hard else leak * a[0]
        return a.to(grad_spk.dtype), grad_mem0, None, None, None, None, None


def _final_dt(spikes: torch.Tensor, dt0: torch.Tensor) -> torch.Tensor:
    """dt after the last step: T - (index of the last spike), or dt0 + T if none."""
    T = spikes.shape[0]
    steps = torch.arange(1, T + 1, device=spikes.device, dtype=torch.int32).view(T, *[1] * (spikes.dim() - 1))
    last = (spikes * steps).amax(0)  # 1-based index of the last spike, 0 if none
    return torch.where(last > 0, (T + 1 - last).to(dt0.dtype), dt0 + T)


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
