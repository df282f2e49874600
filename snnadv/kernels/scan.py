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
This module imports no neuron (the surrogates come in as arguments);
:mod:`snnadv.kernels.triton_scan` imports this one, never the reverse; the dispatcher
:func:`snnadv.kernels.lif_scan` chooses between them.

Forward (per step; see :mod:`snnadv.neurons` for the conventions):

    u[t] = lam * u[t-1] + I[t] - thr * s[t-1]          (soft reset, "subtract")
    u[t] = lam * (1 - s[t-1]) * u[t-1] + I[t]          (hard reset, "zero")
    u[t] = lam * u[t-1] + I[t]                         (no reset, "none")
    s[t] = H(u[t] - thr);  dt[t+1] = 1 if s[t] else dt[t] + 1

Backward (BPTT; the reset term carries no gradient):

    dL/du[t] = dL/ds[t] * sg[t] + dL/du[t+1] * lam * (1 - s[t] if hard else 1)
    dL/dI[t] = dL/du[t]
    dL/du[-1] = dL/du[0] * lam * (1 - s[-1] if hard else 1)     (the initial state)

(u[t+1] depends on u[t] through lam * (1 - s[t]) for a hard reset; "none" has the
soft reset's backward.)  sg[t] is the
surrogate ds/du at step t; for Eq. 4, sg[t] = alpha * exp(-beta * dt[t]) is carried
as a running factor (times exp(-beta) per silent step, alpha * exp(-beta) after a
spike, where dt = 1) instead of recomputing the exponential.

Which implementation runs: :func:`lif_scan`'s ``backend``, else the environment
variable ``SNNADV_SCAN`` (``auto`` | ``torch`` | ``triton``), else ``auto``: Triton for
CUDA tensors when it imports, PyTorch otherwise.  With ``auto``, a kernel that fails
to compile or launch warns and the PyTorch scan computes the same result; with
``triton`` the failure is an error.  Either way :data:`RUNS` counts which
implementation ran in each direction (``forward:triton``, ``backward:torch``,
``forward:triton-failed``, ...), so a test or a benchmark can tell the kernel from
its fallback (:func:`runs_since`).

Layout.  The scan is elementwise over neurons, so it runs on a ``[T, N]`` view of
the currents whatever their memory format (channels-last convolution outputs
included, see :func:`rows`); outputs come back in the input's layout.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..errors import SnnadvError

BACKENDS = ("auto", "torch", "triton")
#: reset conventions, snnTorch's names (see the forward above)
RESETS = ("subtract", "zero", "none")

#: how many times each implementation ran, per direction, in this process
RUNS: Counter = Counter()


def runs_since(before: Counter) -> dict[str, int]:
    """What ran since ``before`` (a copy of :data:`RUNS`): ``{"forward:triton": 3, ...}``."""
    return {k: v for k, v in (RUNS - before).items() if v}


def reset_mode(reset) -> str:
    """``"subtract"`` | ``"zero"`` | ``"none"`` from a reset name, or from a bool (whether
    the reset is hard, as the scans took it before ``"none"`` existed)."""
    if isinstance(reset, bool):
        return "zero" if reset else "subtract"
    if reset not in RESETS:
        raise SnnadvError(f"unknown reset '{reset}' (choose {', '.join(RESETS)})")
    return reset


class _LIFScan(torch.autograd.Function):
    """The scan over ``[T, N]`` currents; mem0 and dt0 are ``[N]``; ``reset`` a
    :data:`RESETS` name (or a bool: hard or soft)."""

    @staticmethod
    def forward(ctx, current, mem0, dt0, leak, thr, reset, surrogate, strict=False):
        RUNS["forward:torch"] += 1
        mode = reset_mode(reset)
        hard, subtract = mode == "zero", mode == "subtract"
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
            if subtract:
                dst.sub_(prev, alpha=thr)
            mem = dst
            prev = torch.gt(mem, thr, out=out[t])
        spikes = out.bool()
        dt = final_dt(spikes, dt0)
        ctx.save_for_backward(spikes, mems if keep_mem else torch.empty(0), mem0.detach(), dt0)
        ctx.leak, ctx.thr, ctx.hard, ctx.surrogate = leak, thr, hard, surrogate
        ctx.mark_non_differentiable(dt)
        return out, mem.clone() if keep_mem else mem, dt

    #: gradients in a dtype other than fp32 are computed in fp32 blocks of at most this
    #: many values ([steps, N]) and written out block by block, so that backward holds
    #: no T x N fp32 temporary (39 GiB for VGG5's conv1 at T=2500, batch 64)
    block_values = 2 ** 24

    @staticmethod
    def backward(ctx, grad_spk, grad_mem_T, grad_dt):
        RUNS["backward:torch"] += 1
        spikes, mems, mem0, dt0 = ctx.saved_tensors
        leak, thr, hard, surrogate = ctx.leak, ctx.thr, ctx.hard, ctx.surrogate
        T, N = spikes.shape[0], spikes[0].numel()
        out = torch.empty_like(grad_spk)
        if out.dtype == torch.float32:  # computed in place in the result: one block
            steps, work = T, out
        else:
            steps = max(1, min(T, _LIFScan.block_values // max(N, 1)))
            work = torch.empty((steps, *spikes.shape[1:]), dtype=torch.float32, device=spikes.device)
        starts = list(range(0, T, steps))
        sg_at = _eq4_factors(spikes, dt0, thr, surrogate, starts) if not surrogate.needs_mem else None
        carry = None  # g[t1] of the block after, fp32
        for b in range(len(starts) - 1, -1, -1):
            t0 = starts[b]
            t1 = min(T, t0 + steps)
            a = work[: t1 - t0]
            _direct_terms(a, grad_spk[t0:t1], spikes[t0:t1], mems[t0:t1] if surrogate.needs_mem else None,
                          sg_at[b] if sg_at is not None else None, thr, surrogate)
            if carry is None and grad_mem_T is not None:
                a[-1].add_(grad_mem_T)  # the returned state is u[T-1] itself
            # g[t] = a[t] + lam * (1 - s[t] if hard else 1) * g[t+1], computed into a in place
            for i in range(t1 - t0 - 1, -1, -1):
                nxt = a[i + 1] if i + 1 < t1 - t0 else carry
                if nxt is None:
                    continue
                if hard:
                    a[i].addcmul_(nxt, (~spikes[t0 + i]).float(), value=leak)
                else:
                    a[i].add_(nxt, alpha=leak)
            carry = a[0].clone() if b else a[0]
            if work is not out:
                out[t0:t1].copy_(a)
        grad_mem0 = None
        if ctx.needs_input_grad[1]:  # u[0] depends on u[-1] through lam (1 - s[-1])
            grad_mem0 = leak * carry * (~(mem0 > thr)) if hard else leak * carry
        return out, grad_mem0, None, None, None, None, None, None


def _eq4_factors(spikes, dt0, thr, surrogate, starts: list[int]) -> list[torch.Tensor]:
    """Eq. 4's ds/du at each step of ``starts`` (a running factor from step 0: times
    exp(-beta) per silent step, alpha exp(-beta) after a spike)."""
    sg = surrogate.grad(None, thr, dt0.float())  # sg at step 0
    out = [sg]
    for t0, t1 in zip(starts, starts[1:]):
        sg = _eq4_run(sg, spikes[t0:t1], surrogate, None, None)
        out.append(sg)
    return out


def _eq4_run(sg, spikes, surrogate, grad_spk, a):
    """Carry Eq. 4's factor over the steps of ``spikes``; with ``a``, also write
    a[t] = dL/ds[t] * sg[t].  Returns sg after the last step:
    sg[t+1] = sg[t] * decay * (1 - s[t]) + fresh * s[t]."""
    decay, fresh = surrogate.step_decay(), surrogate.after_spike()
    sg, nxt = sg.clone(), torch.empty_like(sg)  # (the caller's sg is kept)
    for t in range(spikes.shape[0]):
        s = spikes[t].float()
        # fresh * s + sg * (decay * (1 - s)): exact for s in {0, 1}
        torch.addcmul(torch.mul(s, fresh), sg, s.mul_(-decay).add_(decay), out=nxt)
        if a is not None:
            torch.mul(grad_spk[t], sg, out=a[t])
        sg, nxt = nxt, sg
    return sg


def _direct_terms(a, grad_spk, spikes, mems, sg0, thr, surrogate) -> None:
    """a[t] = dL/ds[t] * sg[t] (fp32) for the steps of one block."""
    if surrogate.needs_mem:
        torch.mul(grad_spk.float(), surrogate.grad(mems, thr, None), out=a)
    else:
        _eq4_run(sg0, spikes, surrogate, grad_spk, a)


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
