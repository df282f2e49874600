"""Surrogate gradients of a spike (paper Eq. 4, and the linear and fast-sigmoid ones).

A spike ``s = H(u - thr)`` has no useful derivative; a *surrogate* replaces ds/du in
the backward pass (the forward is unchanged).  Each surrogate is a
:class:`Surrogate` subclass registered by name (``@register_surrogate("name")``,
:data:`snnadv.registry.SURROGATES`), chosen per model and changeable after training
(an attack may use a different one, :mod:`snnadv.gradients`).  The built-ins:

* ``stdb`` (Eq. 4): ds/du = alpha * exp(-beta * dt), independent of ``u``; dt = the
  number of timesteps since the neuron's last spike, counted so that a spike at
  step t-1 gives dt = 1 at step t.  Before a neuron's first spike dt = dt_init + t
  (dt_init = 1000, as the original code's "last spike at -1000"): a neuron that has
  not fired yet gets a near-zero gradient (0.3 * exp(-10) ~ 1.4e-5), because there
  is no spike time to be sensitive to; after its first spike it learns.
* ``linear``: ds/du = gamma * max(0, 1 - |u/thr - 1|), a triangle centred on the
  threshold (gamma = 0.3).  The original code differentiates w.r.t. u/thr, which
  adds a factor 1/thr; here the derivative is w.r.t. u, as written in the issue.
* ``fast-sigmoid``: ds/du = 1 / (1 + k |u - thr|)^2 (snnTorch's fast sigmoid), of
  adjustable sharpness k; a smooth choice for adaptive attacks.

snnTorch's own surrogate functions (``snntorch.surrogate.fast_sigmoid(slope=25)``, ...)
are callables, not :class:`Surrogate` objects; :func:`from_snntorch` maps the ones
that have a built-in equivalent (fast_sigmoid -> ``fast-sigmoid`` with its slope).
"""

from __future__ import annotations

import inspect
import math

import torch

from .registry import SURROGATES, register_surrogate


class Surrogate:
    """A surrogate derivative ds/du.  Subclasses define :meth:`grad`.

    ``needs_mem``: whether :meth:`grad` reads the membrane (the fused scan then keeps it
    for backward); ``name``: the registered name (checkpoints record it).
    """

    name = "base"
    needs_mem = True

    def grad(self, mem: torch.Tensor, thr: torch.Tensor | float, dt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({inner})"


@register_surrogate("stdb")
class SpikeTime(Surrogate):
    """Eq. 4: ds/du = alpha * exp(-beta * dt), dt = steps since the last spike."""

    name = "stdb"
    needs_mem = False

    def __init__(self, alpha: float = 0.3, beta: float = 0.01):
        self.alpha, self.beta = float(alpha), float(beta)
        self.after_spike()  # computed here, not in a backward pass

    def grad(self, mem, thr, dt):
        return self.alpha * torch.exp(-self.beta * dt)

    def step_decay(self) -> float:
        """exp(-beta): the factor by which ds/du shrinks per step without a spike
        (the fused scans carry ds/du as a running product instead of dt)."""
        return math.exp(-self.beta)

    def after_spike(self) -> float:
        """ds/du one step after a spike (dt = 1), as :meth:`grad` computes it in fp32;
        a Python float, so the fused scan reads no device value per call."""
        if getattr(self, "_fresh", (None,))[0] != (self.alpha, self.beta):
            value = float(self.grad(None, None, torch.ones(1)))  # once, on the CPU
            self._fresh = ((self.alpha, self.beta), value)
        return self._fresh[1]

    def params(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}


@register_surrogate("linear")
class LinearSurrogate(Surrogate):
    """ds/du = gamma * max(0, 1 - |u / thr - 1|)."""

    name = "linear"

    def __init__(self, gamma: float = 0.3):
        self.gamma = float(gamma)

    def grad(self, mem, thr, dt):
        return self.gamma * torch.clamp(1.0 - torch.abs(mem / thr - 1.0), min=0.0)


@register_surrogate("fast-sigmoid")
class FastSigmoid(Surrogate):
    """ds/du = 1 / (1 + k |u - thr|)^2 (smooth; k sets the sharpness)."""

    name = "fast-sigmoid"

    def __init__(self, slope: float = 5.0):
        self.slope = float(slope)

    def grad(self, mem, thr, dt):
        return 1.0 / (1.0 + self.slope * torch.abs(mem - thr)) ** 2


def make_surrogate(name: str = "stdb", **params) -> Surrogate:
    """A registered surrogate by name (``stdb`` | ``linear`` | ``fast-sigmoid`` | a plugin's)
    with its parameters.

    Parameters that the chosen surrogate does not take are ignored, so callers can
    pass ``alpha``, ``beta``, ``gamma`` and ``slope`` together from a config.
    """
    cls = SURROGATES[name]  # an unknown name: a one-line RegistryError with the choices
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in params.items() if k in accepted and v is not None})


def surrogate_from_dict(d: dict) -> Surrogate:
    d = dict(d)
    return make_surrogate(d.pop("name"), **d)


def surrogate_to_dict(s: Surrogate) -> dict:
    return {"name": s.name, **s.params()}


def from_snntorch(fn) -> Surrogate | None:
    """The built-in surrogate equal to an snnTorch ``spike_grad`` function, or None.

    Recognised: ``snntorch.surrogate.fast_sigmoid(slope=k)`` (its backward is
    1 / (1 + k |u - thr|)^2, :class:`FastSigmoid` with the same k).  Other snnTorch
    surrogates have no built-in twin (the fused scan cannot run them).
    """
    code = getattr(fn, "__code__", None)
    if getattr(fn, "__module__", None) != "snntorch.surrogate" or code is None or not fn.__closure__:
        return None
    enclosed = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__)))
    if fn.__qualname__ == "fast_sigmoid.<locals>.inner" and "slope" in enclosed:
        return FastSigmoid(enclosed["slope"])
    return None


# --------------------------------------------------------------------------- attack-time only
# The two surrogates below belong to attack-time gradient estimators (snnadv.gradients: the
# ``hart`` and ``pdsg`` paths).  They are not registered: HART's width is relative to each
# layer's threshold and PDSG's is recomputed per layer and timestep from membrane statistics,
# which the fused scans (and a checkpoint's surrogate setting) have no way to supply.


class Triangle(Surrogate):
    """HART's triangle (Hao et al., ICLR 2024): ds/du = max(0, w - |u - thr|) / w^2.

    The width is relative to the layer's threshold, ``w = gamma * thr`` (HART's code has
    thr = 1 and w = gamma); the area under the triangle is 1 for every ``gamma``.  A narrow
    triangle passes gradient only at timesteps whose membrane is close to the threshold
    (temporal information); a wide one passes nearly the same gradient at every timestep
    (rate information).
    """

    name = "triangle"

    def __init__(self, gamma: float = 1.0):
        if not gamma > 0:
            raise ValueError(f"the triangle's width must be positive, got {gamma}")
        self.gamma = float(gamma)

    def grad(self, mem, thr, dt):
        w = self.gamma * thr
        return torch.clamp(w - torch.abs(mem - thr), min=0.0) / (w * w)


class ShiftedGaussian(Surrogate):
    """PDSG's surrogate (Lun et al., CVPR 2025): a Gaussian density of the distance above
    threshold, centred at sigma / 2, of standard deviation sigma:

        ds/du = exp(-((u - thr - sigma/2) / (sqrt(2) sigma))^2) / (sqrt(2 pi) sigma)

    ``sigma``: a number or a tensor broadcastable to the membrane (PDSG: the standard
    deviation of the layer's membrane potentials, per channel, see
    :func:`snnadv.paths.pdsg.pdsg_sigma`).
    """

    name = "shifted-gaussian"

    def __init__(self, sigma: float | torch.Tensor = 1.0):
        self.sigma = sigma

    def grad(self, mem, thr, dt):
        s = self.sigma
        z = (mem - thr - 0.5 * s) / (math.sqrt(2.0) * s)
        return torch.exp(-z * z) / (math.sqrt(2.0 * math.pi) * s)
