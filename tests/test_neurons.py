"""Spiking neurons: Eq. 3 dynamics, the Eq. 7 spike rate, the Eq. 4 and linear
surrogates, the fused multi-step scan against the single-step reference, and
state resets reaching nested neurons."""

from __future__ import annotations

import math

import pytest
import snntorch
import snntorch.utils
import torch

from snnadv.errors import SnnadvError
from snnadv.models import SNN, get_spec
from snnadv.neurons import DT_INIT, LIF, TimeDropout, eq7_spike_rate, reset_state
from snnadv.surrogates import FastSigmoid, LinearSurrogate, SpikeTime, make_surrogate

# -- dynamics -------------------------------------------------------------------------------


@pytest.mark.parametrize("leak,reset", [(1.0, "subtract"), (0.9, "subtract"), (0.9, "zero")])
def test_matches_snntorch_leaky_spike_for_spike(leak, reset):
    """IF = LIF(leak=1.0) is snnTorch's Leaky(beta=1, subtract) over 100 random steps."""
    torch.manual_seed(0)
    x = torch.rand(100, 64) * 0.8 - 0.1
    ref = snntorch.Leaky(beta=leak, threshold=1.0, reset_mechanism=reset)
    lif = LIF(leak=leak, threshold=1.0, reset=reset)
    mem_ref = ref.init_leaky()
    spk_ref, spk_ours, total = [], [], 0
    for t in range(100):
        s1, mem_ref = ref(x[t], mem_ref)
        s2, mem = lif(x[t])
        assert torch.equal(s1, s2), f"step {t}"
        torch.testing.assert_close(mem, mem_ref, rtol=0, atol=1e-6)
        spk_ref.append(s1)
        spk_ours.append(s2)
        total += int(s1.sum())
    assert 500 < total < 100 * 64 - 500  # spikes happen, but not everywhere
    # the fused path too
    lif.reset_state()
    assert torch.equal(lif.multistep(x.clone()), torch.stack(spk_ref))
    torch.testing.assert_close(lif.mem, mem_ref, rtol=0, atol=1e-5)


def test_if_soft_reset_fires_at_the_input_rate():
    """IF with soft reset and a constant input V < thr fires at rate V / thr (rate coding)."""
    rates = torch.tensor([0.0, 0.013, 0.1, 0.25, 0.37, 0.5, 0.77, 0.999])
    T = 1000
    lif = LIF(leak=1.0, threshold=1.0)
    spk = lif.multistep(rates.expand(T, -1).clone())
    measured = spk.mean(0)
    assert (measured - rates).abs().max() <= 1.0 / T + 1e-6


def _spike_times(col: torch.Tensor) -> list[int]:
    return torch.nonzero(col).flatten().tolist()


LEAKS = [0.999, 0.99, 0.95, 0.9, 0.8]
RATIOS = [round(0.05 * k, 2) for k in range(1, 19)]  # V_mem / V_th from 0.05 to 0.9


def _measured(leak: float, T: int = 600) -> torch.Tensor:
    """Spikes [T, len(RATIOS)] of a hard-reset LIF fed constant V_mem = ratio * V_th."""
    lif = LIF(leak=leak, threshold=1.0, reset="zero")
    current = torch.tensor(RATIOS).expand(T, -1).clone()
    return lif.multistep(current)


def test_eq7_spike_rate_with_hard_reset():
    """Eq. 7: a constant input reaches V_th after n = log(r lam - (r-1)) / log(lam) steps.

    With a reset to zero the membrane restarts the same geometric progression after
    each spike, so spikes are periodic with period ceil(n) (the first integer step
    at which u exceeds V_th), and the measured rate 1/ceil(n) is Eq. 7's 1/n up to
    the discretisation: 0 <= 1/n - 1/ceil(n) < (1/n)^2.
    """
    checked = 0
    for leak in LEAKS:
        spikes = _measured(leak)
        T = spikes.shape[0]
        for j, ratio in enumerate(RATIOS):
            rate = eq7_spike_rate(leak, ratio)
            times = _spike_times(spikes[:, j])
            r = 1.0 / ratio
            if r * (1.0 - leak) > 1.0 + 1e-3:  # the membrane saturates below V_th
                assert rate == 0.0
                assert times == [], (leak, ratio)
                continue
            if rate == 0.0 or abs(r * (1.0 - leak) - 1.0) <= 1e-3:
                continue  # on the edge: u -> V_th exactly, float rounding decides
            n = 1.0 / rate
            # n from Eq. 7 solves V_mem (1 - lam^n) / (1 - lam) = V_th
            assert ratio * (1 - leak ** n) / (1 - leak) == pytest.approx(1.0, rel=1e-9)
            if abs(n - round(n)) < 1e-3:
                continue  # u hits V_th exactly at an integer step: float rounding decides
            period = math.ceil(n)
            assert len(times) >= 2, (leak, ratio)
            assert times[0] == period - 1, (leak, ratio, n, times[:3])
            assert all(b - a == period for a, b in zip(times, times[1:])), (leak, ratio, n)
            measured = 1.0 / period
            assert measured <= rate
            assert rate - measured < rate ** 2
            assert len(times) == T // period
            checked += 1
    assert checked >= 60


def test_spike_rate_decreases_with_leak():
    """Smaller lambda (more leak) -> fewer spikes, at every input level (Fig. 6a).

    Periods are whole steps, so neighbouring leaks can tie; the counts never rise."""
    counts = torch.stack([_measured(leak).sum(0) for leak in LEAKS])  # [leaks, ratios]
    assert (counts[1:] <= counts[:-1]).all()
    total = counts.sum(1)
    assert (total[1:] < total[:-1]).all()  # strictly fewer spikes in all at each step down
    assert (counts[-1, :8] < counts[0, :8]).all()  # weak inputs: strictly fewer (strong ones can tie)
    eq7 = torch.tensor([[eq7_spike_rate(l, r) for r in RATIOS] for l in LEAKS])
    assert (eq7[1:] <= eq7[:-1]).all() and (eq7[-1] < eq7[0]).all()


def test_eq7_edge_cases():
    assert eq7_spike_rate(1.0, 0.3) == pytest.approx(0.3)
    assert eq7_spike_rate(1.0, 1.5) == 1.0
    assert eq7_spike_rate(0.9, 0.05) == 0.0  # never reaches threshold
    # hand value: lam = 0.9, r = 2 -> 1/n = log 0.9 / log 0.8
    assert eq7_spike_rate(0.9, 0.5) == pytest.approx(math.log(0.9) / math.log(0.8))


# -- Eq. 4 surrogate --------------------------------------------------------------------------

# constant-ish inputs chosen so that the neuron (leak 1, thr 1, soft reset) fires at
# steps 2, 5, 6 and 7 and nowhere else
EQ4_INPUT = [0.3, 0.3, 0.6, 0.1, 0.2, 1.5, 2.0, 0.0, 0.0]
EQ4_SPIKES = [2, 5, 6, 7]


def _expected_dt(spike_steps, T, dt_init):
    """dt at each step: dt_init + t before the first spike, then steps since the last one."""
    out, last = [], None
    for t in range(T):
        out.append(dt_init + t if last is None else t - last)
        if t in spike_steps:
            last = t
    return out


def _single_step_jacobian(lif: LIF, inputs: list[float]):
    """Spikes and d s[t] / d I[t'] from T single-step calls (each I[t] its own leaf)."""
    lif.reset_state()
    xs = [torch.tensor([v], requires_grad=True) for v in inputs]
    spikes = [lif(x)[0] for x in xs]
    T = len(inputs)
    jac = torch.zeros(T, T)
    for t in range(T):
        grads = torch.autograd.grad(spikes[t].sum(), xs[: t + 1], retain_graph=True, allow_unused=True)
        for tp, g in enumerate(grads):
            jac[t, tp] = 0.0 if g is None else float(g)
    return torch.cat(spikes).detach(), jac


def _multistep_jacobian(lif: LIF, inputs: list[float]):
    lif.reset_state()
    x = torch.tensor(inputs).unsqueeze(1).requires_grad_(True)  # [T, 1]
    spk = lif.multistep(x)
    T = len(inputs)
    jac = torch.zeros(T, T)
    for t in range(T):
        (g,) = torch.autograd.grad(spk[t].sum(), x, retain_graph=True)
        jac[t] = g[:, 0]
    return spk[:, 0].detach(), jac


@pytest.mark.parametrize("path", ["single-step", "multistep"])
def test_eq4_gradient_uses_time_since_last_spike(path):
    alpha, beta, dt_init = 0.3, 0.1, 5.0
    lif = LIF(leak=1.0, threshold=1.0, surrogate=SpikeTime(alpha, beta), dt_init=dt_init)
    run = _single_step_jacobian if path == "single-step" else _multistep_jacobian
    spikes, jac = run(lif, EQ4_INPUT)
    assert _spike_times(spikes) == EQ4_SPIKES
    dts = _expected_dt(EQ4_SPIKES, len(EQ4_INPUT), dt_init)
    assert dts == [5, 6, 7, 1, 2, 3, 1, 1, 1]
    expected = torch.tensor([alpha * math.exp(-beta * dt) for dt in dts])
    torch.testing.assert_close(torch.diagonal(jac), expected, rtol=1e-6, atol=0)
    # the state after the run: dt = 2 (last spike at step 7 of 9)
    assert float(lif.dt) == 2.0


def test_eq4_default_parameters_before_the_first_spike():
    """alpha = 0.3, beta = 0.01, dt = 1000 + t before a neuron's first spike."""
    lif = LIF(leak=1.0)
    assert isinstance(lif.surrogate, SpikeTime)
    assert (lif.surrogate.alpha, lif.surrogate.beta, lif.dt_init) == (0.3, 0.01, DT_INIT) == (0.3, 0.01, 1000.0)
    spikes, jac = _single_step_jacobian(lif, [0.1, 0.1, 0.1])
    assert spikes.sum() == 0
    expected = torch.tensor([0.3 * math.exp(-0.01 * (1000 + t)) for t in range(3)])
    torch.testing.assert_close(torch.diagonal(jac), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("path", ["single-step", "multistep"])
def test_bptt_through_the_membrane(reset, path):
    """d s[t] / d I[t'] = sg[t] * prod_{k=t'}^{t-1} lam (1 - s[k] if hard reset): the
    reset carries no gradient, the leak does."""
    leak, alpha, beta, dt_init = 0.9, 0.3, 0.1, 5.0
    inputs = [0.5, 0.7, 0.2, 0.9, 0.1, 0.8, 0.6, 0.3, 1.2, 0.0]
    lif = LIF(leak=leak, threshold=1.0, reset=reset, surrogate=SpikeTime(alpha, beta), dt_init=dt_init)
    run = _single_step_jacobian if path == "single-step" else _multistep_jacobian
    spikes, jac = run(lif, inputs)
    s = spikes.tolist()
    assert 2 <= sum(s) <= 7, s
    dts = _expected_dt([t for t, v in enumerate(s) if v], len(inputs), dt_init)
    expected = torch.zeros_like(jac)
    for t in range(len(inputs)):
        sg = alpha * math.exp(-beta * dts[t])
        for tp in range(t + 1):
            factor = 1.0
            for k in range(tp, t):
                factor *= leak * ((1.0 - s[k]) if reset == "zero" else 1.0)
            expected[t, tp] = sg * factor
    torch.testing.assert_close(jac, expected, rtol=1e-5, atol=1e-8)


# -- linear and fast-sigmoid surrogates -------------------------------------------------------

U = [-1.0, 0.0, 0.5, 1.0, 1.5, 1.9, 2.0, 2.1, 2.5, 3.0, 3.9, 4.5]


def _grad_at(lif: LIF, u: list[float], multistep: bool) -> torch.Tensor:
    """ds/du for one step from rest (so u = I)."""
    lif.reset_state()
    x = torch.tensor(u, requires_grad=True)
    spk = lif.multistep(x.unsqueeze(0))[0] if multistep else lif(x)[0]
    assert torch.equal(spk, (x > 2.0).float())
    spk.sum().backward()
    return x.grad


@pytest.mark.parametrize("multistep", [False, True])
def test_linear_surrogate(multistep):
    gamma, thr = 0.3, 2.0
    lif = LIF(leak=0.9, threshold=thr, surrogate=LinearSurrogate(gamma))
    expected = torch.tensor([gamma * max(0.0, 1.0 - abs(u / thr - 1.0)) for u in U])
    got = _grad_at(lif, U, multistep)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert got[6] == pytest.approx(gamma)  # the peak, at the threshold
    assert got[0] == 0 and got[-1] == 0  # outside (0, 2 thr)


@pytest.mark.parametrize("multistep", [False, True])
def test_fast_sigmoid_surrogate(multistep):
    slope, thr = 5.0, 2.0
    lif = LIF(leak=0.9, threshold=thr, surrogate=FastSigmoid(slope))
    expected = torch.tensor([1.0 / (1.0 + slope * abs(u - thr)) ** 2 for u in U])
    torch.testing.assert_close(_grad_at(lif, U, multistep), expected, rtol=1e-6, atol=1e-7)


def test_make_surrogate_by_name():
    s = make_surrogate("stdb", alpha=0.5, beta=0.2, gamma=9.0, slope=3.0)
    assert isinstance(s, SpikeTime) and (s.alpha, s.beta) == (0.5, 0.2)
    s = make_surrogate("linear", alpha=0.5, gamma=0.7)
    assert isinstance(s, LinearSurrogate) and s.gamma == 0.7
    assert isinstance(make_surrogate("fast-sigmoid"), FastSigmoid)
    with pytest.raises(SnnadvError):
        make_surrogate("atan")


# -- fused multistep vs step by step ----------------------------------------------------------


def _run_steps(lif: LIF, cur: torch.Tensor):
    lif.reset_state()
    spk = torch.stack([lif(cur[t])[0] for t in range(cur.shape[0])])
    return spk, lif.mem, lif.dt


def _run_chunks(lif: LIF, cur: torch.Tensor, bounds):
    lif.reset_state()
    parts = [lif.multistep(cur[a:b]) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts), lif.mem, lif.dt


@pytest.mark.parametrize("leak", [1.0, 0.9])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("surrogate", ["stdb", "linear", "fast-sigmoid"])
def test_multistep_equals_step_by_step(surrogate, reset, leak):
    torch.manual_seed(5)
    T = 24
    current = torch.randn(T, 3, 10) * 0.8 + 0.35
    w_spk, w_mem = torch.randn(T, 3, 10), torch.randn(3, 10)
    # stdb with a small dt_init so that gradients before the first spike are not ~0
    sur = make_surrogate(surrogate, alpha=0.3, beta=0.05)
    runs = {}
    for name, fn in {"steps": _run_steps,
                     "fused": lambda l, c: _run_chunks(l, c, [0, T]),
                     "chunked": lambda l, c: _run_chunks(l, c, [0, 5, 13, 14, T])}.items():
        lif = LIF(leak=leak, threshold=1.0, reset=reset, surrogate=sur, dt_init=20.0)
        cur = current.clone().requires_grad_(True)
        spk, mem, dt = fn(lif, cur)
        ((spk * w_spk).sum() + (mem * w_mem).sum()).backward()
        runs[name] = (spk.detach(), mem.detach(), dt.clone(), cur.grad)
    spk0, mem0, dt0, g0 = runs["steps"]
    n = spk0.sum()
    assert 0.1 * spk0.numel() < n < 0.9 * spk0.numel()
    assert g0.abs().max() > 1e-3
    for name in ("fused", "chunked"):
        spk, mem, dt, g = runs[name]
        assert torch.equal(spk, spk0), name
        torch.testing.assert_close(mem, mem0, rtol=0, atol=1e-6)
        assert torch.equal(dt, dt0), name
        torch.testing.assert_close(g, g0, rtol=1e-6, atol=1e-6)


def test_multistep_keeps_channels_last_layout_and_values():
    """Convolution outputs in channels-last memory go through the scan without a copy
    into NCHW: same spikes, state and gradients as the contiguous input, same strides out."""
    torch.manual_seed(3)
    T, B, C, H, W = 5, 2, 4, 3, 3
    base = torch.randn(T, B, C, H, W) * 0.8 + 0.4
    cl = base.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # NHWC memory, NCHW shape
    assert not cl.is_contiguous() and torch.equal(cl, base)
    out = {}
    for name, cur in (("nchw", base), ("nhwc", cl)):
        lif = LIF(leak=0.9, threshold=1.0, surrogate=make_surrogate("stdb", beta=0.05), dt_init=20.0)
        lif.reset_state()
        x = cur.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        parts = [lif.multistep(x[:2]), lif.multistep(x[2:])]
        if name == "nhwc":
            assert [p.stride() for p in parts] == [cur[:2].stride(), cur[2:].stride()]
        spk = torch.cat(parts)
        (spk * torch.arange(spk.numel()).view(spk.shape).float().sin()).sum().backward()
        out[name] = (spk, lif.mem, lif.dt, x.grad)
        if name == "nhwc":
            assert x.grad.stride() == cur.stride()
    for a, b in zip(out["nchw"], out["nhwc"]):
        assert torch.equal(a, b)


def test_multistep_spike_time_surrogate_over_long_runs():
    """The scan carries Eq. 4's ds/du as a running product (x exp(-beta) per step); over
    400 steps from dt_init = 1000 it stays within fp32 tolerance of exp(-beta * dt)."""
    torch.manual_seed(4)
    T = 400
    current = torch.rand(T, 64) * 0.3  # sparse firing: long silent stretches
    sur = make_surrogate("stdb")
    grads = []
    for fn in (_run_steps, lambda l, c: _run_chunks(l, c, [0, 150, T])):
        lif = LIF(leak=0.99, threshold=1.0, surrogate=sur)
        cur = current.clone().requires_grad_(True)
        spk, _, _ = fn(lif, cur)
        spk.sum().backward()
        grads.append(cur.grad)
    assert grads[0].abs().max() > 1e-2
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-9)


def test_multistep_gradient_reaches_the_carried_state():
    """With chunks, the gradient of a later chunk flows into the earlier chunk's input."""
    lif = LIF(leak=0.9, threshold=1.0, surrogate=LinearSurrogate(0.3))
    cur = (torch.rand(6, 1, 5) * 0.6).requires_grad_(True)
    lif.multistep(cur[:3])
    later = lif.multistep(cur[3:])
    (later.sum() + lif.mem.sum()).backward()
    assert cur.grad[:3].abs().sum() > 0


# -- state --------------------------------------------------------------------------------------


def test_reset_state_reaches_neurons_nested_in_residual_blocks():
    torch.manual_seed(0)
    snn = SNN(get_spec("resnet20", 10), num_steps=2).train()
    snn(torch.rand(1, 3, 32, 32))
    lifs = {n: m for n, m in snn.named_modules() if isinstance(m, LIF)}
    drops = [m for m in snn.modules() if isinstance(m, TimeDropout)]
    nested = [n for n in lifs if "." in n]
    assert len(nested) == 18 and len(drops) == 11
    assert all(m.mem.numel() > 0 and m.dt.numel() > 0 for m in lifs.values())
    assert all(d.mask is not None for d in drops)
    # snnTorch's own reset does not clear these neurons (nor the dropout masks)
    snntorch.utils.reset(snn)
    assert all(lifs[n].mem.numel() > 0 for n in nested)
    reset_state(snn)
    assert all(m.mem.numel() == 0 and m.dt.numel() == 0 for m in lifs.values())
    assert all(d.mask is None for d in drops)


def test_reset_state_also_resets_plain_snntorch_neurons():
    net = torch.nn.Sequential(torch.nn.Sequential(snntorch.Leaky(beta=0.5)))
    leaky = net[0][0]
    leaky(torch.ones(4))
    assert leaky.mem.abs().sum() > 0
    reset_state(net)
    assert leaky.mem.abs().sum() == 0


def test_state_carries_between_forward_calls_until_reset():
    lif = LIF(leak=1.0, threshold=1.0)
    x = torch.full((1,), 0.6)
    assert lif(x)[0].item() == 0.0
    assert lif(x)[0].item() == 1.0  # 1.2 > 1 on the second call
    lif.reset_state()
    assert lif(x)[0].item() == 0.0


def test_time_dropout_mask_is_fixed_over_time():
    torch.manual_seed(0)
    d = TimeDropout(0.5).train()
    x = torch.ones(7, 4, 100)
    y = d(x)
    assert torch.equal(y[0], y[-1])
    assert set(y.unique().tolist()) == {0.0, 2.0}
    again = d(torch.ones(1, 4, 100))  # step by step: the same mask until reset
    assert torch.equal(again[0], y[0])
    d.reset_state()
    assert not torch.equal(d(x)[0], y[0])
    d.eval()
    assert torch.equal(d(x), x)


@pytest.mark.parametrize("leak", [0.0, -0.1, 1.5, 1.0001])
def test_invalid_leak_is_an_error(leak):
    with pytest.raises(SnnadvError):
        LIF(leak=leak)
    snn = SNN(get_spec("tiny", 10))
    with pytest.raises(SnnadvError):
        snn.set_leak(leak)
    with pytest.raises(SnnadvError):
        SNN(get_spec("tiny", 10), leak=leak)


def test_set_leak_changes_every_neuron():
    snn = SNN(get_spec("resnet20", 10))
    snn.set_leak(0.95)
    assert [m.leak for m in snn.neurons] == pytest.approx([0.95] * 20)
    assert snn.leak == pytest.approx(0.95)


def test_unknown_reset_is_an_error():
    with pytest.raises(SnnadvError):
        LIF(reset="bounce")
