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
  the sampling; the forward values are the sampled spikes, unchanged;
* **keyed** spikes (:func:`encoder_keys`): inside the block, the spike of image i at
  timestep t and pixel j is ``u < p`` with ``u`` a hash of (seed, i's *global* index
  in the evaluated set, the encoder call's number for that image in the block, t, j).
  Nothing else enters: not the image's position in its batch, the batch size, the
  time chunk's size, the device or the process.  So an evaluation or an attack whose
  images are split into batches differently, or sharded over several processes
  (:mod:`snnadv.parallel`), draws exactly the same spikes for every image as one
  process does with one batch size.  The call number counts the model's forward
  passes on the batch inside the block (one per call of the SNN: every attack step
  and EOT draw gets fresh spikes, and the k-th call on image i has the same spikes
  whatever the batching).  See :func:`keyed_uniform` for the hash.

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


# --------------------------------------------------------------------------- keyed randomness
_M32 = 0xFFFFFFFF
#: domain separation of the keyed streams (encoder spikes; an attack's random start)
STREAM_SPIKES = 0x5EED5B1C
STREAM_START = 0x7A57A27E


def mix32(h):
    """The 32-bit "lowbias32" integer finaliser (C. Wellons' hash prospector: two
    xor-shift-multiply rounds): a bijection of [0, 2^32) that spreads each input bit
    over the output.  Works elementwise on an int64 tensor with values in [0, 2^32)
    (both multipliers are below 2^31, so no product reaches 2^63: int64 arithmetic
    never overflows), or on a Python int."""
    if isinstance(h, torch.Tensor):
        return _mix32_(h.clone())
    h ^= h >> 16
    h = (h * 0x21F0AAAD) & _M32
    h ^= h >> 15
    h = (h * 0x735A2D97) & _M32
    return h ^ (h >> 15)


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` in place on an int64 tensor (the per-element work of the spikes)."""
    h ^= h >> 16
    h.mul_(0x21F0AAAD).bitwise_and_(_M32)
    h ^= h >> 15
    h.mul_(0x735A2D97).bitwise_and_(_M32)
    h ^= h >> 15
    return h


def _fold(value: int) -> int:
    """A Python int of any size (a seed) folded to 32 bits through :func:`mix32` (a
    negative one is taken modulo 2^64)."""
    value = int(value)
    if value < 0:
        value &= 2**64 - 1
    h = mix32((value & _M32) ^ 0x9E3779B9)
    value >>= 32
    while value:
        h = mix32(h ^ mix32(value & _M32))
        value >>= 32
    return h


def image_keys(seed: int, index: torch.Tensor, call: int, stream: int = STREAM_SPIKES) -> torch.Tensor:
    """The 32-bit key of each image (int64 [B], on ``index``'s device): a hash of
    (``stream``, ``seed``, the image's global ``index``, the ``call`` number)."""
    s = mix32(_fold(seed) ^ stream)
    idx = index.to(torch.int64)
    k = mix32(idx & _M32) ^ mix32(((idx >> 32) & _M32) ^ 0x85EBCA6B)  # indices of any size
    k = mix32(k ^ s)
    return mix32(k ^ mix32((int(call) & _M32) ^ 0xC2B2AE35))


def keyed_bits(keys: torch.Tensor, n: int, num_steps: int = 1, t0: int = 0) -> torch.Tensor:
    """24 random bits per element (int64 ``[num_steps, B, n]``, values in [0, 2^24)) from
    the image keys of :func:`image_keys` (int64 [B]): element (t, b, j) is a hash of
    (key_b, timestep ``t0 + t``, j) only.

    The hash: per (t, b) ``base = mix32(key_b ^ mix32(t + c1))``, per element
    ``h = mix32(base ^ mix32(j + c2))``, the bits ``h >> 8``, with :func:`mix32` in int64
    tensor operations (in place on the big tensor).  A value depends on t0 and t only
    through t0 + t, so splitting the time loop in chunks changes nothing.

    Cost, measured on the 2-core CPU (one thread): ~62 M spikes/s, the same as the
    generator path of :func:`rate` (0.97-1.02x at B=64, T=32 and B=16, T=100 on
    CIFAR images; a VGG5 forward at B=16, T=32 unchanged within noise); the hash
    holds 8 bytes per element of a chunk's input frames (the uniforms of
    :func:`rate`: 4)."""
    device = keys.device
    t = torch.arange(t0, t0 + num_steps, dtype=torch.int64, device=device)
    base = mix32(keys.view(1, -1) ^ mix32((t + 0x27D4EB2F) & _M32).view(-1, 1))  # [T, B]
    pixel = mix32(torch.arange(n, dtype=torch.int64, device=device) + 0x165667B1)  # [n]
    h = _mix32_(base.unsqueeze(-1) ^ pixel)  # [T, B, n]
    h >>= 8
    return h


def keyed_uniform(keys: torch.Tensor, shape, num_steps: int = 1, t0: int = 0) -> torch.Tensor:
    """Uniform numbers in [0, 1) (float32 ``[num_steps, B, *shape]``): ``u = bits * 2^-24``
    of :func:`keyed_bits` (24 bits: exact in float32)."""
    n = 1
    for d in shape:
        n *= int(d)
    u = keyed_bits(keys, n, num_steps, t0).to(torch.float32).mul_(2.0 ** -24)
    return u.view(num_steps, keys.shape[0], *shape)


class EncoderKeys:
    """The keys of one :func:`encoder_keys` block: ``seed``, the batch's global image
    ``index`` (int64 [B]) and ``calls``, the number of encoder calls (forward passes)
    made on the batch in the block so far."""

    def __init__(self, seed: int, index: torch.Tensor):
        self.seed = int(seed)
        self.index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        self.calls = 0
        self.piece_calls = 0  # the count a piece of the batch ended at (narrowed)
        self._keys: dict = {}

    def begin(self, batch: int, device) -> torch.Tensor:
        """A new call (a forward pass from timestep 0): its image keys on ``device``."""
        if batch != len(self.index):
            raise SnnadvError(f"keyed encoder: a batch of {batch} images, but {len(self.index)} image indices "
                              f"were given (encoder_keys)")
        keys = image_keys(self.seed, self.index.to(device), self.calls)
        self.calls += 1
        self._keys = {"keys": keys}
        return keys

    def current(self, batch: int, device) -> torch.Tensor:
        """The image keys of the current call (a later time chunk of the same forward pass)."""
        if "keys" not in self._keys or batch != len(self.index):
            raise SnnadvError("keyed encoder: a time chunk after timestep 0 without a call from timestep 0")
        return self._keys["keys"].to(device)

    @contextmanager
    def narrowed(self, start: int, stop: int):
        """Images ``start:stop`` of the batch only, counting calls from where the batch is
        (a batch evaluated in pieces, each piece with the calls the whole batch would
        make); afterwards the batch is whole again and its count where the piece left it."""
        index, calls = self.index, self.calls
        self.index = index[start:stop]
        try:
            yield self
        finally:
            end = self.calls
            self.index, self.calls, self._keys = index, calls, {}
            self.piece_calls = end

    @contextmanager
    def selected(self, rows: torch.Tensor):
        """Images ``rows`` (positions in the batch) only, the call count going on (an attack
        that drops the images it is done with: each image left draws what it would in the
        whole batch); afterwards the whole batch again, its count where the block left it."""
        index = self.index
        self.index, self._keys = index[rows.to(index.device)], {}
        try:
            yield self
        finally:
            self.index, self._keys = index, {}


def keyed_rate(x: torch.Tensor, num_steps: int, keys: torch.Tensor, t0: int = 0) -> torch.Tensor:
    """:func:`rate` with keyed spikes: frame t of image b is ``u < x`` with ``u`` of
    :func:`keyed_uniform` (compared in integers: ``bits < ceil(x * 2^24)``, the same
    in float32), straight-through gradient as in :func:`rate`."""
    p = x.detach()
    B = p.shape[0]
    threshold = torch.ceil(p.float().reshape(B, -1) * 2.0 ** 24).clamp_(-1, 2**24 + 1).to(torch.int64)
    spikes = (keyed_bits(keys, threshold.shape[1], num_steps, t0) < threshold).to(p.dtype)
    spikes = spikes.view(num_steps, *p.shape)
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
        self.keys: EncoderKeys | None = None  # set by encoder_keys()

    def forward(self, x: torch.Tensor, num_steps: int, t0: int = 0) -> torch.Tensor:
        """Frames of timesteps ``t0 .. t0 + num_steps - 1`` of ``x``.  ``t0`` matters to keyed
        spikes only (:func:`encoder_keys`): ``t0 = 0`` starts a new call (forward pass), a
        later ``t0`` continues it (the next time chunk)."""
        x = normalize(quantize(x, self.bits), self.input_range) * self.gain
        if self.keys is not None:
            k = self.keys.begin(len(x), x.device) if t0 == 0 else self.keys.current(len(x), x.device)
            draw = lambda p: keyed_rate(p, num_steps, k, t0)  # noqa: E731
        else:
            draw = lambda p: rate(p, num_steps, self.generator)  # noqa: E731
        if self.input_range == "unit":
            return draw(x)
        sign = torch.sign(x).detach()
        return sign * draw(x.abs())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, input_range={self.input_range}, gain={self.gain}"


@contextmanager
def encoder_generator(model: nn.Module, generator: torch.Generator | None):
    """Draw the spikes of ``model``'s encoder (an SNN's ``encoder``, or a
    :class:`RateEncoder` itself) from ``generator`` inside the block (also inside an
    :func:`encoder_keys` block: the innermost block decides); the encoder's previous
    generator (and keys) are back afterwards, whatever happens inside."""
    encoder = model if isinstance(model, RateEncoder) else model.encoder
    previous, keys = encoder.generator, encoder.keys
    encoder.generator, encoder.keys = generator, None  # the innermost block decides: no keys inside
    try:
        yield generator
    finally:
        encoder.generator, encoder.keys = previous, keys


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


def _encoder(model: nn.Module) -> RateEncoder | None:
    enc = model if isinstance(model, RateEncoder) else getattr(model, "encoder", None)
    return enc if isinstance(enc, RateEncoder) else None


def current_keys(model: nn.Module) -> EncoderKeys | None:
    """The keys of the innermost :func:`encoder_keys` block on ``model`` (None: none)."""
    enc = _encoder(model)
    return None if enc is None else enc.keys


@contextmanager
def encoder_keys(model: nn.Module, seed: int, index: torch.Tensor | None = None):
    """Keyed spikes for ``model``'s encoder inside the block (see the module docstring):
    the spikes of the batch's image b depend only on ``seed``, ``index[b]`` (its global
    index, int64), the number of the encoder call on the batch in this block (0 for the
    first forward pass, 1 for the next, ...), the timestep and the pixel.

    Why: the same images give the same spikes for any batch size, time chunking,
    device or number of processes sharing the images, so a sharded evaluation or
    attack equals one process's, image by image.

    ``index=None`` takes the index of the enclosing block (a nested block with its own
    seed and its own call count: e.g. a fixed set of draws inside an attack).  The
    previous keys (or the generator mode, when there were none) are back afterwards.
    Yields the :class:`EncoderKeys`; a model without a :class:`RateEncoder` (an ANN) is
    left as it is (yields None).
    """
    enc = _encoder(model)
    if enc is None:
        yield None
        return
    previous = enc.keys
    if index is None:
        if previous is None:
            raise SnnadvError("encoder_keys without an index needs an enclosing encoder_keys block")
        index = previous.index
    enc.keys = EncoderKeys(seed, index)
    try:
        yield enc.keys
    finally:
        enc.keys = previous
