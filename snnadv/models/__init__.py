"""Paper architectures (VGG5, VGG11, ResNet20) as ANNs and SNNs from one spec."""

from .ann import ANN
from .probes import record_spikes
from .snn import SNN
from .spec import ARCHS, ArchSpec, get_spec

__all__ = ["ANN", "SNN", "ARCHS", "ArchSpec", "get_spec", "record_spikes"]
