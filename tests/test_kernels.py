"""The CPU speed helpers: the oneDNN linear (snnadv.kernels.linear) equals F.linear to
fp32 rounding in value and gradients; the allocator setting (snnadv.runtime) applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from snnadv.kernels import linear as onednn
from snnadv.runtime import keep_freed_memory


@pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN linear")
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear(bias):
    torch.manual_seed(0)
    x = (torch.rand(48, 300) < 0.2).float().requires_grad_(True)  # spike-like input
    w = (torch.randn(70, 300) * 0.1).requires_grad_(True)
    b = torch.randn(70, requires_grad=True) if bias else None
    g = torch.randn(48, 70)
    y = onednn.linear(x, w, b)
    assert y.grad_fn is not None and "OneDnn" in type(y.grad_fn).__name__
    gx, gw, *gb = torch.autograd.grad(y, [x, w] + ([b] if bias else []), g)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True) if bias else None
    y2 = F.linear(x2, w2, b2)
    rx, rw, *rb = torch.autograd.grad(y2, [x2, w2] + ([b2] if bias else []), g)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(gb[0], rb[0])


def test_onednn_linear_falls_back_where_it_does_not_apply():
    x, w = torch.randn(2, 3, 4), torch.randn(5, 4)  # 3-D input: plain F.linear
    torch.testing.assert_close(onednn.linear(x, w), F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: PyTorch's own bf16 path
        assert onednn.linear(torch.randn(2, 4), w).dtype == torch.bfloat16


def test_keep_freed_memory_is_idempotent():
    first = keep_freed_memory()
    assert keep_freed_memory() == first
    import sys
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert first is True
