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

* :class:`~snnadv.paths.hart.HARTGradient` (``hart``, :mod:`snnadv.paths.hart`): HART (Hao et al. ICLR 2024): per layer, the
  membrane's path through time cut, a triangle surrogate of width gamma * thr, and the
  input current's gradient mixed between its time average (rate) and each step's own
  (temporal) with ``mix``.
* :class:`~snnadv.paths.pdsg.PDSGGradient` (``pdsg``, :mod:`snnadv.paths.pdsg`): PDSG (Lun et al. CVPR 2025): BPTT with a Gaussian
  surrogate whose width is the standard deviation of the layer's membrane potentials.

Every path is registered by name (:data:`snnadv.registry.GRADIENTS`, a factory
``(model, **options) -> source`` per name, ``bptt-<surrogate>`` for every registered
surrogate); :func:`make_gradient` builds one by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoding import normalize, quantize
from .errors import SnnadvError
from .models import SNN, record_spikes
from .models.ann import BasicBlock
from .neurons import Neuron
from .registry import GRADIENTS, SURROGATES, register_gradient
from .surrogates import make_surrogate


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
