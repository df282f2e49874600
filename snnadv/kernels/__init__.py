"""Fused multi-step neuron scans: :func:`lif_scan` runs the LIF recurrence over all T
steps at once, on the PyTorch scan (:mod:`snnadv.kernels.scan`, any device) or the
Triton kernels (:mod:`snnadv.kernels.triton_scan`, CUDA), which fall back to the
PyTorch scan; both count what ran in :data:`snnadv.kernels.scan.RUNS`."""

from __future__ import annotations

import os

import torch

from ..errors import SnnadvError
from .scan import BACKENDS, RUNS, _frame_rows, _LIFScan, reset_mode, rows, unrows


def lif_scan(current: torch.Tensor, mem0: torch.Tensor, dt0: torch.Tensor, leak: float, thr: float,
             reset: str | bool, surrogate, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the LIF recurrence over the first axis of ``current``.

    Args:
        current: input currents [T, ...] (the synaptic layer's output for T frames).
        mem0, dt0: the state before the first step (one frame each).
        leak, thr: lambda and the threshold.
        reset: ``"subtract"`` | ``"zero"`` | ``"none"`` (or a bool: whether the reset is to zero).
        surrogate: a :class:`snnadv.surrogates.Surrogate` (used in backward only).
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
        from . import triton_scan  # (imports Triton: only on the way to a GPU)

        if backend == "triton" or triton_scan.available():
            fn = triton_scan.TritonLIFScan.apply
        else:
            RUNS["forward:triton-unavailable"] += 1
    spk, mem, dt = fn(cur2, mem2, dt2, float(leak), float(thr), reset_mode(reset), surrogate, backend == "triton")
    frame_shape = (1, *current.shape[1:])
    return (unrows(spk, current.shape, perm), unrows(mem.unsqueeze(0), frame_shape, perm)[0],
            unrows(dt.unsqueeze(0), frame_shape, perm)[0])
