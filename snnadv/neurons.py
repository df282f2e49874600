"""Spiking neurons (paper Eq. 3) and their surrogate gradients (Eq. 4 and linear).

The neuron :class:`LIF` subclasses :class:`snntorch.Leaky` and keeps its contract:
``spk, mem = neuron(input_, mem)`` one timestep at a time, state held in the module
(``mem``, plus ``dt`` added here), reset by :func:`reset_state`.  It adds

* the spike-time-dependent surrogate of Eq. 4, which needs the time since the
  neuron's last spike, so ``dt`` is carried as state beside ``mem``;
* a linear (triangle) surrogate and a smooth fast-sigmoid one, all chosen per
  model and changeable after training (an attack may use a different one);
* :meth:`LIF.multistep`, all T timesteps of a layer at once through the fused scan
  of :mod:`snnadv.kernels.scan`; the single-step ``forward`` is the reference.

Dynamics, one step (Eq. 3 with snnTorch's reset convention; ``s`` = spike):

    soft reset ("subtract", the paper's default):
        u[t] = lam * u[t-1] + I[t] - thr * s[t-1]
    hard reset ("zero", reset to 0):
        u[t] = lam * (1 - s[t-1]) * u[t-1] + I[t]
    s[t] = H(u[t] - thr)            (fires when u exceeds thr, strictly)

``lam`` (snnTorch's ``beta``) is the leak: 1.0 is an IF neuron, < 1 an LIF neuron.
The spike is taken from the membrane *after* this step's input is integrated (Eq. 3;
the original code's one-step delay is not reproduced).  The reset is applied at the
next step and carries no gradient (snnTorch and the original code both detach it).
The subtracted threshold is not leaked, as in snnTorch; for IF neurons this is
exactly the textbook "integrate, fire, subtract".

Surrogates (backward of ``s = H(u - thr)``):

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
"""

from __future__ import annotations

import math

import snntorch as snn
import torch
from torch import nn

from .errors import SnnadvError
from .registry import SURROGATES as REGISTERED_SURROGATES, register_surrogate

DT_INIT = 1000.0


class Surrogate:
    """A surrogate derivative ds/du.  Subclasses define :meth:`grad`."""

    name = "base"
    needs_mem = True  # whether grad() reads the membrane (the scan then keeps it)

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


SURROGATES = {"stdb": SpikeTime, "linear": LinearSurrogate, "fast-sigmoid": FastSigmoid}


def make_surrogate(name: str = "stdb", **params) -> Surrogate:
    """A surrogate by name (``stdb`` | ``linear`` | ``fast-sigmoid``) with its parameters.

    Parameters that the chosen surrogate does not take are ignored, so callers can
    pass ``alpha``, ``beta``, ``gamma`` and ``slope`` together from a config.
    """
    if name not in REGISTERED_SURROGATES:
        raise SnnadvError(REGISTERED_SURROGATES.unknown(name))
    cls = REGISTERED_SURROGATES[name]
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in params.items() if k in accepted and v is not None})


def surrogate_from_dict(d: dict) -> Surrogate:
    d = dict(d)
    return make_surrogate(d.pop("name"), **d)


def surrogate_to_dict(s: Surrogate) -> dict:
    return {"name": s.name, **s.params()}


class _Spike(torch.autograd.Function):
    """s = H(u - thr) forward; the surrogate's ds/du backward (single step)."""

    @staticmethod
    def forward(ctx, mem, thr, dt, surrogate):
        ctx.save_for_backward(mem, dt)
        ctx.thr, ctx.surrogate = thr, surrogate
        return (mem > thr).to(mem.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        mem, dt = ctx.saved_tensors
        return grad_out * ctx.surrogate.grad(mem, ctx.thr, dt), None, None, None


RESETS = {"subtract": "subtract", "soft": "subtract", "zero": "zero", "hard": "zero"}


class LIF(snn.Leaky):
    """Leaky integrate-and-fire neuron with spike-time surrogate (Eq. 3, Eq. 4).

    Args:
        leak: lambda of Eq. 3 (snnTorch's ``beta``); 1.0 makes an IF neuron.
        threshold: the layer's firing threshold (a scalar buffer; not learned).
        reset: ``"subtract"`` (soft, default) or ``"zero"`` (hard).
        surrogate: a :class:`Surrogate` (default: Eq. 4 with alpha=0.3, beta=0.01).
        dt_init: dt before the first spike (see the module docstring).

    State: ``mem`` (membrane, as in snnTorch) and ``dt`` (float tensor of whole
    numbers: steps since the last spike).  Both are cleared by :meth:`reset_state`.
    """

    def __init__(self, leak: float = 0.99, threshold: float = 1.0, reset: str = "subtract",
                 surrogate: Surrogate | None = None, dt_init: float = DT_INIT):
        if not 0.0 < float(leak) <= 1.0:
            raise SnnadvError(f"leak must be in (0, 1], got {leak}")
        if reset not in RESETS:
            raise SnnadvError(f"unknown reset '{reset}' (choose subtract or zero)")
        super().__init__(beta=float(leak), threshold=float(threshold), reset_mechanism=RESETS[reset])
        self.surrogate = surrogate or SpikeTime()
        self.dt_init = float(dt_init)
        self.register_buffer("dt", torch.zeros(0), persistent=False)
        self.current_hook = None  # callable(current [T, B, ...]); used by threshold balancing
        self.spike_hook = None    # callable(spikes [T, B, ...]); used to measure spike rates
        self._scalars = {}        # buffer name -> (tensor, its version, its value as a Python float)

    # -- configuration -------------------------------------------------------
    def _scalar(self, name: str) -> float:
        """The one-element buffer ``name`` as a Python float, read from the device only
        when the buffer was replaced or written to (``set_*``, ``load_state_dict``,
        ``.to``): the hot path never waits for the device."""
        t = getattr(self, name)
        cached = self._scalars.get(name)
        if cached is None or cached[0] is not t or cached[1] != t._version:
            cached = self._scalars[name] = (t, t._version, float(t))
        return cached[2]

    @property
    def leak(self) -> float:
        return self._scalar("beta")

    @property
    def thr(self) -> float:
        """The threshold as a Python float (see :meth:`_scalar`)."""
        return self._scalar("threshold")

    @property
    def hard_reset(self) -> bool:
        return self._reset_mechanism == "zero"

    def set_threshold(self, value: float) -> None:
        self.threshold.fill_(float(value))

    def set_leak(self, value: float) -> None:
        self.beta.fill_(float(value))

    def reset_state(self) -> None:
        """Forget mem and dt (the next input starts from rest)."""
        self.mem = torch.zeros(0, device=self.threshold.device)
        self.dt = torch.zeros(0, device=self.threshold.device)

    # -- snnTorch single-step API (the reference path) -----------------------
    def fire(self, mem):
        return _Spike.apply(mem, self.threshold, self.dt, self.surrogate)

    def mem_reset(self, mem):
        return (mem > self.threshold).to(mem.dtype).detach()

    def forward(self, input_, mem=None):
        if self.current_hook is not None:
            self.current_hook(input_.unsqueeze(0))
        if self.dt.shape != input_.shape:
            self.dt = torch.full_like(input_, self.dt_init)
        spk, mem = super().forward(input_, mem)
        self.dt = torch.where(spk.detach() > 0, torch.ones_like(self.dt), self.dt + 1.0)
        if self.spike_hook is not None:
            self.spike_hook(spk.detach().unsqueeze(0))
        return spk, mem

    # -- all timesteps at once (the fast path) --------------------------------
    def multistep(self, current: torch.Tensor) -> torch.Tensor:
        """Spikes [T, B, ...] for input currents [T, B, ...]; state carried over.

        Same dynamics and gradients as T calls of :meth:`forward`, computed by
        :func:`snnadv.kernels.scan.lif_scan` (one fused recurrence per layer).
        """
        from .kernels.scan import lif_scan

        if self.current_hook is not None:
            self.current_hook(current)
        frame = current.shape[1:]
        if self.mem.shape != frame:
            mem0 = torch.zeros(frame, device=current.device, dtype=torch.float32)
            dt0 = torch.full(frame, self.dt_init, device=current.device)
        else:
            mem0, dt0 = self.mem, self.dt
        spk, self.mem, self.dt = lif_scan(current, mem0, dt0, self.leak, self.thr,
                                          self.hard_reset, self.surrogate)
        if self.spike_hook is not None:
            self.spike_hook(spk.detach())
        return spk

    def extra_repr(self) -> str:
        return (f"leak={self.leak}, threshold={self.thr:.4g}, "
                f"reset={self._reset_mechanism}, surrogate={self.surrogate!r}")


class TimeDropout(nn.Module):
    """Dropout whose mask is drawn once per sample per forward pass (all T steps).

    Input [T, B, ...] (or [1, B, ...] step by step): the mask has shape [B, ...] and
    is reused for every timestep until :meth:`reset_state`, as in the original code.
    Identity in eval mode.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.mask = None

    def reset_state(self) -> None:
        self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None or self.mask.shape != x.shape[1:]:
            # drawn in the layout of a frame (channels-last stays channels-last)
            self.mask = torch.empty_like(x[0]).bernoulli_(1.0 - self.p).div_(1.0 - self.p)
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def neurons(module: nn.Module) -> list[LIF]:
    """Every :class:`LIF` neuron inside ``module``, at any depth, in forward order."""
    return [m for m in module.modules() if isinstance(m, LIF)]


def reset_state(module: nn.Module) -> None:
    """Reset every stateful spiking module inside ``module``, however deeply nested.

    snnTorch's ``utils.reset`` only looks at top-level children; this walks the whole
    tree and also clears the per-forward dropout masks (:class:`TimeDropout`) and any
    plain snnTorch neuron.
    """
    for m in module.modules():
        if isinstance(m, (LIF, TimeDropout)):
            m.reset_state()
        elif isinstance(m, snn.SpikingNeuron) and hasattr(m, "reset_mem"):
            m.reset_mem()


def eq7_spike_rate(leak: float, ratio: float) -> float:
    """Paper Eq. 7: spike rate 1/n of an LIF neuron fed a constant input.

    ``ratio`` is V_mem / V_th (so r = 1 / ratio).  With u_n = V_mem (1 - lam^n)/(1 - lam)
    reaching V_th after n steps: 1/n = log(lam) / log(r lam - (r - 1)).  Returns 0 when
    the neuron never fires (r (1 - lam) >= 1) and ``ratio`` for an IF neuron (lam = 1).
    """
    r = 1.0 / ratio
    if leak >= 1.0:
        return min(1.0, ratio)
    arg = r * leak - (r - 1.0)
    if arg <= 0.0:
        return 0.0
    if arg >= 1.0:
        return 1.0
    return math.log(leak) / math.log(arg)
