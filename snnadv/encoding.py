"""Input encoding: b-bit pre-quantisation and Poisson/Bernoulli rate coding (Sec. 2.2).

The encoder turns an image ``x`` in [0, 1] into T binary frames whose time average
is ``x`` in expectation (the paper's "Poisson" encoder; its code draws a uniform
number per pixel and step, which is what :func:`snntorch.spikegen.rate` does).  The
spikes are drawn by :func:`snntorch.spikegen.rate` itself; this module adds

* **pre-quantisation** to b bits (paper Sec. 4.1, Fig. 2-3): ``round(x (2^b - 1)) /
  (2^b - 1)``, 2^b levels, before encoding;
* a **signed** mode reproducing the original code: the image is normalised to
  [-1, 1] (mean 0.5, std 0.5) and each step emits ``sign(x) * Bernoulli(|x|)``,
  ternary spikes in {-1, 0, +1};
* an explicit :class:`torch.Generator`, so an experiment can fix or vary the
  encoder's randomness independently of everything else;
* a **straight-through** gradient: d(spikes)/dx = 1 per frame (and through the
  quantiser), which is the BPDA gradient an attack uses to differentiate through
  the sampling; the forward values are the sampled spikes, unchanged.

The default is the paper's unsigned [0, 1] rate coding: it is what the text
describes, it makes the first layer's input a firing rate (non-negative, as an IF
neuron's output would be), and the ANN it is converted from sees the same [0, 1]
image.  The signed mode is there to reproduce the original code's numbers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from snntorch import spikegen
from torch import nn

from .errors import SnnadvError

INPUT_RANGES = ("unit", "signed")


def check_bits(bits: int | None) -> int | None:
    if bits is None:
        return None
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise SnnadvError(f"input bits must be an integer from 1 to 8, got {bits}")
    return bits


def quantize(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Quantise [0, 1] values to 2^bits levels (straight-through gradient).

    ``bits=None`` returns ``x`` unchanged.  Levels are k / (2^b - 1), k = 0..2^b - 1.
    """
    if bits is None:
        return x
    levels = (1 << bits) - 1
    q = torch.round(x.clamp(0.0, 1.0) * levels) / levels
    return x + (q - x).detach()


def normalize(x: torch.Tensor, input_range: str) -> torch.Tensor:
    """[0, 1] images to the model's input range: ``unit`` keeps them, ``signed`` maps to [-1, 1]."""
    return x if input_range == "unit" else x * 2.0 - 1.0


def rate(x: torch.Tensor, num_steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num_steps`` Bernoulli frames of rates ``x`` (in [0, 1]), via snnTorch.

    Without a ``generator``, values are drawn by :func:`snntorch.spikegen.rate` from the
    global RNG.  With a generator on ``x``'s GPU, they are drawn from it directly (no
    read-back to the host).  With a CPU generator, a seed drawn from it seeds only the
    generator of ``x``'s device, for :func:`snntorch.spikegen.rate`, inside a fork
    that restores that generator afterwards: the frames depend only on the generator's
    state, and no other device's RNG is touched (reading the seed is a CPU read, not
    a device sync).  The output has a straight-through gradient w.r.t. ``x``.
    """
    p = x.detach()
    if generator is None:
        spikes = spikegen.rate(p, num_steps=num_steps)
    elif generator.device.type == x.device.type != "cpu":
        spikes = p.new_empty((num_steps, *p.shape)).bernoulli_(p.clamp(0.0, 1.0), generator=generator)
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        cuda = x.device.type == "cuda"
        with torch.random.fork_rng(devices=[x.device.index or 0] if cuda else [], device_type="cuda"):
            if cuda:
                torch.cuda.default_generators[x.device.index or 0].manual_seed(seed)
            else:
                torch.random.default_generator.manual_seed(seed)
            spikes = spikegen.rate(p, num_steps=num_steps)
    if x.requires_grad:
        spikes = spikes + (x - p).unsqueeze(0)
    return spikes


class RateEncoder(nn.Module):
    """Image in [0, 1] -> T spike frames [T, B, C, H, W] (quantise, normalise, sample).

    Args:
        bits: pre-quantisation bit width (None: none, the default).
        input_range: ``"unit"`` (spikes in {0, 1}, default) or ``"signed"`` (the
            original code: [-1, 1] input, spikes in {-1, 0, 1}).
        gain: a scale on the rates (the original ResNet code uses 0.9); 1.0 default.
        generator: optional :class:`torch.Generator` for the sampling.
    """

    def __init__(self, bits: int | None = None, input_range: str = "unit", gain: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if input_range not in INPUT_RANGES:
            raise SnnadvError(f"unknown input range '{input_range}' (choose unit or signed)")
        self.bits = check_bits(bits)
        self.input_range = input_range
        self.gain = float(gain)
        self.generator = generator

    def forward(self, x: torch.Tensor, num_steps: int) -> torch.Tensor:
        x = normalize(quantize(x, self.bits), self.input_range) * self.gain
        if self.input_range == "unit":
            return rate(x, num_steps, self.generator)
        sign = torch.sign(x).detach()
        return sign * rate(x.abs(), num_steps, self.generator)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, input_range={self.input_range}, gain={self.gain}"


@contextmanager
def encoder_generator(model: nn.Module, generator: torch.Generator | None):
    """Draw the spikes of ``model``'s encoder (an SNN's ``encoder``, or a
    :class:`RateEncoder` itself) from ``generator`` inside the block; the encoder's
    previous generator is back afterwards, whatever happens inside."""
    encoder = model if isinstance(model, RateEncoder) else model.encoder
    previous = encoder.generator
    encoder.generator = generator
    try:
        yield generator
    finally:
        encoder.generator = previous


@contextmanager
def encoder_seed(model: nn.Module, seed: int | None, device=None):
    """:func:`encoder_generator` with a generator seeded with ``seed``: the spikes drawn
    inside depend on ``seed`` only.

    ``device``: where the generator lives (default: the model's parameters').  A model
    without a :class:`RateEncoder` (an ANN), or ``seed=None``, is left as it is.
    """
    if seed is None or not isinstance(getattr(model, "encoder", None), RateEncoder):
        yield
        return
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    with encoder_generator(model, torch.Generator(device=device).manual_seed(int(seed))):
        yield
