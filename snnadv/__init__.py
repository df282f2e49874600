"""snnadv: adversarial robustness of deep spiking neural networks, on snnTorch.

Reproduces Sharmin et al., "Inherent adversarial robustness of deep spiking neural
networks" (ECCV 2020).  Pipeline: train an ANN, convert it to an SNN by threshold
balancing (SNN-conv), fine-tune it with spike-based backpropagation (SNN-BP), and
attack all three.  ``snnadv.load_model(path)`` returns a ready model from any
stage's checkpoint.

Extending it: a new neuron, surrogate, attack, gradient path or architecture is one
file with one decorator (:mod:`snnadv.registry`), e.g. ``@snnadv.register_attack("name")``;
modules outside the package are found through the ``snnadv.plugins`` entry-point
group or the ``SNNADV_PLUGINS`` variable.
"""

from .registry import (ARCHITECTURES, ATTACKS, GRADIENTS, NEURONS, SURROGATES, load_plugins, register_architecture,
                       register_attack, register_gradient, register_neuron, register_surrogate)

__version__ = "0.1.0"


def load_model(path, device="cpu", **overrides):
    """A ready ``nn.Module`` (images in [0, 1] -> logits) from any stage's checkpoint."""
    from .checkpoint import load_model as _load

    return _load(path, device=device, **overrides)


__all__ = ["__version__", "load_model", "register_neuron", "register_surrogate", "register_attack",
           "register_gradient", "register_architecture", "load_plugins", "NEURONS", "SURROGATES", "ATTACKS",
           "GRADIENTS", "ARCHITECTURES"]
