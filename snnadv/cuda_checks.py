"""Checks that need a CUDA GPU, as pytest tests (skipped without one).

They ship inside the package so that ``snnadv doctor --device cuda --full`` can run
them on a machine that has only the installed wheel (``tests/test_cuda.py`` collects
them in a checkout).  Every Triton comparison forces the Triton backend (a failing
kernel is then an error, not a silent fallback) and asserts from
:data:`snnadv.kernels.scan.RUNS` that the kernel really ran.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"


def _inputs(T, N, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    cur = (0.6 * torch.randn(T, N, generator=g, device=DEV) + 0.35).to(dtype)
    mem0 = 0.7 * torch.randn(N, generator=g, device=DEV)
    dt0 = torch.randint(1, 30, (N,), generator=g, device=DEV).float()
    grad = torch.randn(T, N, generator=g, device=DEV).to(dtype)
    return cur, mem0, dt0, grad


def _run(backend, cur, mem0, dt0, grad, leak, hard, surrogate):
    from snnadv.kernels import lif_scan

    c, m = cur.clone().requires_grad_(True), mem0.clone().requires_grad_(True)
    spk, mem, dt = lif_scan(c, m, dt0, leak, 1.0, hard, surrogate, backend=backend)
    torch.autograd.backward([spk, mem], [grad, torch.ones_like(mem)])
    return spk.detach(), mem.detach(), dt, c.grad, m.grad


def _compare(cur, mem0, dt0, grad, leak=0.9, hard=False, name="stdb"):
    """Triton (forced) against the PyTorch scan: same spikes, state, and gradients."""
    from snnadv.kernels import scan
    from snnadv.surrogates import make_surrogate

    surrogate = make_surrogate(name)
    ref = _run("torch", cur, mem0, dt0, grad, leak, hard, surrogate)
    before = scan.RUNS.copy()
    tri = _run("triton", cur, mem0, dt0, grad, leak, hard, surrogate)
    ran = scan.runs_since(before)
    assert ran.get("forward:triton") and ran.get("backward:triton") and "forward:torch" not in ran, ran
    assert torch.equal(tri[0], ref[0]), f"spikes differ in {(tri[0] != ref[0]).sum().item()} places"
    torch.testing.assert_close(tri[1], ref[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(tri[2], ref[2])
    tol = 1e-2 if cur.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(tri[3].float(), ref[3].float(), rtol=tol, atol=1e-6)
    torch.testing.assert_close(tri[4], ref[4], rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("name", ["stdb", "linear", "fast-sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_neurons_not_a_multiple_of_16(name, dtype):
    """N = 1,000,003 (prime): the last program's lanes are masked."""
    _compare(*_inputs(9, 1_000_003, dtype), name=name)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_bf16_and_fp32_hard_reset(dtype):
    for name in ("stdb", "linear"):
        _compare(*_inputs(17, 4099, dtype, seed=3), leak=0.95, hard=True, name=name)


@needs_cuda
def test_triton_more_than_2_31_elements():
    """T x N >= 2^31: 64-bit offsets.  The scan is independent per neuron, so the
    last neurons (whose offsets pass 2^31) are checked against the PyTorch scan run
    on those columns alone."""
    from snnadv.kernels import scan
    from snnadv.kernels import lif_scan
    from snnadv.surrogates import make_surrogate

    T, N = 513, 2 ** 22  # 2,151,677,952 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip(f"needs 24 GiB free, {free / 2**30:.0f} GiB free")
    cur = torch.empty(T, N, device=DEV, dtype=torch.bfloat16).uniform_(-0.3, 1.0)
    mem0, dt0 = torch.zeros(N, device=DEV), torch.full((N,), 1000.0, device=DEV)
    surrogate = make_surrogate("stdb")
    before = scan.RUNS.copy()
    c = cur.requires_grad_(True)
    spk, mem, dt = lif_scan(c, mem0, dt0, 0.99, 1.0, False, surrogate, backend="triton")
    grad = torch.ones_like(spk)
    spk.backward(grad)
    assert scan.runs_since(before).get("backward:triton") == 1
    tail = slice(N - 1024, N)
    c2 = cur.detach()[:, tail].clone().requires_grad_(True)
    s2, m2, d2 = lif_scan(c2, mem0[tail], dt0[tail], 0.99, 1.0, False, surrogate, backend="torch")
    s2.backward(grad[:, tail])
    assert torch.equal(spk[:, tail], s2) and torch.equal(dt[tail], d2)
    torch.testing.assert_close(mem[tail], m2)
    torch.testing.assert_close(c.grad[:, tail].float(), c2.grad.float(), rtol=1e-2, atol=1e-6)


def _tiny_snn(T=10, chunk=None, precision="fp32"):
    from snnadv.models import SNN, get_spec

    torch.manual_seed(0)
    snn = SNN(get_spec("tiny", 10), num_steps=T, leak=0.95, chunk_steps=chunk, precision=precision).to(DEV)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    return snn


def _binary(n=4):
    g = torch.Generator(device=DEV).manual_seed(0)
    return (torch.rand(n, 3, 32, 32, generator=g, device=DEV) > 0.5).float(), \
        torch.randint(0, 10, (n,), generator=g, device=DEV)


@needs_cuda
def test_an_snn_on_cuda_selects_the_triton_scan_by_itself(monkeypatch):
    """Automatic backend selection: an SNN on a GPU runs its neurons through the kernels."""
    from snnadv.kernels import scan

    monkeypatch.delenv("SNNADV_SCAN", raising=False)
    snn = _tiny_snn().train()
    x, y = _binary()
    before = scan.RUNS.copy()
    F.cross_entropy(snn(x), y).backward()
    ran = scan.runs_since(before)
    n = len(snn.neurons)
    assert ran.get("forward:triton") == n and ran.get("backward:triton") == n, ran
    assert not any(k.endswith(("failed", "unavailable")) for k in ran), ran


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunk_boundaries_do_not_change_results(precision):
    """Chunks of 3 and 7 steps and one chunk of 10: the same logits and input gradient
    (binary images: the encoder's spikes do not depend on the draws)."""
    x, y = _binary()
    results = []
    for chunk in (3, 7, 10):
        snn = _tiny_snn(chunk=chunk, precision=precision).eval()
        xg = x.clone().requires_grad_(True)
        logits = snn(xg)
        F.cross_entropy(logits, y, reduction="sum").backward()
        results.append((logits.detach(), xg.grad))
    for logits, grad in results[1:]:
        torch.testing.assert_close(logits, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-5)


@needs_cuda
def test_no_host_sync_in_a_training_step_or_a_forward():
    """CUDA's own sync detector: a training step and an inference forward never wait."""
    snn = _tiny_snn().train()
    x, y = _binary()
    F.cross_entropy(snn(x), y).backward()  # warm: kernels compiled, floats read
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.cross_entropy(snn(x), y).backward()
        snn.eval()
        with torch.no_grad():
            snn(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_algorithm1_bf16_on_cuda():
    from snnadv.gradients import Algorithm1

    x, y = _binary()
    g32, _ = Algorithm1(_tiny_snn().eval())(x, y)
    g16, _ = Algorithm1(_tiny_snn(precision="bf16").eval())(x, y)
    assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.98


@needs_cuda
def test_memory_estimate_bounds_the_measured_peak():
    """snnadv.memory's estimate of a BPTT attack gradient (VGG5, T=50, batch 16) against
    torch.cuda.max_memory_allocated; printed for the record."""
    from snnadv import memory
    from snnadv.gradients import Autograd
    from snnadv.models import SNN, get_spec

    spec = get_spec("vgg5", 10)
    snn = SNN(spec, num_steps=50, leak=0.99).to(DEV).eval()
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    x, y = torch.rand(16, 3, 32, 32, device=DEV), torch.randint(0, 10, (16,), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    Autograd(snn)(x, y)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    prof = memory.measure(spec, "bptt", device=DEV)
    estimate = memory.peak_bytes(prof, 16, 50, snn.chunk_for(16, 50, "cuda")) - prof.param_bytes
    print(f"memory: measured {measured / 2**20:.0f} MiB, estimated {estimate / 2**20:.0f} MiB")
    assert measured <= 1.5 * estimate, (measured, estimate)


@needs_cuda
def test_encoder_with_a_cuda_generator_does_not_sync():
    from snnadv.encoding import rate

    p = torch.rand(4, 3, 32, 32, device=DEV)
    g = torch.Generator(device=DEV).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = rate(p, 8, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    b = rate(p, 8, torch.Generator(device=DEV).manual_seed(0))
    assert torch.equal(a, b) and a.shape == (8, 4, 3, 32, 32)
