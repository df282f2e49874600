"""Fully connected layers on the CPU through oneDNN instead of the BLAS.

PyTorch's CPU ``F.linear`` in fp32 calls the BLAS (MKL in the official wheels), which
runs its AVX2 code on AMD processors; oneDNN, which PyTorch already uses for
convolutions, runs AVX-512 there.  Measured on the 2-core AMD EPYC development VM,
VGG5's fc4 over 256 frames ([256, 8192] x [8192, 1024]): forward 23.0 -> 8.8 ms,
input gradient 23.4 -> 9.0 ms, weight gradient 19.8 -> 9.2 ms.  bf16 already goes
through oneDNN under autocast, and CUDA through cuBLAS: both are left alone.

:func:`linear` is ``F.linear`` with that routing; results agree with ``F.linear`` to
fp32 rounding (a different summation order), not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_available: bool | None = None


def _op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) by oneDNN; ``weight`` is [out, in], any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def available() -> bool:
    """Whether this PyTorch build has the oneDNN linear (checked once, on a tiny input)."""
    global _available
    if _available is None:
        try:
            x, w = torch.ones(2, 3), torch.ones(4, 3)
            _available = bool(torch.backends.mkldnn.is_available()) and torch.equal(_op(x, w, None), x @ w.t())
        except (RuntimeError, AttributeError, NotImplementedError):
            _available = False
    return _available


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b with the three products (forward, dL/dx, dL/dW) by oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _op(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = _op(grad, weight.t(), None) if ctx.needs_input_grad[0] else None   # grad @ W
        gw = _op(grad.t(), x.t(), None) if ctx.needs_input_grad[1] else None    # grad^T @ x
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that takes oneDNN for 2-D fp32 inputs on the CPU (see the module docstring)."""
    if (x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and available()):
        return _OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
