"""Where an attack's input gradient comes from (paper Sec. 3.3, Eq. 5-6, Algorithm 1).

An attack (:mod:`snnadv.attacks`) asks a *gradient source* for dJ/dx at the current
images and uses only that; swapping the source changes how the gradient is
obtained, never the attack.  A source is a callable

    source(images [B, C, H, W] in [0, 1], labels [B]) -> (gradient [B, C, H, W], logits)

with the loss J = cross-entropy(model(images), labels).  Sources:

* :class:`Autograd`: ordinary backpropagation.  For an ANN this is the exact
  gradient.  For an SNN it is full BPTT through the surrogate gradients *and*
  through the encoder, whose Bernoulli sampling gets a straight-through (identity)
  gradient: BPDA (Athalye et al. 2018).  Reports call it ``bptt``.
* :class:`Algorithm1`: the paper's SNN-crafted gradient.  Run the SNN on fresh
  encoder spikes, accumulate dJ/d(first-layer output) over all timesteps through
  the surrogate gradients, and map it back to the input with the transposed
  first-layer convolution (Eq. 6: convolution with the 180-degree rotated kernel).
  Reports call it ``alg1``.

Note.  Because the first layer is linear and the encoder's straight-through
gradient is the identity per frame, sum_t conv^T(g_t) = conv^T(sum_t g_t): Algorithm 1
and straight-through BPTT give the same direction (they differ only through a
positive factor, e.g. 2 for the signed [-1, 1] encoder).  ``tests/test_attacks.py``
checks Algorithm 1 against an independent ``torch.nn.grad.conv2d_input``.

Every call draws fresh encoder spikes, so SNN gradients are stochastic: pass a
``generator`` to make them reproducible; :class:`EOT` averages M draws.

More gradient paths for SNNs (adaptive attacks, :mod:`snnadv.attacks.suite`):

* :class:`AttackSurrogate` (``bptt-stdb``, ``bptt-linear``, ``bptt-fast-sigmoid``):
  straight-through BPTT with a surrogate chosen *at attack time*, independently of
  the one the model was trained with (restored after every call).  A surrogate
  only shapes the backward pass, so the forward (and the model) is unchanged.
* :class:`RateGradient` (``rate``): back-propagation through time-averaged spike
  rates (BPTR, Ding et al. 2022; RGA, Bu et al. 2023).  The real SNN is run
  forward on fresh spikes and the rate ``r_l = (1/T) sum_t s_l[t]`` of every
  spiking layer is recorded.  Synaptic layers (conv, linear, pooling) are linear
  and bias-free, so the time-averaged input current of layer l is exactly
  ``c_l = W_l r_{l-1}``.  An IF neuron fed a constant current c fires at rate
  ``r = clip(c / thr, 0, 1)``, a ReLU of slope 1/thr, so the backward pass uses

      d r_l / d c_l  ~=  1[r_l > 0] / thr_l          (elementwise)

  with the *observed* rate deciding the mask.  The gradient is then one backward
  pass through a single "rate frame": dJ/dx = e'(x) W_1^T D_1 W_2^T D_2 ... dJ/dz,
  with D_l = diag(1[r_l > 0] / thr_l) and e'(x) the encoder's straight-through
  derivative (identity; 2 for the signed encoder; times the gain).  Forward values
  are the observed rates, so the logits it returns are exactly the SNN's logits
  of that draw (the readout after the last spiking layer is linear).  This equals
  applying the ReLU-like derivative to the time-summed gradient of BPTT, up to the
  factor T; it ignores the leak (Eq. 7 is not linear) and rate saturation at 1.
* ``ann``: the ANN the SNN was converted from, as a proxy (autograd through it;
  :class:`Autograd` on that model, named ``ann``).  Same architecture and
  (before fine-tuning) the same weights: a transfer attack that sees through the
  spiking non-linearity entirely.  :mod:`snnadv.adaptive` finds it through the
  checkpoint's parent chain.

* :class:`HARTGradient` (``hart``): HART (Hao et al. ICLR 2024): per layer, the
  membrane's path through time cut, a triangle surrogate of width gamma * thr, and the
  input current's gradient mixed between its time average (rate) and each step's own
  (temporal) with ``mix``.
* :class:`PDSGGradient` (``pdsg``): PDSG (Lun et al. CVPR 2025): BPTT with a Gaussian
  surrogate whose width is the standard deviation of the layer's membrane potentials.

Every path is registered by name (:data:`snnadv.registry.GRADIENTS`, a factory
``(model, **options) -> source`` per name, ``bptt-<surrogate>`` for every registered
surrogate); :func:`make_gradient` builds one by name.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .encoding import normalize, quantize
from .errors import SnnadvError
from .models import SNN, record_spikes
from .models.ann import BasicBlock
from .neurons import Neuron
from .registry import GRADIENTS, SURROGATES, register_gradient
from .surrogates import ShiftedGaussian, Triangle, make_surrogate


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="sum")


class Autograd:
    """dJ/dx by backpropagation (for SNNs: BPTT + straight-through encoder)."""

    name = "bptt"

    def __init__(self, model: nn.Module, loss=_loss, name: str | None = None):
        self.model, self.loss = model, loss
        if name is not None:
            self.name = name

    def __call__(self, images, labels):
        x = images.detach().clone().requires_grad_(True)
        logits = self.model(x)
        (grad,) = torch.autograd.grad(self.loss(logits, labels), x)
        return grad, logits.detach()


class Algorithm1:
    """Paper Algorithm 1: accumulate dJ/d(first-layer output) over T, then Eq. 6."""

    name = "alg1"

    def __init__(self, model: SNN, loss=_loss):
        if not isinstance(model, SNN):
            raise SnnadvError("Algorithm 1 needs an SNN source")
        first = model.first_conv
        if not isinstance(first, nn.Conv2d):
            raise SnnadvError("Algorithm 1 needs an SNN whose first layer is a convolution")
        self.model, self.loss = model, loss

    def first_layer_grad(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over t of dJ/dX_conv1(t) [B, C1, H1, W1] in fp32, logits).

        Each chunk's gradient reaches a hook on the first layer's output and is summed
        over its frames there (:meth:`snnadv.models.SNN.capture_first_layer`), so neither
        the output nor its gradient outlives its chunk; the chunks' sums are added in time
        order.  The backward pass runs towards a zero leaf added to that output, so no
        weight gradient is computed or accumulated."""
        m = self.model
        with m.capture_first_layer(images.device) as capture, torch.enable_grad():
            logits = m(images.detach())
            torch.autograd.grad(self.loss(logits, labels), capture.leaf)
            acc = capture.total()
        return acc, logits.detach()

    def __call__(self, images, labels):
        acc, logits = self.first_layer_grad(images, labels)
        conv = self.model.first_conv
        # Eq. 6: dJ/dX_rate = conv(dJ/dX_conv1, W rotated 180 degrees) = conv^T(dJ/dX_conv1)
        weight = conv.weight.detach()
        grad = torch.nn.functional.conv_transpose2d(
            acc.to(weight.dtype), weight, stride=conv.stride, padding=conv.padding,
            output_padding=_output_padding(images.shape[-1], acc.shape[-1], conv))
        return grad, logits


def _output_padding(size_in: int, size_out: int, conv: nn.Conv2d) -> int:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return size_in - ((size_out - 1) * s - 2 * p + k)


class EOT:
    """Expectation over transformation: the mean gradient of ``m`` independent draws."""

    def __init__(self, source, m: int):
        if m < 1:
            raise SnnadvError(f"--eot must be at least 1, got {m}")
        self.source, self.m = source, m
        self.name = f"{source.name}+eot{m}" if m > 1 else source.name

    def __call__(self, images, labels):
        grad, logits = self.source(images, labels)
        for _ in range(self.m - 1):
            g, l = self.source(images, labels)
            grad, logits = grad + g, logits + l
        return grad / self.m, logits / self.m


class AttackSurrogate:
    """BPTT (straight-through encoder) with a surrogate chosen at attack time.

    The model's own surrogates are swapped in for the duration of each call and
    restored afterwards, so training settings and other sources are unaffected.
    """

    def __init__(self, model: SNN, surrogate, loss=_loss):
        if not isinstance(model, SNN):
            raise SnnadvError("an attack-time surrogate needs an SNN source")
        self.model, self.surrogate, self.inner = model, surrogate, Autograd(model, loss)
        self.loss = loss
        self.name = f"bptt-{surrogate.name}"

    def __call__(self, images, labels):
        neurons = self.model.neurons
        saved = [n.surrogate for n in neurons]
        self.model.set_surrogate(self.surrogate)
        try:
            return self.inner(images, labels)
        finally:
            for n, s in zip(neurons, saved):
                n.surrogate = s


class _RateSpike(torch.autograd.Function):
    """Forward: the observed spike rate; backward: 1[rate > 0] / thr (ReLU-like)."""

    @staticmethod
    def forward(ctx, current, rate, thr):
        ctx.save_for_backward(rate)
        ctx.thr = thr
        return rate.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (rate,) = ctx.saved_tensors
        return grad_out * (rate > 0).to(grad_out.dtype) / ctx.thr, None, None


class RateGradient:
    """dJ/dx through time-averaged spike rates (BPTR / RGA; see the module docstring)."""

    name = "rate"

    def __init__(self, model: SNN, loss=_loss):
        if not isinstance(model, SNN):
            raise SnnadvError("the rate gradient needs an SNN source")
        self.model, self.loss = model, loss

    @torch.no_grad()
    def spike_rates(self, images: torch.Tensor, num_steps: int | None = None) -> dict[int, torch.Tensor]:
        """One real forward pass on fresh spikes: ``{id(neuron): rate [B, ...]}``."""
        m = self.model
        with record_spikes(m) as spikes:  # counts in fp32 (bf16 is exact only to 256)
            m(images, num_steps or m.num_steps)  # the model's own time loop (chunks, encoder draws)
        modules = dict(m.named_modules())
        return {id(modules[name]): rate for name, rate in spikes.rates().items()}

    def rate_logits(self, x: torch.Tensor, rates: dict[int, torch.Tensor]) -> torch.Tensor:
        """The rate network's logits for ``x`` (differentiable), given the observed rates."""
        m = self.model
        enc = m.encoder
        h = (normalize(quantize(x, enc.bits), enc.input_range) * enc.gain).unsqueeze(0)  # expected input rate

        def apply(module, v):
            if isinstance(module, Neuron):
                return _RateSpike.apply(v, rates[id(module)].unsqueeze(0), module.thr)
            if isinstance(module, BasicBlock):
                return module(v, apply)
            return m.layer(module, v)

        for _, module in m.hidden_layers():
            h = apply(module, h)
        return m.readout(h)[0]

    def __call__(self, images, labels):
        rates = self.spike_rates(images.detach())
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.rate_logits(x, rates)
            (grad,) = torch.autograd.grad(self.loss(logits, labels), x)
        return grad, logits.detach()


# --------------------------------------------------------------------------- unrolled estimators
# HART and PDSG change more than ds/du: HART cuts the membrane's path through time and
# averages a layer's input-current gradient over time, PDSG sets the surrogate's width from
# the layer's membrane statistics up to each step.  Both run the real SNN forward (the
# fused scan, so the spikes and the logits are exactly the SNN's for that draw) and replace
# each LIF layer's backward by an unrolled recurrence built from the observed spikes.
# Memory: autograd keeps a few fp32 tensors per layer and timestep for that recurrence
# (the scan keeps one byte per neuron and step): fine at attack batch sizes and moderate
# T, heavy for VGG11 at T in the thousands (attack in smaller batches there).


@contextmanager
def one_chunk(model: SNN):
    """Run ``model``'s whole time loop as one chunk in the fused mode inside the block (the
    estimators below need every timestep of a layer at once); settings restored after."""
    mode, chunk = model.mode, model.chunk_steps
    model.mode, model.chunk_steps = "fused", 2 ** 31
    try:
        yield model
    finally:
        model.mode, model.chunk_steps = mode, chunk


def lif_membranes(current: torch.Tensor, spikes: torch.Tensor, mem0: torch.Tensor, leak: float, thr: float,
                  reset: str, through_time: bool = True) -> list[torch.Tensor]:
    """The membrane before each step's reset, u[t] [B, ...] (fp32), for input currents
    ``current`` [T, B, ...] and the layer's observed ``spikes`` (Eq. 3, the scan's order):

        u[t] = lam * u[t-1] + I[t] - thr * s[t-1]         (subtract)
        u[t] = lam * (1 - s[t-1]) * u[t-1] + I[t]         (zero)
        u[t] = lam * u[t-1] + I[t]                        (none)

    with u[-1] = ``mem0`` and s[-1] = H(mem0 - thr).  Differentiable w.r.t. ``current``;
    the reset carries no gradient (as in the scan's BPTT); ``through_time=False`` cuts the
    path u[t-1] -> u[t] too (HART), so that du[t]/dI[t'] = 1[t = t']."""
    u_prev, s_prev = mem0.float(), (mem0 > thr).float()
    out = []
    for t in range(current.shape[0]):
        h = u_prev if through_time else u_prev.detach()
        if reset == "zero":
            h = h * (1.0 - s_prev)
        u = leak * h + current[t].float()
        if reset == "subtract":
            u = u - thr * s_prev
        out.append(u)
        u_prev, s_prev = u, spikes[t].float()
    return out


class _ObservedSpike(torch.autograd.Function):
    """Forward: the observed spikes; backward: ``grad * sg`` (a given surrogate value)."""

    @staticmethod
    def forward(ctx, mem, spikes, sg):
        ctx.save_for_backward(sg)
        return spikes.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (sg,) = ctx.saved_tensors
        return grad_out.float() * sg, None, None


class _TimeMix(torch.autograd.Function):
    """Identity forward; backward ``(1 - mix) * mean_t(g) + mix * g`` over the first (time) axis."""

    @staticmethod
    def forward(ctx, x, mix):
        ctx.mix = mix
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        mix = ctx.mix
        mean = g.mean(0, keepdim=True).expand_as(g)
        return (mean if mix == 0.0 else (1.0 - mix) * mean + mix * g), None


def hart_spikes(current, spikes, mem0, leak: float, thr: float, reset: str, gamma: float = 1.0,
                mix: float = 0.0) -> torch.Tensor:
    """One LIF layer with HART's backward (see :class:`HARTGradient`); forward = ``spikes``."""
    x = _TimeMix.apply(current, float(mix))
    tri = Triangle(gamma)
    mems = lif_membranes(x, spikes, mem0, leak, thr, reset, through_time=False)
    return torch.stack([_ObservedSpike.apply(u, spikes[t], tri.grad(u.detach(), thr, None))
                        for t, u in enumerate(mems)])


def pdsg_sigma(mems: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """PDSG's widths: for each step t, the standard deviation (unbiased) of the membranes
    u[0..t] over time so far, the batch and the spatial positions, per channel (a conv
    layer's frames [B, C, H, W]) or per feature (a linear layer's [B, F]): a tensor
    [T, 1, C, 1, 1] (or [T, 1, F]); 1 where it is 0 or undefined (fewer than 2 values)."""
    u = (torch.stack(list(mems)) if not torch.is_tensor(mems) else mems).detach().double()
    dims = tuple(d for d in range(1, u.dim()) if d != 2)
    count = 1
    for d in dims:
        count *= u.shape[d]
    n = torch.arange(1, u.shape[0] + 1, dtype=torch.float64, device=u.device).view(-1, *[1] * (u.dim() - 1)) * count
    s1 = u.sum(dims, keepdim=True).cumsum(0)
    s2 = (u * u).sum(dims, keepdim=True).cumsum(0)
    var = ((s2 - s1 * s1 / n) / (n - 1).clamp(min=1)).clamp(min=0.0)
    sigma = var.sqrt()
    sigma = torch.where((sigma > 0) & (n > 1), sigma, torch.ones_like(sigma))
    return sigma.float()


def pdsg_spikes(current, spikes, mem0, leak: float, thr: float, reset: str,
                sigma: float | None = None) -> torch.Tensor:
    """One LIF layer with PDSG's backward (see :class:`PDSGGradient`); forward = ``spikes``.
    ``sigma``: a fixed width instead of the membrane statistics (for tests and ablations)."""
    mems = lif_membranes(current, spikes, mem0, leak, thr, reset, through_time=True)
    widths = pdsg_sigma(mems) if sigma is None else [float(sigma)] * len(mems)
    return torch.stack([_ObservedSpike.apply(u, spikes[t], ShiftedGaussian(widths[t]).grad(u.detach(), thr, None))
                        for t, u in enumerate(mems)])


@contextmanager
def layer_backward(model: SNN, rule):
    """Inside the block, every LIF layer of ``model`` runs its real scan forward (no graph)
    and returns ``rule(current, spikes, mem0, leak, thr, reset)`` when its input needs a
    gradient: the observed spikes with the rule's backward."""
    neurons = model.neurons
    for n in neurons:
        if n.leak is None or getattr(n, "reset_mechanism", None) not in ("subtract", "zero", "none"):
            raise SnnadvError(f"this gradient path needs LIF neurons (leak, reset), not {type(n).__name__}")

    def patched(neuron):
        def multistep(current):
            frame = current.shape[1:]
            mem = getattr(neuron, "mem", None)
            mem0 = mem.detach().float() if torch.is_tensor(mem) and mem.shape == frame else \
                torch.zeros(frame, device=current.device)
            with torch.no_grad():
                spikes = type(neuron).multistep(neuron, current.detach())
            if not current.requires_grad:
                return spikes
            return rule(current, spikes, mem0, neuron.leak, neuron.thr, neuron.reset_mechanism)
        return multistep

    for n in neurons:
        n.multistep = patched(n)
    try:
        with one_chunk(model):
            yield model
    finally:
        for n in neurons:
            del n.multistep


class HARTGradient:
    """HART (Hao et al., "Threaten spiking neural networks through combining rate and
    temporal information", ICLR 2024): BPTT in which every LIF layer

    1. cuts the membrane's path through time (u[t-1] -> u[t] carries no gradient), so a
       spike's gradient reaches only the current of its own step;
    2. uses HART's triangle surrogate h(u) = max(0, w - |u - thr|) / w^2, w = gamma * thr
       (:class:`~snnadv.surrogates.Triangle`); and
    3. averages the input current's gradient over time (the rate part):

           g[t]      = dJ/ds[t] * h(u[t])                      (temporal, per step)
           dJ/dI[t]  = (1 - mix) * (1/T) sum_t' g[t'] + mix * g[t]

    ``mix = 0`` is HART as published (the code's "avg" mode: every step of a layer gets the
    time-averaged gradient); ``mix = 1`` keeps each step's own gradient (per-step surrogate
    gradients without the membrane path); ``gamma`` is HART's own rate/temporal knob (a
    wide triangle passes similar gradients at every step, a narrow one only near threshold;
    HART searches it per model).  The encoder is straight-through, as for ``bptt``.  The
    forward is the real SNN (fused scan; the whole time loop as one chunk).
    """

    name = "hart"
    one_chunk = True

    def __init__(self, model: SNN, gamma: float = 1.0, mix: float = 0.0, loss=_loss):
        if not isinstance(model, SNN):
            raise SnnadvError("the HART gradient needs an SNN source")
        if not 0.0 <= float(mix) <= 1.0:
            raise SnnadvError(f"HART's mix must be in [0, 1], got {mix}")
        if not float(gamma) > 0:
            raise SnnadvError(f"HART's gamma must be positive, got {gamma}")
        self.model, self.gamma, self.mix, self.loss = model, float(gamma), float(mix), loss
        self.inner = Autograd(model, loss)

    def rule(self, current, spikes, mem0, leak, thr, reset):
        return hart_spikes(current, spikes, mem0, leak, thr, reset, self.gamma, self.mix)

    def __call__(self, images, labels):
        self.inner.loss = self.loss
        with layer_backward(self.model, self.rule), torch.enable_grad():
            return self.inner(images, labels)


class PDSGGradient:
    """PDSG, the potential-dependent surrogate gradient (Lun et al., "Towards effective and
    sparse adversarial attack on spiking neural networks via breaking invisible surrogate
    gradients", CVPR 2025): full BPTT (straight-through encoder, the reset carrying no
    gradient) in which the surrogate of layer l at step t is

        ds/du = exp(-((u - thr - sigma/2) / (sqrt(2) sigma))^2) / (sqrt(2 pi) sigma),
        sigma = std of u[0..t] of layer l over time so far, batch and space, per channel

    (:class:`~snnadv.surrogates.ShiftedGaussian`, :func:`pdsg_sigma`): the surrogate's
    width follows the spread of the membrane potentials, so it never becomes "invisible"
    (zero where the membranes actually are).  The widths depend on the whole batch.
    ``sigma``: a fixed width instead (an ablation; then it is BPTT with that surrogate).
    """

    name = "pdsg"
    one_chunk = True

    def __init__(self, model: SNN, sigma: float | None = None, loss=_loss):
        if not isinstance(model, SNN):
            raise SnnadvError("the PDSG gradient needs an SNN source")
        if sigma is not None and not float(sigma) > 0:
            raise SnnadvError(f"PDSG's sigma must be positive, got {sigma}")
        self.model, self.sigma, self.loss = model, sigma, loss
        self.inner = Autograd(model, loss)

    def rule(self, current, spikes, mem0, leak, thr, reset):
        return pdsg_spikes(current, spikes, mem0, leak, thr, reset, self.sigma)

    def __call__(self, images, labels):
        self.inner.loss = self.loss
        with layer_backward(self.model, self.rule), torch.enable_grad():
            return self.inner(images, labels)


# --------------------------------------------------------------------------- the registered paths
# An entry of GRADIENTS is a factory (model, **options) -> source for an SNN ``model``;
# the options are ``slope`` and ``proxy`` (see make_gradient), ignored where unused.  A
# factory may say ``needs_proxy = True`` (it differentiates the proxy ANN, not the SNN)
# or ``duplicate_of = "<path>"`` (the same direction: the adaptive suite's "all" skips it)
# or ``opt_in = True`` (run only when named: "all" skips it too).  A factory passes ``loss``
# (a callable ``loss(logits, labels)``) to its source: snnadv.estimator relies on it.

#: the path of an SNN source when none is named: the paper's Algorithm 1
DEFAULT_PATH = "alg1"


@register_gradient("alg1")
def _alg1(model, *, loss=_loss, **_):
    return Algorithm1(model, loss)


@register_gradient("bptt")
def _bptt(model, *, loss=_loss, **_):
    return Autograd(model, loss)


_bptt.duplicate_of = "alg1"  # BPTT with the training surrogate has Algorithm 1's direction (module docstring)


@GRADIENTS.register_family("bptt-", SURROGATES)
def _bptt_with(surrogate: str):
    """``bptt-<surrogate>``, for every registered surrogate (a plugin's too)."""
    def factory(model, *, slope: float | None = None, loss=_loss, **_):
        return AttackSurrogate(model, make_surrogate(surrogate, slope=slope), loss)
    return factory


@register_gradient("rate")
def _rate(model, *, loss=_loss, **_):
    return RateGradient(model, loss)


@register_gradient("ann")
def _ann(model, *, proxy: nn.Module | None = None, loss=_loss, **_):
    if proxy is None:
        raise SnnadvError("the 'ann' gradient path needs the ANN the SNN was converted from (proxy)")
    return Autograd(proxy, loss, name="ann")


_ann.needs_proxy = True  # differentiates the proxy, not the target: deterministic, no EOT


@register_gradient("hart")
def _hart(model, *, gamma: float | None = None, mix: float | None = None, loss=_loss, **_):
    return HARTGradient(model, 1.0 if gamma is None else gamma, 0.0 if mix is None else mix, loss)


@register_gradient("pdsg")
def _pdsg(model, *, sigma: float | None = None, loss=_loss, **_):
    return PDSGGradient(model, sigma, loss)


# Not in the adaptive suite's "all" (snnadv.attacks.settings.all_paths): each has a parameter
# that its paper tunes per model (HART's gamma, searched per model; PDSG is defined for the
# whole batch at once), and "all" is the fixed list behind the existing tables.  Name them
# in --paths to run them.
_hart.opt_in = _pdsg.opt_in = True


def make_gradient(model: nn.Module, kind: str | None = None, eot: int = 1, *, slope: float | None = None,
                  proxy: nn.Module | None = None, loss=None, **options):
    """The gradient source for ``model``: for SNNs the path registered as ``kind``
    (:data:`snnadv.registry.GRADIENTS`, default :data:`DEFAULT_PATH`), autograd for ANNs
    (``kind`` must then be None).

    ``slope`` sets the fast-sigmoid sharpness k of ``bptt-fast-sigmoid``; ``proxy`` is
    the ANN used by the ``ann`` path; ``loss(logits, labels)`` replaces the cross-entropy
    J (e.g. a vector-Jacobian product, :mod:`snnadv.estimator`); further ``options`` go to
    the path's factory (``gamma`` and ``mix`` of ``hart``, ``sigma`` of ``pdsg``).
    """
    if loss is not None:
        options["loss"] = loss
    if isinstance(model, SNN):
        source = GRADIENTS[kind or DEFAULT_PATH](model, slope=slope, proxy=proxy, **options)
    else:
        if kind is not None:
            raise SnnadvError("--gradient applies to SNN sources only; an ANN source uses autograd")
        source = Autograd(model, name="autograd", **({"loss": loss} if loss is not None else {}))
    return EOT(source, eot) if eot != 1 else source  # EOT rejects eot < 1
