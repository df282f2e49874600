"""Declarative architecture specs (paper Sec. 3.1).

An architecture is a flat list of layer records.  :mod:`snnadv.models.ann` builds an
ANN from it (``Act`` -> ReLU) and :mod:`snnadv.models.snn` builds an SNN from the
same list (``Act`` -> spiking neuron), with identical module names, so an ANN
``state_dict`` loads into the SNN layer for layer and conversion can walk the
activations in order.

Conventions shared by every architecture (paper Sec. 3.1):

* no bias anywhere (biases would shift the thresholds found by balancing);
* average pooling, never max pooling (a max over spikes is not a rate);
* no batch norm; a dropout layer after every ReLU that is not followed by pooling;
* the last layer is a ``Linear`` without activation: in the SNN it integrates its
  input without threshold and the logits are its accumulated membrane / T.

Choices where the paper is ambiguous (see ``reference-notes.md``):

* **VGG11** is configuration A of Simonyan & Zisserman (8 convs + 3 FC) with
  max-pool replaced by avg-pool.  On 32x32 inputs the fifth pool is dropped, so the
  classifier sees 512x2x2 features (fc 2048->4096->4096->classes), as the hybrid
  training code does for CIFAR; a 1x1 map would throw away the last spatial layout.
* **ResNet20** is He et al.'s CIFAR ResNet (3 stages x 3 basic blocks, 16/32/64
  channels, global average pooling, one FC) with the stem "replaced by a series of
  two 3x3 convolutions" (paper text): conv3-16, conv3-16.  That is 21 weight layers
  on the main path (2 + 18 + 1); downsampling shortcuts are 1x1 convolutions with
  stride 2 (He et al.'s option B: a projection keeps the shortcut a synaptic layer
  an SNN can carry spikes through).  Inside a block: conv-ReLU-dropout-conv, add the
  shortcut, ReLU.  The block's output ReLU has no dropout: it feeds the identity
  shortcut of the next block, and dropping it would drop the residual stream.
  The original code's "ResNet20" is a wider, different network; this one follows
  the cited paper.

Dropout rates are 0.2 after convolutions and 0.5 after fully connected layers
(the hybrid-training code's values), kept in the spec so a config can change them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Union

from ..registry import ARCHITECTURES, register_architecture


@dataclass(frozen=True)
class Conv:
    name: str
    cin: int
    cout: int
    k: int = 3
    stride: int = 1
    pad: int = 1


@dataclass(frozen=True)
class Linear:
    name: str
    fin: int
    fout: int


@dataclass(frozen=True)
class Act:
    """A ReLU in the ANN, a spiking neuron in the SNN."""

    name: str


@dataclass(frozen=True)
class AvgPool:
    name: str
    k: int


@dataclass(frozen=True)
class Dropout:
    name: str
    p: float


@dataclass(frozen=True)
class Flatten:
    name: str


@dataclass(frozen=True)
class Block:
    """Residual basic block: act2(conv2(drop(act1(conv1 x))) + shortcut(x))."""

    name: str
    cin: int
    cout: int
    stride: int = 1
    p: float = 0.2

    @property
    def projection(self) -> bool:
        return self.stride != 1 or self.cin != self.cout


Layer = Union[Conv, Linear, Act, AvgPool, Dropout, Flatten, Block]

_KIND = {c.__name__: c for c in (Conv, Linear, Act, AvgPool, Dropout, Flatten, Block)}


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: a name, its input size, and its layers in order."""

    arch: str
    num_classes: int
    layers: tuple = field(default_factory=tuple)
    in_channels: int = 3
    image_size: int = 32

    def to_dict(self) -> dict:
        """Plain data (for checkpoints: loadable with ``weights_only=True``)."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "layers": [dict(asdict(l), kind=type(l).__name__) for l in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ArchSpec":
        layers = []
        for rec in d["layers"]:
            rec = dict(rec)
            layers.append(_KIND[rec.pop("kind")](**rec))
        return cls(d["arch"], d["num_classes"], tuple(layers), d.get("in_channels", 3), d.get("image_size", 32))

    def widest_activation(self) -> int:
        """The largest number of values one layer produces per image (for memory planning)."""
        c, size, widest = self.in_channels, self.image_size, self.in_channels * self.image_size ** 2
        for l in self.layers:
            if isinstance(l, (Conv, Block)):
                c, size = l.cout, size // l.stride
            elif isinstance(l, AvgPool):
                size //= l.k
            elif isinstance(l, Linear):
                c, size = l.fout, 1
            widest = max(widest, c * size * size)
        return widest

    @property
    def activations(self) -> list[str]:
        """Names of the spiking layers in forward order (blocks contribute two)."""
        out = []
        for l in self.layers:
            if isinstance(l, Act):
                out.append(l.name)
            elif isinstance(l, Block):
                out += [f"{l.name}.act1", f"{l.name}.act2"]
        return out


def _vgg(arch: str, cfg: list, fc: list[int], num_classes: int, p_conv=0.2, p_fc=0.5) -> ArchSpec:
    """Build a VGG spec from a channel list ('A' = avg-pool) and FC widths."""
    layers: list = []
    cin, size, n = 3, 32, 0
    for i, c in enumerate(cfg):
        if c == "A":
            layers.append(AvgPool(f"pool{len([l for l in layers if isinstance(l, AvgPool)]) + 1}", 2))
            size //= 2
            continue
        n += 1
        layers.append(Conv(f"conv{n}", cin, c))
        layers.append(Act(f"act{n}"))
        if i + 1 >= len(cfg) or cfg[i + 1] != "A":
            layers.append(Dropout(f"drop{n}", p_conv))
        cin = c
    layers.append(Flatten("flatten"))
    fin = cin * size * size
    for width in fc:
        n += 1
        layers += [Linear(f"fc{n}", fin, width), Act(f"act{n}"), Dropout(f"drop{n}", p_fc)]
        fin = width
    layers.append(Linear("classifier", fin, num_classes))
    return ArchSpec(arch, num_classes, tuple(layers))


@register_architecture("vgg5")
def vgg5(num_classes: int = 10) -> ArchSpec:
    """VGG5: conv3-64, avgpool, conv3-128 (x2), avgpool, fc1024 (x2), fc-classes."""
    return _vgg("vgg5", [64, "A", 128, 128, "A"], [1024, 1024], num_classes)


@register_architecture("vgg11")
def vgg11(num_classes: int = 100) -> ArchSpec:
    """VGG11 (configuration A, avg-pool, fifth pool dropped for 32x32 inputs)."""
    return _vgg("vgg11", [64, "A", 128, "A", 256, 256, "A", 512, 512, "A", 512, 512], [4096, 4096], num_classes)


@register_architecture("resnet20")
def resnet20(num_classes: int = 10) -> ArchSpec:
    """ResNet20 for CIFAR with a two-conv 3x3 stem (see module docstring)."""
    layers: list = [
        Conv("conv1", 3, 16), Act("act1"), Dropout("drop1", 0.2),
        Conv("conv2", 16, 16), Act("act2"), Dropout("drop2", 0.2),
    ]
    cin = 16
    for stage, cout in enumerate([16, 32, 64], start=1):
        for b in range(3):
            stride = 2 if (b == 0 and stage > 1) else 1
            layers.append(Block(f"layer{stage}_{b}", cin, cout, stride))
            cin = cout
    layers += [AvgPool("pool", 8), Flatten("flatten"), Linear("classifier", 64, num_classes)]
    return ArchSpec("resnet20", num_classes, tuple(layers))


@register_architecture("tiny")
def tiny(num_classes: int = 10) -> ArchSpec:
    """A small VGG-style net for tests and quick demos (not from the paper)."""
    return _vgg("tiny", [8, "A", 16, "A"], [64], num_classes)


#: name -> ``num_classes -> ArchSpec`` (the registry: plugins' architectures included)
ARCHS = ARCHITECTURES


def get_spec(arch: str, num_classes: int) -> ArchSpec:
    """The spec of a registered architecture for ``num_classes`` outputs (an unknown
    name: one line listing the registered ones)."""
    return ARCHITECTURES[arch](num_classes)
