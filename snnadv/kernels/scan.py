"""Fused multi-step LIF/IF recurrence: all T timesteps of a layer in one call.

:func:`lif_scan` computes exactly what T calls of :meth:`snnadv.neurons.LIF.forward`
compute, but as one autograd node whose backward is written out by hand, so that
autograd does not keep ~6 tensors per timestep per layer.  Two implementations of
the same math:

* :class:`_LIFScan` here, plain PyTorch (any device; the CPU path);
* :mod:`snnadv.kernels.triton_scan`, one Triton kernel per direction (CUDA): each
  program holds a block of neurons in registers and walks over T.

What is saved for backward:

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

(u[t+1] depends on u[t] through lam * (1 - s[t]) for a hard reset.)  sg[t] is the
surrogate ds/du at step t; for Eq. 4, sg[t] = alpha * exp(-beta * dt[t]) is carried
as a running factor (times exp(-beta) per silent step, alpha * exp(-beta) after a
spike, where dt = 1) instead of recomputing the exponential.

Which implementation runs: :func:`lif_scan`'s ``backend``, else the environment
variable ``SNNADV_SCAN`` (``auto`` | ``torch`` | ``triton``), else ``auto``: Triton for
CUDA tensors when it imports, PyTorch otherwise.

Layout.  The scan is elementwise over neurons, so it runs on a ``[T, N]`` view of
the currents whatever their memory format (channels-last convolution outputs
included, see :func:`rows`); outputs come back in the input's layout.
"""

from __future__ import annotations

import os

import torch

from ..errors import SnnadvError

BACKENDS = ("auto", "torch", "triton")


class _LIFScan(torch.autograd.Function):
    """The scan over ``[T, N]`` currents; mem0 and dt0 are ``[N]``."""

    @staticmethod
    def forward(ctx, current, mem0, dt0, leak, thr, hard, surrogate):
        T = current.shape[0]
        out = torch.empty_like(current)  # spikes in the current's dtype (the next layer's input)
        keep_mem = surrogate.needs_mem and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        mems = torch.empty(current.shape, dtype=torch.float32, device=current.device) if keep_mem else None
        mem = mem0.detach().float().clone()
        prev = (mem > thr).to(current.dtype)  # the spike of step -1 (resets at step 0)
        for t in range(T):  # in place, no allocation per step; snnTorch's order of operations
            dst = mems[t] if keep_mem else mem
            if hard:  # u * (1 - s): exact; float masks, as bool masks are slow on the CPU
                mem = torch.addcmul(mem, mem, prev, value=-1.0) if keep_mem else mem.addcmul_(mem, prev, value=-1.0)
            if leak != 1.0:
                torch.mul(mem, leak, out=dst)
                dst.add_(current[t])
            else:
                torch.add(mem, current[t], out=dst)
            if not hard:
                dst.sub_(prev, alpha=thr)
            mem = dst
            prev = torch.gt(mem, thr, out=out[t])
        spikes = out.bool()
        dt = final_dt(spikes, dt0)
        ctx.save_for_backward(spikes, mems if keep_mem else torch.empty(0), mem0.detach(), dt0)
        ctx.leak, ctx.thr, ctx.hard, ctx.surrogate = leak, thr, hard, surrogate
        ctx.mark_non_differentiable(dt)
        return out, mem.clone() if keep_mem else mem, dt

    @staticmethod
    def backward(ctx, grad_spk, grad_mem_T, grad_dt):
        spikes, mems, mem0, dt0 = ctx.saved_tensors
        leak, thr, hard, surrogate = ctx.leak, ctx.thr, ctx.hard, ctx.surrogate
        T = spikes.shape[0]
        # elementwise work uses float masks: 1 - s[t] (bool masks are ~10x slower on the CPU)
        keep = (~spikes).float() if hard else None
        # a[t] = dL/ds[t] * sg[t], the direct term of every step
        if surrogate.needs_mem:
            a = grad_spk.float() * surrogate.grad(mems, thr, None)
        else:
            # Eq. 4 with dt rebuilt from the spikes as a running factor:
            # sg[t+1] = sg[t] * decay * (1 - s[t]) + fresh * s[t]
            decay = surrogate.step_decay()
            fresh = surrogate.after_spike()  # sg after a spike (a Python float: no device read)
            step = spikes.float()                  # one conversion of the saved spikes, then float ops:
            a = torch.mul(step, fresh)             # fresh * s
            step.mul_(-decay).add_(decay)          # decay * (1 - s), exact for s in {0, 1}
            sg = surrogate.grad(None, thr, dt0.float())  # sg at step 0
            nxt = torch.empty_like(sg)
            for t in range(T):
                if t + 1 < T:
                    torch.addcmul(a[t], sg, step[t], out=nxt)  # sg[t+1], before a[t] is overwritten
                torch.mul(grad_spk[t], sg, out=a[t])
                sg, nxt = nxt, sg
            del step
        if grad_mem_T is not None:
            a[T - 1].add_(grad_mem_T)  # the returned state is u[T-1] itself
        # g[t] = a[t] + lam * (1 - s[t] if hard else 1) * g[t+1], computed into a in place
        for t in range(T - 2, -1, -1):
            if hard:
                a[t].addcmul_(a[t + 1], keep[t], value=leak)
            else:
                a[t].add_(a[t + 1], alpha=leak)
        grad_mem0 = None
        if ctx.needs_input_grad[1]:  # u[0] depends on u[-1] through lam (1 - s[-1])
            grad_mem0 = leak * a[0] * (~(mem0 > thr)) if hard else leak * a[0]
        return a.to(grad_spk.dtype), grad_mem0, None, None, None, None, None


def final_dt(spikes: torch.Tensor, dt0: torch.Tensor) -> torch.Tensor:
    """dt after the last step: T - (index of the last spike), or dt0 + T if none."""
    T = spikes.shape[0]
    itype = torch.int16 if T < 2 ** 15 else torch.int32
    steps = torch.arange(1, T + 1, device=spikes.device, dtype=itype).view(T, *[1] * (spikes.dim() - 1))
    last = (spikes * steps).amax(0)  # 1-based index of the last spike, 0 if none
    return torch.where(last > 0, (T + 1 - last).to(dt0.dtype), dt0 + T)


def rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` [T, ...] as a ``[T, N]`` view without copying when its memory is dense in
    any dimension order (e.g. channels-last); returns the view and the permutation
    of the frame dimensions that made it (undo with :func:`unrows`)."""
    frame = list(range(1, x.dim()))
    perm = tuple(sorted(frame, key=lambda d: -x.stride(d)))  # outermost first (stable)
    xp = x.permute(0, *perm)
    return (xp.reshape(x.shape[0], -1) if xp.is_contiguous() else xp.contiguous().view(x.shape[0], -1)), perm


def unrows(y: torch.Tensor, shape: torch.Size, perm: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`rows`: ``[T', N]`` -> ``[T', *shape[1:]]`` in the original layout."""
    permuted = [shape[d] for d in perm]
    inverse = [0] * (len(perm) + 1)
    for i, d in enumerate(perm):
        inverse[d] = i + 1
    return y.view(y.shape[0], *permuted).permute(*inverse)


def _frame_rows(x: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """A one-frame state tensor [...] as ``[N]`` in the permuted order."""
    return x.permute(*[d - 1 for d in perm]).reshape(-1)


def lif_scan(current: torch.Tensor, mem0: torch.Tensor, dt0: torch.Tensor, leak: float, thr: float,
             hard: bool, surrogate, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the LIF recurrence over the first axis of ``current``.

    Args:
        current: input currents [T, ...] (the synaptic layer's output for T frames).
        mem0, dt0: the state before the first step (one frame each).
        leak, thr, hard: lambda, threshold, and whether the reset is to zero.
        surrogate: a :class:`snnadv.neurons.Surrogate` (used in backward only).
        backend: ``"auto"`` (Triton on CUDA when available, else PyTorch),
            ``"torch"`` or ``"triton"``; None: the environment variable
            ``SNNADV_SCAN`` if set, else ``"auto"``.

    Returns:
        ``(spikes [T, ...] in current's dtype and layout, mem after step T, dt after
        step T)``.
    """
    backend = backend or os.environ.get("SNNADV_SCAN", "auto")
    if backend not in BACKENDS:
        raise SnnadvError(f"unknown scan backend '{backend}' (choose {', '.join(BACKENDS)}; SNNADV_SCAN)")
    cur2, perm = rows(current)
    mem2, dt2 = _frame_rows(mem0, perm), _frame_rows(dt0, perm)
    fn = _LIFScan.apply
    if backend == "triton" or (backend == "auto" and current.is_cuda):
        from . import triton_scan

        if backend == "triton" or triton_scan.available():
            fn = triton_scan.TritonLIFScan.apply
    spk, mem, dt = fn(cur2, mem2, dt2, float(leak), float(thr), bool(hard), surrogate)
    frame_shape = (1, *current.shape[1:])
    return (unrows(spk, current.shape, perm), unrows(mem.unsqueeze(0), frame_shape, perm)[0],
            unrows(dt.unsqueeze(0), frame_shape, perm)[0])
