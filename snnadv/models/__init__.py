"""Paper architectures (VGG5, VGG11, ResNet20) as ANNs and SNNs from one spec."""

from .ann import ANN
from .snn import SNN, record_spikes
from .spec import ARCHS, ArchSpec, get_spec

__all__ = ["ANN", "SNN", "ARCHS", "ArchSpec", "get_spec", "record_spikes"]
