"""The ANN built from an :class:`~snnadv.models.spec.ArchSpec` (ReLU activations).

Module names follow the spec (``conv1``, ``layer2_0.conv1``, ``classifier``...), so the
SNN built from the same spec has the same parameter names and loads this
``state_dict`` directly.  Input: images in [0, 1]; optional b-bit quantisation and
[-1, 1] normalisation happen inside the model (``input_bits``, ``input_range``), so
attacks always work in pixel space.
"""

from __future__ import annotations

import torch
from torch import nn

from ..values import parse_precision
from ..encoding import check_bits, normalize, quantize
from .spec import Act, ArchSpec, AvgPool, Block, Conv, Dropout, Flatten, Linear


def make_layer(layer, act, dropout) -> nn.Module:
    """The module for one spec record; ``act()`` and ``dropout(p)`` differ ANN vs SNN."""
    if isinstance(layer, Conv):
        return nn.Conv2d(layer.cin, layer.cout, layer.k, layer.stride, layer.pad, bias=False)
    if isinstance(layer, Linear):
        return nn.Linear(layer.fin, layer.fout, bias=False)
    if isinstance(layer, Act):
        return act()
    if isinstance(layer, AvgPool):
        return nn.AvgPool2d(layer.k)
    if isinstance(layer, Dropout):
        return dropout(layer.p)
    if isinstance(layer, Flatten):
        return nn.Flatten()
    if isinstance(layer, Block):
        return BasicBlock(layer, act, dropout)
    raise TypeError(f"unknown layer record {layer!r}")


class BasicBlock(nn.Module):
    """Residual block: act2(conv2(drop(act1(conv1(x)))) + shortcut(x))."""

    def __init__(self, b: Block, act, dropout):
        super().__init__()
        self.conv1 = nn.Conv2d(b.cin, b.cout, 3, b.stride, 1, bias=False)
        self.act1 = act()
        self.drop = dropout(b.p)
        self.conv2 = nn.Conv2d(b.cout, b.cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(b.cin, b.cout, 1, b.stride, 0, bias=False) if b.projection else nn.Identity()
        self.act2 = act()

    def forward(self, x, apply=None):
        """``apply(module, x)`` runs one sub-module (the SNN passes its time-aware one)."""
        apply = apply or (lambda m, v: m(v))
        h = apply(self.drop, apply(self.act1, apply(self.conv1, x)))
        return apply(self.act2, apply(self.conv2, h) + apply(self.shortcut, x))


class ANN(nn.Module):
    """A non-spiking network: ``logits = model(images in [0, 1])``."""

    kind = "ann"

    def __init__(self, spec: ArchSpec, input_bits: int | None = None, input_range: str = "unit",
                 precision: str = "fp32"):
        super().__init__()
        parse_precision(precision)
        self.spec = spec
        self.precision = precision  # bf16: autocast of convolutions and linear layers; logits in fp32
        self.input_bits = check_bits(input_bits)
        self.input_range = input_range
        for layer in spec.layers:
            self.add_module(layer.name, make_layer(layer, lambda: nn.ReLU(inplace=False), nn.Dropout))
        # He initialisation (fan-out for convolutions as the hybrid-training code; fan-in
        # for linear layers, where the code's N(0, 0.01) learned 2x slower without BN)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(quantize(x, self.input_bits), self.input_range)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            for layer in self.spec.layers:
                x = getattr(self, layer.name)(x)
        return x.float()
