"""Readiness for paper scale on a GPU, shown on the CPU: bf16 correctness (Algorithm 1,
fp32 counts), memory (chunked Algorithm 1 through a hook, pooling that saves nothing),
no host syncs in the hot path, an encoder that seeds only its own device's generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from snnadv.encoding import rate
from snnadv.gradients import Algorithm1
from snnadv.models import SNN, get_spec


def small_snn(T=6, precision="fp32", chunk=None, seed=0):
    """A tiny SNN with random weights and low thresholds, so that every layer spikes."""
    torch.manual_seed(seed)
    snn = SNN(get_spec("tiny", 10), num_steps=T, leak=0.95, precision=precision, chunk_steps=chunk)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    return snn.eval()


def binary_images(n=3, seed=0):
    """Images of 0s and 1s: the rate encoder's spikes are then the same for every draw
    (p = 0 or 1), so runs with different chunkings see the same input."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 32, 32, generator=g) > 0.5).float(), torch.randint(0, 10, (n,), generator=g)


def test_algorithm1_under_bf16_matches_fp32():
    """Item 1: Alg. 1 at bf16 ran into a dtype error in conv_transpose2d (bf16 gradient,
    fp32 weight); now it runs and gives about the fp32 gradient."""
    x, y = binary_images()
    g32, _ = Algorithm1(small_snn())(x, y)
    g16, logits = Algorithm1(small_snn(precision="bf16"))(x, y)
    assert g16.dtype == torch.float32 and logits.shape == (3, 10)
    assert g32.abs().sum() > 0
    cos = F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
    assert cos > 0.98, f"bf16 Alg. 1 gradient far from fp32 (cosine {cos:.3f})"


def test_bf16_spike_counts_are_exact_past_256():
    """Item 2: an always-firing last layer over T=1200 in chunks of 4 counts 1200 spikes
    under bf16 (a bf16 running sum stops at 256 + ... = 1024)."""
    snn = small_snn(T=1200, precision="bf16", chunk=4)
    snn.set_thresholds({n: -1e4 for n in snn.neuron_names})  # u > -1e4 at every step: always fires
    with torch.no_grad():
        snn.classifier.weight.zero_()
        snn.classifier.weight[:, 0] = 1.0  # every logit = the count of one neuron / T
        logits = snn(torch.rand(2, 3, 32, 32))
    assert torch.equal(logits, torch.ones_like(logits)), logits[0]


def test_rate_gradient_counts_in_fp32():
    """Item 2: the rate path's spike counts are fp32 sums (exact), whatever the precision."""
    from snnadv.gradients import RateGradient

    snn = small_snn(T=600, precision="bf16", chunk=4)
    snn.set_thresholds({n: -1e4 for n in snn.neuron_names})
    rates = RateGradient(snn).spike_rates(torch.rand(2, 3, 32, 32))
    for r in rates.values():
        assert r.dtype == torch.float32 and torch.equal(r, torch.ones_like(r))


def _first_layer_grad_retained(snn, x, y):
    """Today's Alg. 1 accumulation, independently: keep the first layer's whole output,
    retain its gradient, sum over time."""
    outs = []

    def keep(module, inputs, out):
        out.retain_grad()
        outs.append(out)

    handle = snn.first_conv.register_forward_hook(keep)
    try:
        loss = F.cross_entropy(snn(x), y, reduction="sum")
        loss.backward(inputs=outs)
    finally:
        handle.remove()
    return sum(o.grad.unflatten(0, (-1, x.shape[0])).sum(0) for o in outs)


def test_chunked_algorithm1_equals_the_retained_gradient():
    """Item 3: Alg. 1 through a hook, in chunks of 2 steps (T=6), gives the gradient of
    keeping the whole first-layer output and its retained grad, and computes no weight
    gradient."""
    x, y = binary_images()
    reference = _first_layer_grad_retained(small_snn(chunk=6), x, y)
    for chunk in (2, 6):
        snn = small_snn(chunk=chunk)
        acc, _ = Algorithm1(snn).first_layer_grad(x, y)
        torch.testing.assert_close(acc, reference, rtol=1e-5, atol=1e-6)
        assert all(p.grad is None for p in snn.parameters())
        assert snn._capture is None
    one_chunk, _ = Algorithm1(small_snn(chunk=6)).first_layer_grad(x, y)
    assert torch.equal(one_chunk, reference)  # one chunk: bit for bit


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs (unique storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_pooling_saves_no_spike_input_and_keeps_gradients():
    """Item 3: the SNN's average pooling keeps nothing for backward; its gradient is
    avg_pool2d's, bit for bit, in channels-last too."""
    snn = small_snn()
    pool = snn.pool1
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = (torch.rand(4, 2, 8, 16, 16) > 0.5).float()
        x = x.flatten(0, 1).contiguous(memory_format=fmt).unflatten(0, (4, 2)).requires_grad_(True)
        assert _saved_bytes(lambda: snn.layer(pool, x)) == 0
        assert _saved_bytes(lambda: F.avg_pool2d(x.flatten(0, 1), 2)) > 0  # what autograd would keep
        g = torch.randn(4, 2, 8, 8, 8)
        (ours,) = torch.autograd.grad(snn.layer(pool, x), x, g)
        (ref,) = torch.autograd.grad(F.avg_pool2d(x.flatten(0, 1), 2).unflatten(0, (4, 2)), x, g)
        assert torch.equal(ours, ref) and ours.stride() == ref.stride()


class CountSyncs(TorchDispatchMode):
    """Counts the calls that read a tensor's value back to the host."""

    SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCS:
            self.calls.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_no_host_syncs_in_a_training_step_or_a_forward():
    """Item 5: the fused forward and BPTT read no device value (thresholds and leaks are
    Python floats, Eq. 4's factors too): none per step, for every surrogate, both resets;
    after a threshold changes it is read once."""
    from snnadv.surrogates import make_surrogate

    x, y = binary_images(2)
    for surrogate, reset in (("stdb", "subtract"), ("linear", "zero"), ("fast-sigmoid", "subtract")):
        torch.manual_seed(0)
        snn = SNN(get_spec("tiny", 10), num_steps=6, leak=0.95, reset=reset, surrogate=make_surrogate(surrogate),
                  chunk_steps=3)
        snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
        snn(x)  # first use: the floats are read once
        with CountSyncs() as mode:
            snn.train()
            F.cross_entropy(snn(x), y).backward()
            snn.eval()
            with torch.no_grad():
                snn(x)
        assert mode.calls == [], f"{surrogate}: host reads {mode.calls}"
    snn.set_thresholds({n: 0.5 for n in snn.neuron_names})
    with CountSyncs() as mode, torch.no_grad():
        snn(x)
    assert len(mode.calls) == len(snn.neurons)  # each new threshold read once
    assert snn.thresholds() == {n: 0.5 for n in snn.neuron_names}


def test_threshold_and_leak_follow_load_state_dict():
    """The Python floats follow every way the buffers change (setters, load_state_dict)."""
    a, b = small_snn(), small_snn()
    b.set_thresholds({n: 0.7 for n in b.neuron_names})
    b.set_leak(0.9)
    a(torch.rand(1, 3, 32, 32))
    a.load_state_dict(b.state_dict())
    assert a.thresholds() == b.thresholds() and a.leak == b.leak == float(torch.tensor(0.9))


def test_encoder_with_a_cpu_generator_seeds_only_the_cpu_generator(monkeypatch):
    """Item 6: a CPU encoder draws the same frames as before (spikegen.rate after seeding
    with a seed drawn from its generator) but never calls torch.manual_seed, which
    reseeds every CUDA generator too; the global CPU RNG is left as it was."""
    from snntorch import spikegen

    p = torch.rand(2, 3, 4, 4)
    g = torch.Generator().manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7)).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expected = spikegen.rate(p, num_steps=5)
    state = torch.get_rng_state()

    def forbidden(*a, **k):
        raise AssertionError("torch.manual_seed reseeds every device")

    monkeypatch.setattr(torch, "manual_seed", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    assert torch.equal(rate(p, 5, g), expected)
    assert torch.equal(torch.get_rng_state(), state)


class LargestFloat(TorchDispatchMode):
    """The largest fp32 tensor any operation returns while active (elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_bf16_eq4_backward_streams_without_a_t_by_n_fp32_buffer(monkeypatch):
    """Item 6: the PyTorch scan's backward for bf16 gradients works in fp32 blocks of
    steps: no fp32 tensor of T x N, and the same bits as one block (every surrogate)."""
    from snnadv.kernels.scan import _LIFScan
    from snnadv.surrogates import make_surrogate

    T, N = 40, 50
    g = torch.Generator().manual_seed(0)
    cur = (0.6 * torch.randn(T, N, generator=g) + 0.35).bfloat16()
    grad = torch.randn(T, N, generator=g).bfloat16()
    mem0, dt0 = 0.7 * torch.randn(N, generator=g), torch.randint(1, 30, (N,), generator=g).float()

    def grads(name, hard):
        c, m = cur.clone().requires_grad_(True), mem0.clone().requires_grad_(True)
        spk, mem, _ = _LIFScan.apply(c, m, dt0, 0.9, 1.0, hard, make_surrogate(name))
        with LargestFloat() as mode:
            torch.autograd.backward([spk, mem], [grad, torch.ones(N)])
        return c.grad, m.grad, mode.largest

    for name, hard in (("stdb", False), ("stdb", True), ("linear", True), ("fast-sigmoid", False)):
        whole = grads(name, hard)
        monkeypatch.setattr(_LIFScan, "block_values", 4 * N)  # 4 steps per block
        blocks = grads(name, hard)
        monkeypatch.undo()
        assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1]), name
        assert whole[2] >= T * N and blocks[2] <= 4 * N, (name, whole[2], blocks[2])


def test_tf32_is_chosen_explicitly(monkeypatch):
    """Item 6: TF32 is off unless asked for (SNNADV_TF32=1), and the choice is returned to
    be recorded; the command line applies it at start-up."""
    from snnadv.runtime import tf32_policy

    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert tf32_policy() == {"tf32_matmul": False, "tf32_cudnn": False}
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setenv("SNNADV_TF32", "1")
        assert tf32_policy() == {"tf32_matmul": True, "tf32_cudnn": True} and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was
