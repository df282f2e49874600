"""Gradient estimators as modules (snnadv.estimator), HART, PDSG and the sharpness search.

Tiny models (the ``tiny`` architecture, T <= 6, two images): every test takes a few seconds
on a CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from snnadv.attacks.settings import resolve_paths
from snnadv.encoding import encoder_seed
from snnadv.errors import SnnadvError
from snnadv.estimator import EstimatorModule, vjp_loss
from snnadv.gradients import GRADIENTS, AttackSurrogate, make_gradient
from snnadv.paths.hart import HARTGradient, hart_spikes
from snnadv.paths.pdsg import PDSGGradient, pdsg_sigma, pdsg_spikes
from snnadv.paths.unrolled import lif_membranes
from snnadv.models import ANN, SNN, get_spec
from snnadv.sharpness import golden_section, search_sharpness
from snnadv.surrogates import ShiftedGaussian, Triangle

PATHS = ("alg1", "rate", "bptt-fast-sigmoid", "bptt-linear", "hart", "pdsg")


def small_snn(seed=0, T=4):
    """A tiny SNN with random weights and low thresholds, so that every layer spikes."""
    torch.manual_seed(seed)
    snn = SNN(get_spec("tiny", 10), num_steps=T, leak=0.95)
    snn.set_thresholds({n: 0.3 for n in snn.neuron_names})
    return snn.eval()


def batch(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def path_grad(snn, path, x, y, seed, loss=None, **options):
    """The path's own dJ/dx (cross-entropy, or ``loss``) on the draw of ``seed``."""
    source = make_gradient(snn, path, **({"loss": loss} if loss else {}), **options)
    with encoder_seed(snn, seed):
        grad, logits = source(x, y)
    return grad, logits


# --------------------------------------------------------------------------- the module
@pytest.mark.parametrize("path", PATHS)
def test_module_forward_is_the_snn_and_backward_the_path(path):
    snn, (x, y) = small_snn(), batch()
    module = EstimatorModule(snn, path, generator=torch.Generator().manual_seed(0))
    xr = x.clone().requires_grad_(True)
    logits = module(xr)
    (seed,) = module.last_seeds
    with torch.no_grad(), encoder_seed(snn, seed):
        assert torch.equal(logits, snn(x))  # the real model's outputs, on the draw of the seed
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr)
    want, _ = path_grad(snn, path, x, y, seed)
    assert want.abs().max() > 0
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-9)
    # any upstream gradient c: the path's vector-Jacobian product with c
    c = torch.randn(2, 10, generator=torch.Generator().manual_seed(5))
    logits = module(xr)
    (grad,) = torch.autograd.grad(logits, xr, c)
    want, _ = path_grad(snn, path, x, c, module.last_seeds[0], loss=vjp_loss)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-9)


def test_module_eot_is_the_mean_over_its_draws():
    snn, (x, y) = small_snn(), batch()
    module = EstimatorModule(snn, "rate", eot=3, generator=torch.Generator().manual_seed(0))
    assert module.name == "rate+eot3"
    xr = x.clone().requires_grad_(True)
    logits = module(xr)
    seeds = module.last_seeds
    assert len(set(seeds)) == 3
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr)
    with torch.no_grad():
        draws = []
        for s in seeds:
            with encoder_seed(snn, s):
                draws.append(snn(x))
    torch.testing.assert_close(logits, torch.stack(draws).mean(0))
    # the cotangent of the mean logits is the same for every draw: mean of the VJPs
    z = logits.detach().requires_grad_(True)
    (c,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)
    want = sum(path_grad(snn, "rate", x, c, s, loss=vjp_loss)[0] for s in seeds) / 3
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-9)


def test_module_ann_proxy_forward_snn_backward_ann():
    snn, (x, y) = small_snn(), batch()
    torch.manual_seed(3)
    ann = ANN(get_spec("tiny", 10)).eval()
    module = EstimatorModule(snn, "ann", proxy=ann)
    xr = x.clone().requires_grad_(True)
    logits = module(xr)
    with torch.no_grad(), encoder_seed(snn, module.last_seeds[0]):
        assert torch.equal(logits, snn(x))  # the SNN's outputs
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr)
    z = logits.detach().requires_grad_(True)
    (c,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)  # the loss's gradient at the SNN's logits
    xa = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(ann(xa), xa, c)  # ... through the ANN
    torch.testing.assert_close(grad, want)


def test_module_refuses_what_it_cannot_wrap():
    snn = small_snn()
    with pytest.raises(SnnadvError, match="does not take a loss"):
        EstimatorModule(snn, source=make_gradient(snn, "rate"))  # built with the cross-entropy
    with pytest.raises(SnnadvError, match="wraps an SNN"):
        EstimatorModule(ANN(get_spec("tiny", 10)), "alg1")
    module = EstimatorModule(snn, source=make_gradient(snn, "alg1", eot=2, loss=vjp_loss))
    assert module.eot == 2 and module.name == "alg1+eot2"


@pytest.mark.parametrize("path", ("alg1", "rate", "bptt-fast-sigmoid", "hart", "pdsg"))
def test_torchattacks_apgd_runs_on_the_estimator(path, monkeypatch):
    """APGD's input gradients are the estimator's (recomputed on the same draws)."""
    torchattacks = pytest.importorskip("torchattacks")
    snn, (x, _) = small_snn(), batch()
    with torch.no_grad():  # APGD attacks only what the model classifies right: make that class 3
        snn.classifier.weight[3] += 0.1
    y = torch.tensor([3, 3])
    module = EstimatorModule(snn, path)
    calls, depth = [], [0]
    real = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):  # records APGD's own calls (not the path's, nested inside)
        depth[0] += 1
        try:
            out = real(outputs, inputs, *args, **kwargs)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            x_in = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
            calls.append((x_in.detach().clone(), out[0].detach().clone(), list(module.last_seeds)))
        return out

    monkeypatch.setattr(torch.autograd, "grad", spy)
    eps = 8 / 255
    with torch.random.fork_rng():
        adv = torchattacks.APGD(module, norm="Linf", eps=eps, steps=2, n_restarts=1, seed=0, loss="ce")(x, y)
    monkeypatch.setattr(torch.autograd, "grad", real)
    assert len(calls) >= 2  # the first gradient and one step's
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    for x_adv, grad, (seed,) in calls:
        want, _ = path_grad(snn, path, x_adv, y, seed)  # APGD's loss: cross-entropy summed over the batch
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-9)


def test_torchattacks_square_and_apgd_t_run_on_the_estimator():
    torchattacks = pytest.importorskip("torchattacks")
    snn, (x, y) = small_snn(), batch()
    module = EstimatorModule(snn, "rate")
    assert not module.training  # the SNN's mode, which the library restores
    with torch.random.fork_rng():
        adv = torchattacks.Square(module, norm="Linf", eps=8 / 255, n_queries=3, seed=0, loss="margin")(x, y)
        adv_t = torchattacks.APGDT(module, norm="Linf", eps=8 / 255, steps=2, n_classes=10, seed=0)(x, y)
    for a in (adv, adv_t):
        assert (a - x).abs().max() <= 8 / 255 + 1e-6
    assert not module.training and not snn.training


# --------------------------------------------------------------------------- HART
def _hand_hart(I, spikes, leak, thr, gamma, mix, G):
    """HART's dJ/dI by hand (plain floats): the membrane without its path through time, the
    triangle, the time mixing.  I, spikes, G: [T][N] lists."""
    T, N = len(I), len(I[0])
    w = gamma * thr
    out = [[0.0] * N for _ in range(T)]
    for n in range(N):
        u_prev, s_prev, g = 0.0, 0.0, []
        for t in range(T):
            u = leak * u_prev + I[t][n] - thr * s_prev
            g.append(G[t][n] * max(0.0, w - abs(u - thr)) / (w * w))
            u_prev, s_prev = u, spikes[t][n]
        for t in range(T):
            out[t][n] = (1 - mix) * sum(g) / T + mix * g[t]
    return out


@pytest.mark.parametrize("mix", (0.0, 0.3, 1.0))
def test_hart_layer_known_answer(mix):
    leak, thr, gamma = 0.5, 1.0, 1.5
    I = [[0.8, 0.3, 1.4], [0.6, 1.2, -0.2], [0.9, 0.1, 0.7], [0.2, 0.9, 1.1]]
    # the spikes the LIF makes (Eq. 3, subtract reset)
    cur = torch.tensor(I).unsqueeze(1)  # [T, B=1, N]
    sp = []
    mem, prev = torch.zeros(3), torch.zeros(3)
    for t in range(4):
        mem = leak * mem + cur[t, 0] - thr * prev
        prev = (mem > thr).float()
        sp.append(prev.tolist())
    spk = torch.tensor(sp).unsqueeze(1)
    G = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-2.0, 1.0, 1.0], [0.75, -0.3, 0.6]]).unsqueeze(1)
    c = cur.clone().requires_grad_(True)
    out = hart_spikes(c, spk, torch.zeros(1, 3), leak, thr, reset="subtract", gamma=gamma, mix=mix)
    assert torch.equal(out, spk)  # the forward is the observed spikes
    (grad,) = torch.autograd.grad(out, c, G)
    want = torch.tensor(_hand_hart(I, sp, leak, thr, gamma, mix, G[:, 0].tolist())).unsqueeze(1)
    torch.testing.assert_close(grad, want)
    if mix == 0.0:  # HART as published: one gradient for every step of a neuron
        assert torch.allclose(grad, grad.mean(0, keepdim=True).expand_as(grad))


def test_triangle_surrogate_values():
    tri = Triangle(gamma=0.5)  # w = 0.5 * thr = 1.0 at thr 2
    u = torch.tensor([2.0, 2.5, 1.0, 3.5, 0.0])
    torch.testing.assert_close(tri.grad(u, 2.0, None), torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0]))


def test_hart_path_on_an_snn():
    snn, (x, y) = small_snn(), batch()
    g0, l0 = path_grad(snn, "hart", x, y, 7)
    g1, _ = path_grad(snn, "hart", x, y, 7, mix=1.0)
    g0b, _ = path_grad(snn, "hart", x, y, 7, gamma=1.0, mix=0.0)
    with torch.no_grad(), encoder_seed(snn, 7):
        assert torch.equal(l0, snn(x))
    assert torch.equal(g0, g0b)  # the defaults: gamma 1, mix 0
    assert g0.abs().max() > 0 and g1.abs().max() > 0 and not torch.allclose(g0, g1)
    assert snn.mode == "fused" and snn.chunk_steps is None  # settings restored
    assert all("multistep" not in vars(n) for n in snn.neurons)
    with pytest.raises(SnnadvError, match="mix"):
        HARTGradient(snn, mix=1.5)


# --------------------------------------------------------------------------- PDSG
def test_pdsg_sigma_is_the_running_std_per_channel():
    torch.manual_seed(0)
    u = torch.randn(3, 4, 2, 5, 5) * torch.tensor([0.5, 2.0]).view(1, 1, 2, 1, 1)  # [T, B, C, H, W]
    sigma = pdsg_sigma(u)
    assert sigma.shape == (3, 1, 2, 1, 1)
    for t in range(3):
        for ch in range(2):
            torch.testing.assert_close(sigma[t, 0, ch, 0, 0], u[: t + 1, :, ch].std())
    lin = torch.randn(2, 3, 6)  # [T, B, F]: per feature
    torch.testing.assert_close(pdsg_sigma(lin)[1, 0], lin[:, :, :].std(dim=(0, 1)))
    assert torch.equal(pdsg_sigma(torch.zeros(2, 3, 4)), torch.ones(2, 1, 4))  # no spread: width 1


def _gauss(x, s):
    return math.exp(-((x - s / 2) / (math.sqrt(2) * s)) ** 2) / (math.sqrt(2 * math.pi) * s)


def test_pdsg_layer_known_answer():
    """Membranes set by the input currents; the surrogate is the shifted Gaussian of width std(u)."""
    leak, thr = 0.5, 1.0
    I = torch.tensor([[0.2, 0.9, 1.3, 0.6], [0.4, 0.1, 0.8, 1.5]]).unsqueeze(-1)  # [T=2, B=4, F=1]
    u0 = I[0, :, 0].tolist()  # u[0] = I[0] (rest), no spike before
    s0 = [float(v > thr) for v in u0]
    u1 = [leak * a + b - thr * s for a, s, b in zip(u0, s0, I[1, :, 0].tolist())]
    spk = torch.tensor([s0, [float(v > thr) for v in u1]]).unsqueeze(-1)
    sig0 = torch.tensor(u0).std().item()
    sig1 = torch.tensor(u0 + u1).std().item()  # time-accumulated: u[0..1]
    c = I.clone().requires_grad_(True)
    # upstream gradient on step 0 only: dJ/dI[0] = G h(u[0]; sigma_0), dJ/dI[1] = 0
    G = torch.zeros(2, 4, 1)
    G[0] = torch.tensor([1.0, -2.0, 0.5, 3.0]).unsqueeze(-1)
    out = pdsg_spikes(c, spk, torch.zeros(4, 1), leak, thr, "subtract")
    assert torch.equal(out, spk)
    (grad,) = torch.autograd.grad(out, c, G)
    want0 = [g * _gauss(u - thr, sig0) for g, u in zip(G[0, :, 0].tolist(), u0)]
    torch.testing.assert_close(grad[0, :, 0], torch.tensor(want0))
    assert torch.equal(grad[1], torch.zeros(4, 1))
    # on step 1 only: dJ/dI[1] = G h(u[1]; sigma_1), dJ/dI[0] = leak * that (the membrane's path)
    G = torch.zeros(2, 4, 1)
    G[1] = 1.0
    out = pdsg_spikes(c, spk, torch.zeros(4, 1), leak, thr, "subtract")
    (grad,) = torch.autograd.grad(out, c, G)
    want1 = torch.tensor([_gauss(u - thr, sig1) for u in u1])
    torch.testing.assert_close(grad[1, :, 0], want1)
    torch.testing.assert_close(grad[0, :, 0], leak * want1)


def test_pdsg_with_a_fixed_width_is_bptt_with_that_surrogate():
    """The unrolled recurrence's BPTT equals the fused scan's (same draws)."""
    snn, (x, y) = small_snn(), batch()
    a, la = path_grad(snn, "pdsg", x, y, 4, sigma=0.4)
    with encoder_seed(snn, 4):
        b, lb = AttackSurrogate(snn, ShiftedGaussian(0.4))(x, y)
    assert torch.equal(la, lb)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    adaptive, _ = path_grad(snn, "pdsg", x, y, 4)
    assert adaptive.abs().max() > 0 and not torch.allclose(adaptive, a)
    with pytest.raises(SnnadvError, match="sigma"):
        PDSGGradient(snn, sigma=0.0)


def test_new_paths_registered_and_opt_in():
    snn = small_snn()
    assert {"hart", "pdsg"} <= set(GRADIENTS)
    assert isinstance(make_gradient(snn, "hart", gamma=0.5, mix=0.2), HARTGradient)
    assert make_gradient(snn, "hart", gamma=0.5).gamma == 0.5
    assert isinstance(make_gradient(snn, "pdsg", slope=3.0), PDSGGradient)  # other options ignored
    assert not {"hart", "pdsg"} & set(resolve_paths(snn, "all"))
    assert resolve_paths(snn, "hart,pdsg") == ["hart", "pdsg"]


def test_lif_membranes_match_the_scan():
    snn, (x, _) = small_snn(), batch()
    neuron = snn.neurons[2]  # the linear layer's
    cur = torch.randn(5, 2, 64) * 0.4
    neuron.reset_state()
    spk = neuron.multistep(cur)
    u = lif_membranes(cur, spk, torch.zeros(2, 64), neuron.leak, neuron.thr, "subtract")
    assert torch.equal(torch.stack(u) > neuron.thr, spk.bool())


# --------------------------------------------------------------------------- sharpness
def test_golden_section_finds_a_known_maximum():
    x, v, seen = golden_section(lambda t: -(t - 1.3) ** 2, -2.0, 4.0, 25)
    assert abs(x - 1.3) < 1e-4 and len(seen) == 27


def test_search_sharpness_known_answer():
    best = 7.0
    result = search_sharpness(None, None, None, lo=0.5, hi=100.0, iters=20,
                              objective=lambda k: -(math.log(k) - math.log(best)) ** 2)
    assert abs(result.best / best - 1) < 1e-3
    assert len(result.evaluations) == 22 and all(0.5 <= k <= 100 for k, _ in result.evaluations)
    assert result.value == max(v for _, v in result.evaluations)


def test_search_sharpness_on_an_snn():
    snn, (x, y) = small_snn(), batch()
    result = search_sharpness(snn, x, y, "bptt-fast-sigmoid", lo=1.0, hi=30.0, iters=1)
    assert len(result.evaluations) == 3 and 1.0 <= result.best <= 30.0
    assert all(math.isfinite(v) and v > 0 for _, v in result.evaluations)
    again = search_sharpness(snn, x, y, "bptt-fast-sigmoid", lo=1.0, hi=30.0, iters=1)
    assert again.evaluations == result.evaluations  # seeded draws: a deterministic objective
