"""Spiking neurons (paper Eq. 3): the :class:`Neuron` protocol and the built-in LIF/IF neuron.

The neuron :class:`LIF` subclasses :class:`snntorch.Leaky` and keeps its contract:
``spk, mem = neuron(input_, mem)`` one timestep at a time, state held in the module
(``mem``, plus ``dt`` added here), reset by :func:`reset_state`.  It takes snnTorch's
keywords (``beta``, ``threshold``, ``spike_grad``, ``reset_mechanism``, ``init_hidden``,
``output``; ``leak``, ``reset`` and ``surrogate`` are this package's names for the
first ones) and adds

* the spike-time-dependent surrogate of Eq. 4 (:mod:`snnadv.surrogates`), which needs
  the time since the neuron's last spike, so ``dt`` is carried as state beside ``mem``;
* surrogates chosen per model and changeable after training (an attack may use a
  different one); snnTorch's surrogate functions work too (see :class:`LIF`);
* :meth:`LIF.multistep`, all T timesteps of a layer at once through the fused scan
  of :mod:`snnadv.kernels.scan`; the single-step ``forward`` is the reference.

Dynamics, one step (Eq. 3 with snnTorch's reset convention; ``s`` = spike):

    soft reset ("subtract", the paper's default):
        u[t] = lam * u[t-1] + I[t] - thr * s[t-1]
    hard reset ("zero", reset to 0):
        u[t] = lam * (1 - s[t-1]) * u[t-1] + I[t]
    no reset ("none", snnTorch's pure integration):
        u[t] = lam * u[t-1] + I[t]
    s[t] = H(u[t] - thr)            (fires when u exceeds thr, strictly)

``lam`` (snnTorch's ``beta``) is the leak: 1.0 is an IF neuron, < 1 an LIF neuron.
Conversion builds the IF neuron as this class at leak 1.0 (it is not a separate
class).  The spike is taken from the membrane *after* this step's input is integrated
(Eq. 3; the original code's one-step delay is not reproduced).  The reset is applied
at the next step and carries no gradient (snnTorch and the original code both detach
it).  The subtracted threshold is not leaked, as in snnTorch; for IF neurons this is
exactly the textbook "integrate, fire, subtract".
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import snntorch as snn
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import SnnadvError
from .kernels import lif_scan
from .registry import register_neuron
from .surrogates import SpikeTime, Surrogate, from_snntorch

DT_INIT = 1000.0


class Neuron(nn.Module):
    """What the package needs from a spiking neuron; subclass it and register the class
    (``@snnadv.register_neuron("name")``) to use it in every SNN, conversion included.

    Required:

    * ``forward(input_, mem=None)``: one timestep in snnTorch's contract: ``input_``
      [B, ...] is this step's input current; returns ``(spk, mem)`` (or ``spk`` alone
      where snnTorch's ``init_hidden`` says so); the state lives in the module between
      calls.  This is the reference the SNN's ``mode="reference"`` runs.
    * ``reset_state()``: forget the state; the SNN calls it before every run.
    * a settable threshold: :attr:`thr` (a Python float) and :meth:`set_threshold`.
      The defaults read and fill a tensor attribute ``threshold`` (snnTorch's buffer).

    Optional:

    * :meth:`multistep` ``(current [T, B, ...]) -> spikes [T, B, ...]``: all T steps at
      once, state carried over, equal to T calls of ``forward`` (keep a test that says
      so).  The SNN's default ``mode="fused"`` calls it; the default loops ``forward``.
    * ``surrogate``: a :class:`~snnadv.surrogates.Surrogate` used for ds/du in backward
      (None: the neuron has its own, and attack-time surrogates cannot replace it).
    * :attr:`leak` / :meth:`set_leak`: Eq. 3's lambda, where the neuron has one.
    * ``reset_mechanism``: ``"subtract"`` | ``"zero"`` | ``"none"`` (snnTorch's names).
    * :meth:`params`: extra constructor parameters (plain data) that checkpoints record,
      and :meth:`build`, which the SNN calls to construct the neuron from them.

    What each part of the package uses:

    * conversion (threshold balancing, Sec. 2.2): the input current of each layer
      (:meth:`register_current_hook`) and :meth:`set_threshold`;
    * fine-tuning (SNN-BP, surrogate-gradient BPTT): autograd through ``forward`` /
      :meth:`multistep` w.r.t. the input current, ``surrogate``, :meth:`set_leak`,
      :meth:`set_threshold` (the scaled thresholds);
    * attacks: Algorithm 1 and BPTT differentiate through the same backward; the
      ``bptt-<surrogate>`` paths swap ``surrogate`` for the call; the rate path reads
      the spikes (:meth:`register_spike_hook`) and :attr:`thr`.
    """

    surrogate: Surrogate | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._current_hooks: OrderedDict = OrderedDict()
        self._spike_hooks: OrderedDict = OrderedDict()

    # -- construction ----------------------------------------------------------------
    @classmethod
    def build(cls, *, leak: float, threshold: float, reset: str, surrogate: Surrogate | None, **params) -> "Neuron":
        """The neuron an SNN layer gets (the SNN's leak, reset and surrogate; ``params``
        from :meth:`params` of a saved model).  Override where these do not apply."""
        return cls(leak=leak, threshold=threshold, reset=reset, surrogate=surrogate, **params)

    def params(self) -> dict:
        """Constructor parameters beyond leak, threshold, reset and surrogate (plain data)."""
        return {}

    # -- settings ---------------------------------------------------------------------
    @property
    def thr(self) -> float:
        return float(self.threshold)

    def set_threshold(self, value: float) -> None:
        self.threshold.fill_(float(value))

    @property
    def leak(self) -> float | None:
        return None

    def set_leak(self, value: float) -> None:
        raise SnnadvError(f"neuron {type(self).__name__} has no leak to set")

    def reset_state(self) -> None:
        raise NotImplementedError

    # -- running ----------------------------------------------------------------------
    def multistep(self, current: torch.Tensor) -> torch.Tensor:
        """Spikes [T, B, ...] for input currents [T, B, ...]: T calls of ``forward``."""
        return torch.stack([self._step(c) for c in current])

    def run(self, current: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """Spikes for the currents [T, B, ...] of a chunk, by :meth:`multistep` (``fused``)
        or step by step; the hooks see the currents before and the spikes after."""
        for hook in list(self._current_hooks.values()):
            hook(current)
        spk = self.multistep(current) if fused else torch.stack([self._step(c) for c in current])
        for hook in list(self._spike_hooks.values()):
            hook(spk.detach())
        return spk

    def _step(self, current: torch.Tensor) -> torch.Tensor:
        out = self(current)
        return out[0] if isinstance(out, tuple) else out

    def register_current_hook(self, hook: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """``hook(current [T, B, ...])`` before every chunk :meth:`run` computes; remove
        it with the returned handle's ``remove()``."""
        handle = RemovableHandle(self._current_hooks)
        self._current_hooks[handle.id] = hook
        return handle

    def register_spike_hook(self, hook: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """``hook(spikes [T, B, ...], detached)`` after every chunk :meth:`run` computes."""
        handle = RemovableHandle(self._spike_hooks)
        self._spike_hooks[handle.id] = hook
        return handle


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


RESETS = {"subtract": "subtract", "soft": "subtract", "zero": "zero", "hard": "zero", "none": "none"}

#: snnTorch keywords the LIF takes only at their defaults (what they change is not part
#: of Eq. 3 as the fused scan computes it: learned leaks or thresholds, graded or
#: quantised spikes, inhibition, an immediate reset)
_FIXED = {"surrogate_disable": False, "inhibition": False, "learn_beta": False, "learn_threshold": False,
          "state_quant": False, "graded_spikes_factor": 1.0, "learn_graded_spikes_factor": False,
          "reset_delay": True}


def _one(a, b, a_name: str, b_name: str):
    if a is not None and b is not None:
        raise SnnadvError(f"LIF: give {a_name} or {b_name} (the same setting), not both")
    return a if a is not None else b


@register_neuron("lif")
class LIF(Neuron, snn.Leaky):
    """Leaky integrate-and-fire neuron with spike-time surrogate (Eq. 3, Eq. 4).

    Args (snnTorch's names; this package's older names in brackets, either may be given):
        beta [leak]: lambda of Eq. 3, a number in (0, 1]; 1.0 makes an IF neuron (default 0.99).
        threshold: the layer's firing threshold (a scalar buffer; not learned).
        spike_grad [surrogate]: the surrogate of ds/du: a :class:`~snnadv.surrogates.Surrogate`
            (default: Eq. 4 with alpha=0.3, beta=0.01) or an snnTorch surrogate function.
            ``snntorch.surrogate.fast_sigmoid(slope=k)`` becomes the built-in
            ``fast-sigmoid`` of the same k (both paths, the Triton scan included); any
            other snnTorch function runs on the single-step path only, and
            :meth:`multistep` refuses it (one :class:`SnnadvError`).
        reset_mechanism [reset]: ``"subtract"`` (soft, default), ``"zero"`` (hard) or
            ``"none"``.
        init_hidden, output: as in snnTorch (what ``forward`` returns).
        dt_init: dt before the first spike (see :mod:`snnadv.surrogates`).

    snnTorch's other keywords are accepted only at their defaults.

    State: ``mem`` (membrane, as in snnTorch) and ``dt`` (float tensor of whole
    numbers: steps since the last spike).  Both are cleared by :meth:`reset_state`.
    """

    def __init__(self, beta: float | None = None, threshold: float = 1.0, spike_grad=None, *,
                 reset_mechanism: str | None = None, init_hidden: bool = False, output: bool = False,
                 leak: float | None = None, reset: str | None = None, surrogate: Surrogate | None = None,
                 dt_init: float = DT_INIT, **snntorch_options):
        for key, value in snntorch_options.items():
            if key not in _FIXED:
                raise TypeError(f"LIF() got an unexpected keyword argument '{key}'")
            if value != _FIXED[key]:
                raise SnnadvError(f"LIF does not support snnTorch's {key}={value!r} (only {_FIXED[key]!r}: "
                                  f"the leak and threshold are set, not learned, and spikes are 0 or 1)")
        lam = _one(beta, leak, "beta", "leak")
        lam = 0.99 if lam is None else lam
        if isinstance(lam, torch.Tensor) and lam.numel() != 1:
            raise SnnadvError("LIF takes one leak for the whole layer (a number), not a tensor of them")
        if not 0.0 < float(lam) <= 1.0:
            raise SnnadvError(f"leak must be in (0, 1], got {float(lam)}")
        mechanism = _one(reset_mechanism, reset, "reset_mechanism", "reset") or "subtract"
        if mechanism not in RESETS:
            raise SnnadvError(f"unknown reset '{mechanism}' (choose subtract, zero or none)")
        grad = _one(spike_grad, surrogate, "spike_grad", "surrogate")
        snntorch_fn = None
        if grad is None:
            grad = SpikeTime()
        elif not isinstance(grad, Surrogate):
            if not callable(grad):
                raise SnnadvError(f"spike_grad must be a snnadv Surrogate or an snnTorch surrogate function, "
                                  f"got {grad!r}")
            grad, snntorch_fn = from_snntorch(grad), grad
            if grad is not None:
                snntorch_fn = None
        super().__init__(beta=float(lam), threshold=float(threshold), spike_grad=snntorch_fn,
                         init_hidden=init_hidden, reset_mechanism=RESETS[mechanism], output=output)
        self.surrogate = grad  # None: the snnTorch function (snnTorch's self.spike_grad) fires
        self.dt_init = float(dt_init)
        self.register_buffer("dt", torch.zeros(0), persistent=False)
        self._scalars = {}        # buffer name -> (tensor, its version, its value as a Python float)

    def params(self) -> dict:
        return {"dt_init": self.dt_init}

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
        if self.surrogate is None:  # an snnTorch surrogate function: snnTorch fires
            return super().fire(mem)
        return _Spike.apply(mem, self.threshold, self.dt, self.surrogate)

    def mem_reset(self, mem):
        return (mem > self.threshold).to(mem.dtype).detach()

    def forward(self, input_, mem=None):
        if self.dt.shape != input_.shape:
            self.dt = torch.full_like(input_, self.dt_init)
        out = super().forward(input_, mem)
        spk = out[0] if isinstance(out, tuple) else out
        self.dt = torch.where(spk.detach() > 0, torch.ones_like(self.dt), self.dt + 1.0)
        return out

    # -- all timesteps at once (the fast path) --------------------------------
    def multistep(self, current: torch.Tensor) -> torch.Tensor:
        """Spikes [T, B, ...] for input currents [T, B, ...]; state carried over.

        Same dynamics and gradients as T calls of :meth:`forward`, computed by
        :func:`snnadv.kernels.lif_scan` (one fused recurrence per layer).
        """
        if self.surrogate is None:
            fn = getattr(self.spike_grad, "__qualname__", repr(self.spike_grad)).split(".<locals>")[0]
            raise SnnadvError(f"the fused multi-step LIF has no equivalent of the snnTorch surrogate '{fn}': use "
                              f"a snnadv surrogate (stdb, linear, fast-sigmoid; snntorch.surrogate.fast_sigmoid "
                              f"maps to fast-sigmoid) or run step by step (an SNN's mode='reference')")
        frame = current.shape[1:]
        if self.mem.shape != frame:
            mem0 = torch.zeros(frame, device=current.device, dtype=torch.float32)
            dt0 = torch.full(frame, self.dt_init, device=current.device)
        else:
            mem0, dt0 = self.mem, self.dt
        spk, self.mem, self.dt = lif_scan(current, mem0, dt0, self.leak, self.thr,
                                          self._reset_mechanism, self.surrogate)
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


def reset_state(module: nn.Module) -> None:
    """Reset every stateful spiking module inside ``module``, however deeply nested.

    snnTorch's ``utils.reset`` only looks at top-level children; this walks the whole
    tree and also clears the per-forward dropout masks (:class:`TimeDropout`) and any
    plain snnTorch neuron.
    """
    for m in module.modules():
        if isinstance(m, (Neuron, TimeDropout)):
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
