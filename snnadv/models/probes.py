"""What tools observe inside a running SNN (:class:`snnadv.models.SNN`): the spikes of
every layer (:func:`record_spikes`) and Algorithm 1's first-layer gradient
(:class:`FirstLayerGradients`, through :meth:`snnadv.models.SNN.capture_first_layer`).
Both are scoped: nothing stays attached to the model after the block."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
from torch import nn

from ..neurons import Neuron


class FirstLayerGradients:
    """Alg. 1's capture (:meth:`SNN.capture_first_layer`): a 0-d zero ``leaf`` is added to
    the first layer's output of every chunk (exact: it adds zero), and a hook sums each
    chunk's dJ/d(output) over its frames in fp32 into ``chunks`` (chunk -> sum; None for
    a chunk the loss does not reach), so neither the output nor its gradient outlives
    its chunk, and a backward pass towards ``leaf`` computes no weight gradient."""

    def __init__(self, device):
        self.leaf = torch.zeros((), device=device, requires_grad=True)
        self.chunks: dict[int, torch.Tensor | None] = {}

    def attach(self, y: torch.Tensor) -> torch.Tensor:
        y = y + self.leaf
        chunk = len(self.chunks)
        self.chunks[chunk] = None
        y.register_hook(lambda g, _c=chunk: self.chunks.__setitem__(_c, g.sum(0, dtype=torch.float32)))
        return y

    def total(self) -> torch.Tensor:
        """sum over t of dJ/d(first-layer output)(t) [B, ...], the chunks added in time order."""
        sums = [self.chunks[c] for c in sorted(self.chunks)]
        return sum(g for g in sums if g is not None)


class SpikeRecord:
    """Spikes counted by :func:`record_spikes`: per spiking layer (by module name),
    ``counts`` [B, ...] (spikes summed over time, fp32: exact whatever the precision)
    and ``steps`` (the timesteps counted)."""

    def __init__(self):
        self.counts: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}

    def add(self, name: str, spikes: torch.Tensor) -> None:
        count = spikes.sum(0, dtype=torch.float32)  # counts in fp32 (bf16 is exact only to 256)
        self.counts[name] = count + self.counts[name] if name in self.counts else count
        self.steps[name] = self.steps.get(name, 0) + spikes.shape[0]

    def rates(self) -> dict[str, torch.Tensor]:
        """Spike rate of every neuron (spikes per step) [B, ...], per layer."""
        return {n: c / self.steps[n] for n, c in self.counts.items()}

    def mean_rates(self) -> dict[str, float]:
        """Mean spike rate of every layer (spikes per neuron per step)."""
        return {n: float(c.sum(dtype=torch.float64)) / max(float(self.steps[n] * c.numel()), 1.0)
                for n, c in self.counts.items()}


@contextmanager
def record_spikes(model: nn.Module) -> Iterator[SpikeRecord]:
    """``with record_spikes(model) as spikes: model(x)``: count the spikes of every
    :class:`~snnadv.neurons.Neuron` in ``model`` while the block runs (the model's own
    time loop, any mode or chunking); the hooks are gone afterwards."""
    record = SpikeRecord()
    handles = [m.register_spike_hook(partial(record.add, name))
               for name, m in model.named_modules() if isinstance(m, Neuron)]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()
