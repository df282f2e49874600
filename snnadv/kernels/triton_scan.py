"""Triton version of the fused multi-step LIF/IF scan (:class:`snnadv.kernels.scan._LIFScan`).

What it computes.  For currents ``I`` [T, N] and the state before the first step
(membrane ``u[-1]`` = mem0 [N], time since the last spike dt0 [N]), all T steps of the
neuron of paper Eq. 3 (snnTorch's conventions, see :mod:`snnadv.neurons`):

    u[t] = lam * u[t-1] + I[t] - thr * s[t-1]          (soft reset; thr not leaked)
    u[t] = lam * (1 - s[t-1]) * u[t-1] + I[t]          (hard reset, to zero)
    u[t] = lam * u[t-1] + I[t]                         (no reset, snnTorch's "none")
    s[t] = H(u[t] - thr)   (strict >),   s[-1] = H(u[-1] - thr)
    dt[0] = dt0,  dt[t+1] = 1 if s[t] else dt[t] + 1

and, in backward, BPTT with a surrogate ds/du = sg[t] (the reset carries no gradient):

    dL/du[t]  = dL/ds[t] * sg[t] + lam * (1 - s[t] if hard else 1) * dL/du[t+1]
    dL/dI[t]  = dL/du[t],   dL/du[-1] = lam * (1 - s[-1] if hard else 1) * dL/du[0]

(``dL/du[T-1]`` also receives the gradient of the returned membrane.)  The surrogates:

* ``stdb`` (paper Eq. 4): sg[t] = alpha * exp(-beta * dt[t]); dt[t] is rebuilt from the
  saved spikes and the exponential evaluated directly (the PyTorch path carries it as a
  running product; the two agree to float rounding);
* ``linear``: sg[t] = gamma * max(0, 1 - |u[t] / thr - 1|);
* ``fast-sigmoid``: sg[t] = 1 / (1 + k |u[t] - thr|)^2.

Design.  The scan is independent per neuron, so each Triton program owns a block of
``BLOCK`` neurons (a 1D grid over N) and walks over T with the neuron state (membrane,
previous spike, index of the last spike) in registers; every element of ``I`` is read
once and every output written once.

* Forward kernel: writes the spikes (in the current's dtype, the next layer's input),
  the same spikes as ``uint8`` (saved), optionally the membrane of every step (fp32),
  and the final membrane and dt.  The order of operations is snnTorch's and PyTorch's
  (``lam * u``, then ``+ I``, then ``- thr * s``), and floating-point contraction
  (FMA) is disabled, so the spikes are bit-identical to the PyTorch path.
* Backward kernel: for ``stdb`` a first pass forward over t writes
  a[t] = dL/ds[t] * sg[t] (dt is a forward-running quantity) into the gradient output
  when that is fp32; for a bf16 output it writes only dt's part, the steps since the
  last spike, as int16 into the output's own memory, and the second pass rebuilds a[t]
  from it with the same operations (no T x N fp32 buffer); the second pass, backward
  over t, runs the recurrence above with dL/du[t+1] carried in registers.
* Forward kernel, without a gradient: no uint8 spike copy is written.  For the two surrogates that
  read the membrane, a[t] is computed inside the backward pass from the saved
  membrane, so there is a single pass and no buffer.

Memory saved for backward (per neuron per step): the spikes as ``bool`` (1 byte), plus
the fp32 membrane (4 bytes) only when the surrogate reads it (linear, fast-sigmoid)
and a gradient is needed; plus mem0 and dt0 (one frame).  Eq. 4 needs no membrane.

Tested against :mod:`snnadv.kernels.scan` in ``tests/test_triton_scan.py``: under the
Triton interpreter on the CPU (``TRITON_INTERPRET=1``) and on a CUDA GPU when one is
present.  :func:`snnadv.kernels.lif_scan` dispatches here on CUDA (importing this
module only then; this module imports the scan, and the surrogates, never a neuron).
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import SnnadvError
from ..surrogates import FastSigmoid, LinearSurrogate, SpikeTime
from .scan import RUNS, _LIFScan, reset_mode

try:  # Triton is optional: without it (or without CUDA) lif_scan uses the PyTorch scan
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

#: neurons per program (a power of two); 1024 fp32 values = 8 per thread at 4 warps
BLOCK = 1024
NUM_WARPS = 4

# surrogate codes (tl.constexpr in the kernels)
_STDB, _LINEAR, _FAST_SIGMOID = 0, 1, 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class KernelState:
    """Whether the kernels work in this process.

    ``broken``: why they were switched off for ``auto`` (None: they work or were not
    tried); every call that then runs the PyTorch scan instead is counted in
    :data:`snnadv.kernels.scan.RUNS` (``forward:triton-unavailable``)."""

    broken: str | None = None


#: the process's one :class:`KernelState` (tests replace its fields)
STATE = KernelState()


def available() -> bool:
    """True when the Triton scan can run: Triton imports and a CUDA GPU is present, or
    the Triton interpreter is on (``TRITON_INTERPRET=1``, CPU tensors; for tests), and
    no launch has failed in this process (see :func:`_give_up`)."""
    return triton is not None and STATE.broken is None and (torch.cuda.is_available() or _interpreting())


def _give_up(where: str, error: Exception, strict: bool) -> None:
    """A kernel failed to compile or launch: an error when Triton was asked for
    (``strict``), else warn once, count it, and use the PyTorch scan from now on.

    The results do not change (the two compute the same function); only speed does.
    """
    RUNS[f"{where}:triton-failed"] += 1
    if strict:
        raise SnnadvError(f"the Triton LIF scan failed in {where}: {type(error).__name__}: {error} "
                          f"(SNNADV_SCAN=auto falls back to the PyTorch scan)") from error
    if STATE.broken is None:
        STATE.broken = f"{where}: {type(error).__name__}: {error}"
        warnings.warn(f"the Triton LIF scan failed ({STATE.broken}); using the PyTorch scan instead "
                      f"(set SNNADV_SCAN=torch to skip Triton)", RuntimeWarning, stacklevel=3)


def _surrogate_code(surrogate) -> tuple[int, float, float] | None:
    """(kind, p0, p1) for the kernels, or None for a surrogate they do not implement.

    Exact classes only: a subclass may override ``grad``."""
    kind = type(surrogate)
    if kind is SpikeTime:
        return _STDB, surrogate.alpha, surrogate.beta
    if kind is LinearSurrogate:
        return _LINEAR, surrogate.gamma, 0.0
    if kind is FastSigmoid:
        return _FAST_SIGMOID, surrogate.slope, 0.0
    return None


if triton is not None:

    @triton.jit
    def _lif_fwd_kernel(cur_ptr, mem0_ptr, dt0_ptr,  # inputs: [T, N], [N], [N]
                        spk_ptr, bits_ptr, mems_ptr,  # outputs [T, N]: spikes, uint8 spikes, membranes
                        memT_ptr, dtT_ptr,  # outputs [N]: the state after the last step
                        T, N, leak, thr,
                        HARD: tl.constexpr, SUBTRACT: tl.constexpr, KEEP_MEM: tl.constexpr,
                        KEEP_BITS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < N  # lanes past N load undefined values and store nothing
        mem = tl.load(mem0_ptr + offs, mask=live).to(tl.float32)
        prev = mem > thr  # the spike of step -1 (resets at step 0)
        last = tl.full([BLOCK], -1, tl.int32)  # index of the last spike, -1 if none yet
        # row pointers, advanced by N per step (pointer arithmetic is 64-bit: T*N may
        # exceed 2**31)
        cur_p, spk_p, bits_p, mems_p = cur_ptr + offs, spk_ptr + offs, bits_ptr + offs, mems_ptr + offs
        for t in range(T):
            current = tl.load(cur_p, mask=live).to(tl.float32)
            # Eq. 3 in snnTorch's order, one rounding per operation (no FMA: the
            # launch sets enable_fp_fusion=False), as the PyTorch path computes it
            if HARD:
                mem = tl.where(prev, 0.0, mem)
            mem = mem * leak
            mem = mem + current
            if SUBTRACT:  # (neither HARD nor SUBTRACT: no reset)
                mem = mem - tl.where(prev, thr, 0.0)
            spike = mem > thr
            # (0.0/1.0 through fp32: exact in any float dtype; the interpreter cannot cast
            # a boolean to bf16 directly)
            tl.store(spk_p, tl.where(spike, 1.0, 0.0).to(spk_ptr.dtype.element_ty), mask=live)
            if KEEP_BITS:  # saved for backward: only when a gradient is needed
                tl.store(bits_p, spike.to(tl.uint8), mask=live)
            if KEEP_MEM:
                tl.store(mems_p, mem, mask=live)
            last = tl.where(spike, t, last)
            prev = spike
            cur_p += N
            spk_p += N
            bits_p += N
            mems_p += N
        tl.store(memT_ptr + offs, mem, mask=live)
        # dt after the last step: T - (index of the last spike), or dt0 + T
        dt0 = tl.load(dt0_ptr + offs, mask=live).to(tl.float32)
        dtT = tl.where(last >= 0, (T - last).to(tl.float32), dt0 + T)
        tl.store(dtT_ptr + offs, dtT.to(dtT_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _lif_bwd_kernel(gspk_ptr, gmemT_ptr,  # incoming gradients: [T, N], [N]
                        bits_ptr, mems_ptr, mem0_ptr, dt0_ptr,  # saved: [T, N], [T, N], [N], [N]
                        work_ptr, gcur_ptr, gmem0_ptr,  # buffer [T, N] (see WORK_DT); outputs [T, N], [N]
                        T, N, last_row, leak, thr, p0, p1,  # p0, p1: alpha, beta | gamma | slope
                        SURROGATE: tl.constexpr, HARD: tl.constexpr, HAS_GMEM_T: tl.constexpr,
                        NEED_GMEM0: tl.constexpr, WORK_DT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < N

        # -- pass 1 (Eq. 4 only), forward over t: a[t] = dL/ds[t] * alpha * exp(-beta * dt[t])
        # into the fp32 output, or (WORK_DT: a bf16 output, streamed) only the steps since
        # the last spike, t - last (-1: none yet), as int16 in the output's own memory
        dt0 = tl.load(dt0_ptr + offs, mask=live).to(tl.float32)
        if SURROGATE == 0:
            last = tl.full([BLOCK], -1, tl.int32)  # index of the last spike before step t
            gspk_p, bits_p, work_p = gspk_ptr + offs, bits_ptr + offs, work_ptr + offs
            for t in range(T):
                if WORK_DT:
                    tl.store(work_p, tl.where(last >= 0, t - last, -1).to(tl.int16), mask=live)
                else:
                    dt = tl.where(last >= 0, (t - last).to(tl.float32), dt0 + t)
                    sg = p0 * tl.exp(-p1 * dt)
                    a = tl.load(gspk_p, mask=live).to(tl.float32) * sg
                    tl.store(work_p, a, mask=live)
                spike = tl.load(bits_p, mask=live) != 0
                last = tl.where(spike, t, last)
                gspk_p += N
                bits_p += N
                work_p += N
            tl.debug_barrier()  # pass 2 reads what pass 1 wrote

        # -- pass 2, backward over t: g[t] = a[t] + carry, where carry = dL/du[t+1] * du[t+1]/du[t]
        mem0 = tl.load(mem0_ptr + offs, mask=live).to(tl.float32)
        spike_init = mem0 > thr  # s[-1]
        if HAS_GMEM_T:  # the returned membrane is u[T-1] itself
            carry = tl.load(gmemT_ptr + offs, mask=live).to(tl.float32)
        else:
            carry = tl.zeros([BLOCK], tl.float32)
        row = offs.to(tl.int64) + last_row  # element offsets of step T-1 (int64: T*N may exceed 2**31)
        for i in range(T):
            t = T - 1 - i
            # a[t], the direct term of step t
            if SURROGATE == 0:
                if WORK_DT:  # the same a[t] as pass 1 would have stored (same operations)
                    since = tl.load(work_ptr + row, mask=live).to(tl.int32)
                    dt = tl.where(since >= 0, since.to(tl.float32), dt0 + t)
                    sg = p0 * tl.exp(-p1 * dt)
                    a = tl.load(gspk_ptr + row, mask=live).to(tl.float32) * sg
                else:
                    a = tl.load(work_ptr + row, mask=live)
            else:
                u = tl.load(mems_ptr + row, mask=live)
                # (IEEE divisions: Triton's plain `/` is an approximate one on the GPU)
                if SURROGATE == 1:  # linear: gamma * max(0, 1 - |u/thr - 1|)
                    sg = p0 * tl.maximum(1.0 - tl.abs(tl.math.div_rn(u, thr) - 1.0), 0.0)
                else:  # fast sigmoid: 1 / (1 + k |u - thr|)^2
                    d = 1.0 + p0 * tl.abs(u - thr)
                    sg = tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), d * d)
                a = tl.load(gspk_ptr + row, mask=live).to(tl.float32) * sg
            g = a + carry  # dL/du[t] = dL/dI[t]
            tl.store(gcur_ptr + row, g.to(gcur_ptr.dtype.element_ty), mask=live)
            # what reaches step t-1: du[t]/du[t-1] = lam * (1 - s[t-1]) for a hard
            # reset (s[-1] from mem0), lam for a soft one
            carry = g * leak
            if HARD:
                # s[t-1] for t > 0 (tested as row >= N: the interpreter mishandles a
                # block mask combined with a scalar condition), s[-1] for t == 0
                spike_prev = tl.load(bits_ptr + row - N, mask=live & (row >= N)) != 0
                spike_prev = tl.where(t == 0, spike_init, spike_prev)
                carry = tl.where(spike_prev, 0.0, carry)
            row -= N
        if NEED_GMEM0:  # after step 0 the carry is dL/du[-1]
            tl.store(gmem0_ptr + offs, carry, mask=live)


def _grid(N: int) -> tuple[int]:
    return (triton.cdiv(N, BLOCK),)


def _device_guard(x: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def _launch_forward(current, mem0, dt0, spikes, bits, mems, memT, dtT, T, N, leak, thr, reset, keep_mem,
                    keep_bits=True):
    """``reset``: a :data:`snnadv.kernels.scan.RESETS` name."""
    with _device_guard(current):
        _lif_fwd_kernel[_grid(N)](current, mem0, dt0, spikes, bits, mems, memT, dtT, T, N, leak, thr,
                                  HARD=reset == "zero", SUBTRACT=reset == "subtract", KEEP_MEM=keep_mem,
                                  KEEP_BITS=keep_bits, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


def _launch_backward(grad_spk, gmemT, bits, mems, mem0, dt0, work, gcur, gmem0, T, N, leak, thr, p0, p1,
                     kind, hard, has_gmemT, need_gmem0):
    with _device_guard(grad_spk):
        _lif_bwd_kernel[_grid(N)](grad_spk, gmemT, bits, mems, mem0, dt0, work, gcur, gmem0,
                                  T, N, (T - 1) * N, leak, thr, p0, p1,
                                  SURROGATE=kind, HARD=hard, HAS_GMEM_T=has_gmemT, NEED_GMEM0=need_gmem0,
                                  WORK_DT=work.dtype == torch.int16,
                                  BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


class TritonLIFScan(torch.autograd.Function):
    """Same contract as :class:`snnadv.kernels.scan._LIFScan`: ``apply(current [T, N],
    mem0 [N], dt0 [N], leak, thr, reset, surrogate)`` -> ``(spikes [T, N] in current's
    dtype, membrane after the last step [N] fp32, dt after the last step [N])``.

    A surrogate other than the three built-in classes falls back to the PyTorch scan
    (counted as ``forward:triton-surrogate``).  ``strict``: a failing kernel is an error
    instead of a fallback (see :func:`_give_up`).  Every kernel launch is counted in
    :data:`snnadv.kernels.scan.RUNS` (``forward:triton``, ``backward:triton``)."""

    @staticmethod
    def forward(ctx, current, mem0, dt0, leak, thr, reset, surrogate, strict=False):
        reset = reset_mode(reset)
        code = _surrogate_code(surrogate)
        ctx.fallback, ctx.strict = code is None, bool(strict)
        if ctx.fallback:  # not implemented in the kernels: the readable version
            RUNS["forward:triton-surrogate"] += 1
            return _LIFScan.forward(ctx, current, mem0, dt0, leak, thr, reset, surrogate)
        if not (current.is_cuda or _interpreting()):
            raise RuntimeError("the Triton LIF scan needs CUDA tensors (or TRITON_INTERPRET=1)")
        if current.dim() != 2:
            raise ValueError(f"current must be [T, N], got shape {tuple(current.shape)}")
        T, N = current.shape
        current = current.contiguous()
        mem0c = mem0.detach().float().contiguous()
        dt0c = dt0.detach().contiguous()
        grad_needed = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        keep_mem = surrogate.needs_mem and grad_needed

        spikes = torch.empty_like(current)
        # the spikes as uint8, saved for backward; without a gradient nothing is written
        bits = torch.empty((T, N) if grad_needed else (0, N), dtype=torch.uint8, device=current.device)
        memT = torch.empty(N, dtype=torch.float32, device=current.device)
        dtT = torch.empty_like(dt0c)
        mems = torch.empty((T, N), dtype=torch.float32, device=current.device) if keep_mem else None
        if N > 0 and T > 0:
            try:
                _launch_forward(current, mem0c, dt0c, spikes, bits if grad_needed else spikes,
                                mems if keep_mem else memT, memT, dtT,
                                T, N, float(leak), float(thr), reset, keep_mem, grad_needed)
                RUNS["forward:triton"] += 1
            except Exception as e:  # noqa: BLE001 - any compile/launch failure: same math in PyTorch
                _give_up("forward", e, ctx.strict)
                ctx.fallback = True
                return _LIFScan.forward(ctx, current, mem0, dt0, leak, thr, reset, surrogate)
        else:  # nothing to scan: the state passes through
            memT.copy_(mem0c)
            dtT.copy_(dt0c + T)
        ctx.save_for_backward(bits.view(torch.bool), mems if keep_mem else torch.empty(0), mem0c, dt0c)
        ctx.leak, ctx.thr, ctx.hard, ctx.code = float(leak), float(thr), reset == "zero", code
        ctx.surrogate = surrogate  # for the PyTorch backward, should the kernel fail
        ctx.mark_non_differentiable(dtT)
        return spikes, memT, dtT

    @staticmethod
    def backward(ctx, grad_spk, grad_mem_T, grad_dt):
        if ctx.fallback:
            return _LIFScan.backward(ctx, grad_spk, grad_mem_T, grad_dt)
        spikes, mems, mem0, dt0 = ctx.saved_tensors
        kind, p0, p1 = ctx.code
        T, N = spikes.shape
        grad_spk = grad_spk.contiguous()
        need_gmem0 = bool(ctx.needs_input_grad[1])
        gcur = torch.empty_like(grad_spk)
        gmem0 = torch.empty(N, dtype=torch.float32, device=grad_spk.device) if need_gmem0 else None
        if kind == _STDB:  # pass 1 writes into the output: a[t] when it is fp32, else
            # (2-byte gradients) the steps since the last spike as int16; T x N fp32 only
            # for T >= 2^15 steps in one chunk
            if gcur.dtype == torch.float32:
                work = gcur
            elif gcur.element_size() == 2 and T < 2 ** 15:
                work = gcur.view(torch.int16)
            else:
                work = torch.empty((T, N), dtype=torch.float32, device=gcur.device)
        else:
            work = gcur  # unused
        has_gmemT = grad_mem_T is not None
        gmemT = grad_mem_T.float().contiguous() if has_gmemT else mem0
        if N > 0 and T > 0:
            try:
                _launch_backward(grad_spk, gmemT, spikes.view(torch.uint8), mems if mems.numel() else mem0,
                                 mem0, dt0, work, gcur, gmem0 if need_gmem0 else mem0, T, N, ctx.leak, ctx.thr,
                                 float(p0), float(p1), kind, ctx.hard, has_gmemT, need_gmem0)
                RUNS["backward:triton"] += 1
            except Exception as e:  # noqa: BLE001 - the saved tensors are what _LIFScan saves
                _give_up("backward", e, ctx.strict)
                return _LIFScan.backward(ctx, grad_spk, grad_mem_T, grad_dt)
        elif need_gmem0:  # T == 0: u[-1] is the returned membrane
            gmem0 = gmemT.clone() if has_gmemT else torch.zeros_like(mem0)
        return gcur, gmem0, None, None, None, None, None, None
