"""The SNN built from the same spec as the ANN (each ReLU -> a spiking neuron).

The neuron is any registered :class:`~snnadv.neurons.Neuron` (``neuron="lif"`` by
default: :class:`~snnadv.neurons.LIF`, an IF neuron at leak 1.0), named in the model's
settings and in its checkpoints.

``logits = snn(images in [0, 1], num_steps=T)``: one call encodes the images into T
spike frames (:class:`~snnadv.encoding.RateEncoder`), runs them through the
network, and returns the output layer's accumulated membrane / T.  It is a plain
``nn.Module``, so any attack library can call it; every call draws fresh encoder
spikes (and fresh dropout masks in training mode).

Time loop.  Two interchangeable executions of the same network:

* ``mode="fused"`` (default): each layer processes all frames of a time chunk at
  once: synaptic layers (conv, linear, pooling) as one call over the T*B frames,
  neurons as one fused scan over T (:meth:`~snnadv.neurons.LIF.multistep`).
  ``chunk_steps`` bounds the frames held at once (None: automatic, see
  :meth:`SNN.chunk_for`); neuron state (and its gradient) and dropout masks
  carry across chunks, so chunking changes memory, not
  results (beyond the order in which random numbers are drawn).
* ``mode="reference"``: the obvious step-by-step loop, one frame through every
  layer per timestep, neurons through snnTorch's single-step ``forward``.  Slow;
  kept to test the fused path against.

The time loop is public for tools that need part of it: :meth:`SNN.chunks` (the input
frames of each chunk, after a state reset), :meth:`SNN.hidden` (a chunk through the
hidden layers, or up to one of them), :meth:`SNN.readout`, :meth:`SNN.layer` (one module
on a chunk) and :meth:`SNN.hidden_layers`.  Conversion balances thresholds with it;
:func:`~snnadv.models.record_spikes` counts every layer's spikes and :meth:`SNN.capture_first_layer`
collects Algorithm 1's first-layer gradient, both as context managers.

Output layer (paper Sec. 2.2, ``reference-notes.md``): everything after the last
spiking layer (pooling, dropout with its fixed mask, the final linear layer) is
linear and bias-free, so it integrates without threshold or leak; the fused path
applies it once to the summed spikes, the reference path every step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..values import parse_precision
from ..encoding import RateEncoder
from ..errors import SnnadvError
from ..kernels.linear import linear
from ..neurons import Neuron, TimeDropout, reset_state
from ..registry import NEURONS
from ..surrogates import Surrogate, make_surrogate
from .ann import BasicBlock, make_layer
from .probes import FirstLayerGradients
from .spec import Act, ArchSpec, Block

MODES = ("fused", "reference")


class SNN(nn.Module):
    """A spiking network; ``kind`` says which stage made it (``"snn-conv"``, ``"snn-bp"``).

    Args:
        spec: the architecture (shared with the ANN).
        num_steps: default T for ``forward``.
        leak: lambda of every hidden neuron (1.0 = IF).
        reset: ``"subtract"`` (default), ``"zero"`` or ``"none"``.
        surrogate: the training/attack-time surrogate (default Eq. 4).
        input_bits, input_range, gain: encoder settings (see :mod:`snnadv.encoding`).
        mode: ``"fused"`` (default) or ``"reference"`` (see the module docstring).
        chunk_steps: timesteps per chunk in fused mode (None: automatic).
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the synaptic layers).
        neuron: the registered neuron of every spiking layer (:data:`snnadv.registry.NEURONS`;
            default ``"lif"``), built by its :meth:`~snnadv.neurons.Neuron.build` from
            ``leak``, ``reset``, ``surrogate`` and ``neuron_params``.
        neuron_params: the neuron's extra parameters (its :meth:`~snnadv.neurons.Neuron.params`).
        kind: the stage that made the model (``"snn"`` when none did).
    """

    def __init__(self, spec: ArchSpec, num_steps: int = 100, leak: float = 1.0, reset: str = "subtract",
                 surrogate: Surrogate | None = None, input_bits: int | None = None,
                 input_range: str = "unit", gain: float = 1.0, mode: str = "fused",
                 chunk_steps: int | None = None, precision: str = "fp32", *, neuron: str = "lif",
                 neuron_params: dict | None = None, kind: str = "snn"):
        super().__init__()
        if mode not in MODES:
            raise SnnadvError(f"unknown mode '{mode}' (choose {', '.join(MODES)})")
        parse_precision(precision)
        cls = NEURONS[neuron]
        if not (isinstance(cls, type) and issubclass(cls, Neuron)):
            raise SnnadvError(f"neuron '{neuron}' is registered as {cls!r}, not a snnadv.neurons.Neuron subclass")
        self.spec = spec
        self.kind = kind
        self.neuron = neuron
        self.num_steps = check_steps(num_steps)
        self.mode = mode
        self.precision = precision
        self.chunk_steps = chunk_steps
        self.encoder = RateEncoder(input_bits, input_range, gain)
        surrogate = surrogate or make_surrogate("stdb")
        params = dict(neuron_params or {})

        def make_neuron():
            return cls.build(leak=leak, threshold=1.0, reset=reset, surrogate=surrogate, **params)

        self._names = [l.name for l in spec.layers]
        for layer in spec.layers:
            self.add_module(layer.name, make_layer(layer, make_neuron, TimeDropout))
        spiking = [i for i, l in enumerate(spec.layers) if isinstance(l, (Act, Block))]
        if not spiking:
            raise SnnadvError(f"architecture {spec.arch} has no spiking layer")
        self._hidden = self._names[: spiking[-1] + 1]
        self._tail = self._names[spiking[-1] + 1:]
        # the first synaptic layer (Alg. 1 differentiates w.r.t. its output); kept in a
        # tuple so that it is not registered a second time as a sub-module
        self._first = (next(m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))),)
        self._capture: FirstLayerGradients | None = None  # set by capture_first_layer()

    @property
    def first_conv(self) -> nn.Module:
        return self._first[0]

    # -- settings --------------------------------------------------------------
    @property
    def neurons(self) -> list[Neuron]:
        return [m for m in self.modules() if isinstance(m, Neuron)]

    @property
    def neuron_names(self) -> list[str]:
        return [n for n, m in self.named_modules() if isinstance(m, Neuron)]

    @property
    def neuron_params(self) -> dict:
        """The neurons' extra parameters (checkpoints record them beside :attr:`neuron`)."""
        return self.neurons[0].params()

    def thresholds(self) -> dict[str, float]:
        return {n: m.thr for n, m in self.named_modules() if isinstance(m, Neuron)}

    def set_thresholds(self, values: dict[str, float]) -> None:
        mods = dict(self.named_modules())
        for name, v in values.items():
            if not isinstance(mods.get(name), Neuron):
                raise SnnadvError(f"no spiking layer named '{name}' in {self.spec.arch}")
            mods[name].set_threshold(v)

    def set_leak(self, leak: float) -> None:
        if not 0.0 < float(leak) <= 1.0:
            raise SnnadvError(f"leak must be in (0, 1], got {leak}")
        for m in self.neurons:
            m.set_leak(leak)

    def set_surrogate(self, surrogate: Surrogate) -> None:
        for m in self.neurons:
            m.surrogate = surrogate

    @property
    def surrogate(self) -> Surrogate | None:
        return self.neurons[0].surrogate

    @property
    def leak(self) -> float | None:
        return self.neurons[0].leak

    @property
    def reset(self) -> str:
        """The neurons' reset (snnTorch's name: ``"subtract"`` | ``"zero"`` | ``"none"``)."""
        return getattr(self.neurons[0], "reset_mechanism", "subtract")

    def reset_state(self) -> None:
        reset_state(self)
        if self._capture is not None:
            self._capture.chunks = {}

    # -- Algorithm 1's capture -----------------------------------------------------
    @contextmanager
    def capture_first_layer(self, device=None) -> Iterator["FirstLayerGradients"]:
        """Inside the block, every run sums dJ/d(first-layer output) of each chunk over
        its frames (fp32) into the yielded :class:`FirstLayerGradients` (Alg. 1): call
        ``torch.autograd.grad(loss, capture.leaf)``, then ``capture.total()``."""
        if self._capture is not None:
            raise SnnadvError("this SNN is already capturing its first layer's gradient")
        self._capture = FirstLayerGradients(device if device is not None else self.first_conv.weight.device)
        try:
            yield self._capture
        finally:
            self._capture = None

    # -- running -----------------------------------------------------------------
    def hidden_layers(self) -> list[tuple[str, nn.Module]]:
        """The top-level layers up to the last spiking one, in order: ``(name, module)``."""
        return [(name, getattr(self, name)) for name in self._hidden]

    def layer(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one module on a [T, B, ...] chunk of frames."""
        if isinstance(module, Neuron):
            return module.run(x, fused=self.mode == "fused")
        if isinstance(module, TimeDropout):
            return module(x)
        if isinstance(module, BasicBlock):
            return module(x, self.layer)
        if isinstance(module, nn.AvgPool2d) and x.requires_grad:  # saves no input (spikes)
            return _AvgPool.apply(x.flatten(0, 1), module.kernel_size).unflatten(0, x.shape[:2])
        T, B = x.shape[:2]
        # synaptic layer: one call over all T*B frames; bf16 autocast if asked (spikes
        # are exact in bf16; membranes stay fp32 in the neuron scan)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            x4 = x.flatten(0, 1)
            if isinstance(module, nn.Conv2d) and self.channels_last:
                x4 = x4.contiguous(memory_format=torch.channels_last)
            if isinstance(module, nn.Linear):  # oneDNN on the CPU (snnadv.kernels.linear)
                y = linear(x4, module.weight, module.bias).unflatten(0, (T, B))
            else:
                y = module(x4).unflatten(0, (T, B))
        if module is self._first[0] and self._capture is not None:
            y = self._capture.attach(y)
        return y

    #: convolutions in the fused path take channels-last (NHWC) frames, and the scans,
    #: pooling and dropout keep that layout.  Measured on the 2-core CPU (oneDNN):
    #: a 128->128 3x3 convolution over 512 frames of 16x16, forward+backward, 311 ->
    #: 448 GFLOP/s in fp32 and 600 -> 844 in bf16.  (cuDNN also prefers NHWC for bf16.)
    channels_last = True

    #: values of the widest layer held at once when chunking automatically (without
    #: autograd; with it, see :meth:`chunk_for`): on a GPU 2^28 (1 GiB fp32), on a CPU
    #: 2^25.  Measured on the 2-core CPU, VGG5 at batch 16, with freed memory kept by
    #: glibc (:func:`snnadv.runtime.keep_freed_memory`, which the command line applies):
    #: inference at T=256, 8.2 / 9.2 / 9.9 / 10.1 / 9.9
    #: img/s at 4 / 8 / 16 / 32 / 64 steps per chunk (2^25 gives 32).  (Without that
    #: setting every fresh large tensor page-faults and small chunks won: 6.1 img/s at 4.)
    chunk_budget = {"cuda": 2 ** 28, "cpu": 2 ** 25}
    #: with autograd (training, attacks) BPTT keeps every step's saved tensors anyway, so
    #: chunks only bound the transient buffers (fp32 currents, gradients of a chunk):
    #: 2^28 values of the widest layer on every device (VGG5 at batch 64: 64 steps;
    #: on a GPU, T=2500 in one chunk would need ~40 GiB of transients per layer).
    #: Measured, CPU training step at batch 16: T=32: 0.62 s in chunks of 8, 0.60 s
    #: whole (bf16: 0.46 / 0.41 s); T=100: 2.30 / 2.08 / 1.96 s at 25 / 50 / 100.
    grad_chunk_budget = 2 ** 28

    def chunk_for(self, batch: int, num_steps: int, device_type: str = "cpu") -> int:
        """Timesteps per chunk: ``chunk_steps`` if set; else as many as fit the budget."""
        if self.chunk_steps:
            return self.chunk_steps
        if torch.is_grad_enabled():
            budget = self.grad_chunk_budget
        else:
            budget = self.chunk_budget.get(device_type, self.chunk_budget["cpu"])
        return max(1, min(num_steps, budget // (batch * self.spec.widest_activation())))

    def chunks(self, x: torch.Tensor | None, num_steps: int,
               frames: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """The time loop's input: the state is reset, then the input frames [n, B, ...] of
        each chunk of ``num_steps`` steps (``x`` encoded here, or given ``frames``
        [T, B, ...]); run each through :meth:`hidden` before asking for the next.  The
        encoder is told each chunk's first timestep (keyed spikes depend on the global
        timestep, not on the chunking: :func:`snnadv.encoding.encoder_keys`)."""
        self.reset_state()
        ref = x if x is not None else frames
        batch = ref.shape[0] if x is not None else ref.shape[1]
        chunk = 1 if self.mode == "reference" else self.chunk_for(batch, num_steps, ref.device.type)
        t0 = 0
        while t0 < num_steps:
            n = min(chunk, num_steps - t0)
            yield self.encoder(x, n, t0) if frames is None else frames[t0:t0 + n]
            t0 += n

    def hidden(self, h: torch.Tensor, until: str | None = None) -> torch.Tensor:
        """A chunk of frames through the hidden layers (up to the last spiking one), or up
        to the top-level layer holding the spiking layer ``until`` (e.g. ``"layer1_0.act1"``)."""
        stop = None if until is None else until.split(".")[0]
        if stop is not None and stop not in self._hidden:
            raise SnnadvError(f"no spiking layer named '{until}' in {self.spec.arch}")
        for name in self._hidden:
            h = self.layer(getattr(self, name), h)
            if name == stop:
                break
        return h

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """The layers after the last spiking one (linear, bias-free) on [n, B, ...]."""
        for name in self._tail:
            h = self.layer(getattr(self, name), h)
        return h

    def _run(self, x: torch.Tensor | None, num_steps: int, record_at: list[int],
             frames: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Accumulated output / t at each t in ``record_at`` (sorted, last = num_steps).

        The input is ``x`` (encoded here) or ready-made spike ``frames`` [T, B, ...].
        """
        acc = None  # summed output-layer input (fused) or summed output (reference)
        out, t0, want = [], 0, list(record_at)
        for h in self.chunks(x, num_steps, frames):
            n = h.shape[0]
            h = self.hidden(h)
            if self.mode == "reference":
                h = self.readout(h)
            csum = h.cumsum(0, dtype=torch.float32)  # counts and sums in fp32 (bf16 is exact only to 256)
            csum = csum if acc is None else acc.unsqueeze(0) + csum
            while want and want[0] <= t0 + n:
                t = want.pop(0)
                s = csum[t - t0 - 1]
                out.append((s if self.mode == "reference" else self.readout(s.unsqueeze(0))[0]).float() / t)
            acc = csum[-1]
            t0 += n
        return out

    def forward(self, x: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
        """Logits [B, classes] = accumulated output membrane / T, for images in [0, 1]."""
        T = check_steps(self.num_steps if num_steps is None else num_steps)
        return self._run(x, T, [T])[0]

    def forward_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Logits for given input spike frames [T, B, C, H, W] (no encoder)."""
        return self._run(None, frames.shape[0], [frames.shape[0]], frames)[0]

    def forward_curve(self, x: torch.Tensor, steps: list[int]) -> torch.Tensor:
        """Logits after each of ``steps`` timesteps of one run: [len(steps), B, classes]."""
        steps = sorted(set(int(s) for s in steps))
        check_steps(steps[0])
        return torch.stack(self._run(x, steps[-1], steps))

    def extra_repr(self) -> str:
        return f"arch={self.spec.arch}, num_steps={self.num_steps}, mode={self.mode}, neuron={self.neuron}"


class _AvgPool(torch.autograd.Function):
    """Average pooling of spike frames [N, C, H, W] that saves only the input's shape and
    layout for backward (autograd's own pooling keeps its input alive, a full spike
    tensor per pooling layer and chunk); same values and gradients as ``avg_pool2d``."""

    @staticmethod
    def forward(ctx, x, kernel_size):
        ctx.meta = (x.shape, x.dtype, x.device, _memory_format(x), kernel_size)
        return torch.nn.functional.avg_pool2d(x, kernel_size)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device, fmt, k = ctx.meta
        like = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)  # sizes and layout only
        return torch.ops.aten.avg_pool2d_backward(grad, like, k, k, 0, False, True, None), None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def check_steps(num_steps) -> int:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise SnnadvError(f"timesteps must be a positive integer, got {num_steps}")
    return num_steps
