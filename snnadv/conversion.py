"""ANN -> SNN conversion by threshold balancing (paper Sec. 2.2; Sengupta et al. 2019).

The converted network (SNN-conv) keeps the ANN's weights and replaces every ReLU by
an IF neuron (leak 1, soft reset; the registered ``lif`` neuron by default, or any
registered neuron: :attr:`ConversionSettings.neuron`).  Thresholds are balanced one
spiking layer after another: with the thresholds found so far in place, the network
is run on rate-encoded training images for T steps, and the next layer's threshold is
the maximum (default) or a chosen percentile of its *input current* (the term
sum_i w_i x_i(t) of Eq. 3) over all timesteps, neurons and N training batches.
The output layer has no threshold.

The percentile is exact: :class:`TopK` keeps the k largest values of the stream
(k = the number of values above the percentile), so no histogram binning error.
For ResNets the original code balanced only the stem and left the residual
layers at 1.0; that is ``balance="stem"`` here, and the default ``"all"`` balances
every spiking layer.

Many processes (:mod:`snnadv.parallel`): batch i is balanced by rank i mod N and its
encoder spikes come from a seed of its own (drawn once from the generator, plus i),
so every batch is encoded the same whichever rank runs it; the maximum is an
all-reduce and the percentile the top k of every rank's candidates (each rank's top
k contains its share of the global top k), so the thresholds equal one process's on
the same batches.

The thresholds are found as they are; ``scale`` (0.7 in the original code) is kept
beside them and applied by fine-tuning, which starts from the scaled thresholds.

This module computes only: the ``snnadv convert`` stage (:mod:`snnadv.convert`)
reads the checkpoint and the data, reports, and saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .batching import to_float
from .encoding import encoder_seed
from .errors import SnnadvError
from .evaluation import accuracy_curve_on
from .models import SNN, ArchSpec
from .models.spec import Block
from .parallel import all_reduce, gather_cat, world
from .registry import NEURONS

BALANCE = ("all", "stem")

#: ``progress(n, info)``: n more units of work done (e.g. a Reporter's ``advance``)
Progress = Callable[..., None]


@dataclass(frozen=True)
class ConversionSettings:
    """What a conversion needs (the ``[convert]`` settings that are not I/O).

    timesteps: T of the balancing runs (and the converted model's default T);
    percentile: of each layer's input current, in (0, 100] (100: the maximum);
    scale: the threshold scale fine-tuning starts from (stored, not applied here);
    batches: training batches to balance on; balance: ``all`` | ``stem``;
    neuron: the registered neuron of the converted network (``lif``: IF at leak 1).
    """

    timesteps: int = 2500
    percentile: float = 100.0
    scale: float = 0.7
    batches: int = 1
    balance: str = "all"
    neuron: str = "lif"

    def __post_init__(self):
        for key in ("timesteps", "batches", "scale"):
            if not getattr(self, key) > 0:
                raise SnnadvError(f"{key} must be positive, got {getattr(self, key)}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise SnnadvError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.balance not in BALANCE:
            raise SnnadvError(f"unknown balance mode '{self.balance}' (choose all or stem)")
        if self.neuron not in NEURONS:
            raise SnnadvError(NEURONS.unknown(self.neuron))

    @classmethod
    def from_config(cls, cfg: dict) -> "ConversionSettings":
        """The settings of a resolved ``convert`` config."""
        return cls(timesteps=int(cfg["timesteps"]), percentile=float(cfg["percentile"]), scale=float(cfg["scale"]),
                   batches=int(cfg["batches"]), balance=cfg["balance"], neuron=cfg.get("neuron") or "lif")


class TopK:
    """The exact ``percentile`` of a stream of ``total`` values, keeping only the top k."""

    def __init__(self, percentile: float, total: int):
        self.k = max(1, math.ceil((1.0 - percentile / 100.0) * total))
        self.values = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().float()
        if self.values is not None and len(self.values) >= self.k:
            x = x[x > self.values.min()]  # cannot enter the top k
            x = torch.cat([self.values, x])
        elif self.values is not None:
            x = torch.cat([self.values, x])
        if len(x) > self.k:
            x = torch.topk(x, self.k, sorted=False).values
        self.values = x

    def value(self) -> float:
        return float(self.values.min()) if len(self.values) >= self.k else float(self.values.max())



def merged(tracker: TopK | None) -> TopK:
    """The top k of every rank's :class:`TopK` (``tracker`` itself in a single process):
    the same percentile as one tracker that saw all the ranks' streams.  A rank that saw
    nothing (``None``: fewer batches than ranks) still takes part."""
    if not world().distributed:
        return tracker
    k = int(all_reduce(torch.tensor([tracker.k if tracker else 0]), "max"))
    values = tracker.values if tracker is not None and tracker.values is not None else torch.zeros(0)
    out = TopK(100.0, 1)
    out.k = k
    out.add(gather_cat(values.float().cpu()))
    return out


def build_snn(spec: ArchSpec, settings: ConversionSettings, *, input_bits: int | None = None,
              input_range: str = "unit", chunk_steps: int | None = None, precision: str = "fp32") -> SNN:
    """The network to convert into (weights still to be loaded): ``settings.neuron`` at
    leak 1.0 with a soft reset, every threshold 1.0."""
    return SNN(spec, num_steps=settings.timesteps, leak=1.0, reset="subtract", input_bits=input_bits,
               input_range=input_range, chunk_steps=chunk_steps, precision=precision, neuron=settings.neuron,
               kind="snn-conv")


def spiking_layers(spec: ArchSpec, balance: str, names: list[str]) -> list[str]:
    """Which spiking layers to balance: ``all``, or ``stem`` (the non-residual ones)."""
    if balance == "all":
        return names
    if balance == "stem":
        blocks = {l.name for l in spec.layers if isinstance(l, Block)}
        return [n for n in names if n.split(".")[0] not in blocks]
    raise SnnadvError(f"unknown balance mode '{balance}' (choose all or stem)")


def balance_thresholds(snn: SNN, images: list[torch.Tensor], num_steps: int, percentile: float = 100.0,
                       layers: list[str] | None = None, progress: Progress | None = None,
                       generator: torch.Generator | None = None) -> dict[str, float]:
    """Balance the thresholds of ``snn`` (in place, layer by layer); returns them.

    ``images``: the training batches (float, [0, 1]) to balance on.  ``layers``: the
    spiking layers to balance (default all); the others keep their threshold.  Batch i
    is encoded with seed ``s + i``, ``s`` drawn once from ``generator`` (the global RNG
    without one); ``progress(1, layer)`` after every batch.  Each run is the SNN's own
    time loop, chunk by chunk, up to the balanced layer.  Under torchrun each rank runs
    its batches (i mod N) and the thresholds are combined exactly (module docstring).
    """
    names = snn.neuron_names
    layers = names if layers is None else layers
    mods = dict(snn.named_modules())
    was_training = snn.training
    snn.eval()
    per_batch = num_steps * len(images)
    w = world()
    base = int(torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu"))
    device = next(snn.parameters()).device
    try:
        with torch.no_grad():
            for name in layers:
                tracker = None

                def record(current):
                    nonlocal tracker
                    if tracker is None:
                        tracker = TopK(percentile, current[0].numel() * per_batch)
                    tracker.add(current)

                handle = mods[name].register_current_hook(record)
                try:
                    for i, x in enumerate(images):
                        if i % w.size == w.rank:
                            with encoder_seed(snn, base + i, device):
                                for frames in snn.chunks(x, num_steps):
                                    snn.hidden(frames, until=name)  # upstream state carries to the next chunk
                        if progress is not None:
                            progress(1, name)
                finally:
                    handle.remove()
                thr = merged(tracker).value()
                if not thr > 0:
                    raise SnnadvError(f"layer {name} received no positive input during balancing "
                                      f"(threshold {thr}); the ANN may be untrained")
                mods[name].set_threshold(thr)
    finally:
        snn.train(was_training)
    return snn.thresholds()


def balance(snn: SNN, images: list[torch.Tensor], settings: ConversionSettings,
            generator: torch.Generator | None = None, progress: Progress | None = None) -> dict[str, float]:
    """Balance the thresholds of ``snn`` (the ANN's weights loaded, e.g. from
    :func:`build_snn`) on ``images`` as ``settings`` say; returns the thresholds."""
    layers = spiking_layers(snn.spec, settings.balance, snn.neuron_names)
    return balance_thresholds(snn, images, settings.timesteps, settings.percentile, layers, progress, generator)


def accuracy_curve(snn: SNN, split, steps: list[int], batch_size: int, seed: int,
                   progress: Progress | None = None) -> dict[int, float]:
    """Test accuracy (%) after each of ``steps`` timesteps, from one run per image with
    draw 0 of :func:`snnadv.evaluation.accuracy` at ``seed`` (its last step equals that
    accuracy at that T): keyed spikes, the images shared out under torchrun."""
    return accuracy_curve_on(snn, to_float(split.images), split.labels, steps, batch_size, seed, progress)
