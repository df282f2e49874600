"""``snnadv bench``: throughput and peak memory of the four workloads of the paper.

Workloads (each timed on synthetic images in [0, 1]: a benchmark measures speed,
not accuracy):

* ``ann_train``: SGD steps of the ANN (one implementation, reported once);
* ``snn_train``: SNN-BP steps: forward over T timesteps, cross-entropy, BPTT, Adam;
* ``snn_infer``: no-grad SNN forward at a large T (evaluation of SNN-conv; threshold
  balancing during conversion runs the same forward, layer by layer);
* ``pgd``: PGD-7 through the SNN, the input gradient taken straight through the
  rate encoder (BPDA), as :mod:`snnadv.encoding` does.

Every SNN workload runs twice in the same process: ``snnadv`` (the library's fused
multi-step path, :class:`~snnadv.models.SNN`) and ``snntorch``, the loop a typical
snnTorch user writes (:class:`PlainSnnTorchNet`: ``snn.Leaky`` per layer, a Python
loop over time, one frame through every layer per step) with the same weights and
thresholds, so both compute the same function (``tests/test_bench.py`` checks that).
The ratio of the two throughputs is the speed-up.  Where SpikingJelly is installed (the
``peers`` extra, see the README), a third implementation, ``spikingjelly``, runs the same
network written with SpikingJelly's multi-step layers and its fused LIF/IF neuron op
(:class:`SpikingJellyNet`: its PyTorch implementation on a CPU, its fastest CUDA or
Triton kernel on a GPU), in each precision asked for; ``speedup_vs_spikingjelly`` is
snnadv's throughput over SpikingJelly's in the same precision.  Without it, one line
says it is skipped and why, and its rows are absent.

Each (workload, implementation) runs one untimed step that measures peak memory,
then warm-up steps, then the timed steps (on CUDA the device is synchronised around
the timed region).  Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and
the peak increase of the process's resident set (sampled from ``/proc/self/statm``
after ``malloc_trim``) on the CPU, a rough proxy.  Both implementations run in the
same process with the same settings, including :func:`snnadv.runtime.keep_freed_memory`
(which also speeds up the snnTorch loop: 11.3 -> 14.3 img/s for SNN-BP training at
T=32, batch 16, on the 2-core development CPU).

The network is made active: thresholds are balanced on synthetic images as in
conversion (a high percentile of each layer's input current), then scaled by 0.7
for the SNN-BP workloads as fine-tuning does; the mean spike rate of every layer is
measured and reported, so the reader knows the network was spiking.

Hardware limit: the FLOPs of the convolutions and linear layers per image and
timestep (x3 for training: forward, input and weight gradients; x2 per PGD step:
forward and input gradient) and the bytes of neuron state an ideal fused kernel
moves per image and timestep (forward: read the fp32 current, write a 1-byte spike;
backward adds: read the fp32 spike gradient and the spike, write the fp32 current
gradient), against the peak FLOP/s and memory bandwidth given (defaults on CUDA:
989 TFLOP/s, dense bf16 of an H100/H200; 4.8 TB/s for an H200, 3.35 for an H100).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import platform
import threading
import time
from pathlib import Path

import snntorch as snn
import torch
import torch.nn.functional as F
from snntorch import spikegen, surrogate
from torch import nn

from .attacks import PGD
from .checkpoint import load_weights
from .config import parse_list, parse_precision, resolve, resolve_device
from .errors import SnnadvError
from .gradients import Autograd
from .kernels import scan
from .models import ANN, SNN, get_spec, record_spikes
from .models.ann import BasicBlock, make_layer
from .models.spec import Act, ArchSpec, AvgPool, Block, Conv, Dropout, Flatten, Linear
from .neurons import TimeDropout, reset_state
from .outputs import Outputs, guarded, write_json
from .report import Reporter
from .training import make_optimizer

WORKLOADS = ("ann_train", "snn_train", "snn_infer", "pgd")
IMPLS = ("snnadv", "snntorch", "spikingjelly")  # spikingjelly: where it is installed (the "peers" extra)

#: per preset: the architecture and, per workload, batch, T, timed iterations, warm-up iterations
PRESETS = {
    "cpu": {"arch": "vgg5", "workloads": {
        "ann_train": {"batch": 64, "timesteps": 1, "iters": 3, "warmup": 1},
        "snn_train": {"batch": 16, "timesteps": 32, "iters": 2, "warmup": 1},
        # on the CPU a short warm-up suffices (no autotuning): it keeps the run short
        "snn_infer": {"batch": 16, "timesteps": 256, "iters": 1, "warmup": 1, "warmup_timesteps": 16},
        "pgd": {"batch": 8, "timesteps": 32, "iters": 1, "warmup": 1, "warmup_timesteps": 4},
    }},
    "paper": {"arch": "vgg5", "workloads": {
        "ann_train": {"batch": 256, "timesteps": 1, "iters": 20, "warmup": 3},
        "snn_train": {"batch": 64, "timesteps": 100, "iters": 5, "warmup": 2},
        "snn_infer": {"batch": 256, "timesteps": 2500, "iters": 2, "warmup": 1},
        "pgd": {"batch": 64, "timesteps": 100, "iters": 2, "warmup": 1},
    }},
    "tiny": {"arch": "tiny", "workloads": {
        "ann_train": {"batch": 2, "timesteps": 1, "iters": 1, "warmup": 0},
        "snn_train": {"batch": 2, "timesteps": 4, "iters": 1, "warmup": 0},
        "snn_infer": {"batch": 2, "timesteps": 4, "iters": 1, "warmup": 0},
        "pgd": {"batch": 2, "timesteps": 4, "iters": 1, "warmup": 0},
    }},
}

#: settings of ``snnadv bench`` (beside the common ones); a config's [bench] table may set them

PGD_STEPS, PGD_EPS, PGD_ALPHA = 7, 8 / 255, 2 / 255
BP_LEAK, BP_SCALE = 0.99, 0.7   # SNN-BP: leak and threshold scale (the fine-tuning defaults)
BALANCE_PERCENTILE = 99.9      # threshold balancing on synthetic images (see calibrate)
#: threshold balancing and spike-rate measurement: (batch, T), per preset
CALIBRATION = {"cpu": (8, 32), "paper": (32, 100), "tiny": (2, 8)}

#: forward (read fp32 current, write 1-byte spike) and backward (read fp32 grad + spike, write fp32 grad)
STATE_BYTES_FWD, STATE_BYTES_BWD = 5, 9


# -- the baseline: a plain snnTorch loop ------------------------------------------------
class PlainSnnTorchNet(nn.Module):
    """The network as a typical snnTorch user writes it: one ``snn.Leaky`` per spiking
    layer, a Python loop over time calling every layer on one frame.

    Same layer names as :class:`~snnadv.models.SNN`, so :meth:`load_from` copies its
    weights; ``thresholds`` maps the spiking layers' names (``spec.activations``) to
    their thresholds (missing: 1.0).  Output: the final layer's output summed over
    time / T.  Surrogate: snnTorch's fast sigmoid (the training/attack backward
    differs from the SNN's Eq. 4 surrogate; the forward is identical).  Dropout: the
    SNN's :class:`~snnadv.neurons.TimeDropout` (one mask per forward), fed one frame.
    """

    def __init__(self, spec: ArchSpec, leak: float = 1.0, thresholds: dict[str, float] | None = None,
                 spike_grad=None):
        super().__init__()
        self.spec = spec
        thresholds = thresholds or {}
        names = iter(spec.activations)
        spike_grad = spike_grad or surrogate.fast_sigmoid()

        def leaky():
            return snn.Leaky(beta=float(leak), threshold=float(thresholds.get(next(names), 1.0)),
                             spike_grad=spike_grad, reset_mechanism="subtract")

        self._names = [l.name for l in spec.layers]
        for layer in spec.layers:  # make_layer builds a block's act1 before act2: names stay in order
            self.add_module(layer.name, make_layer(layer, leaky, TimeDropout))

    @classmethod
    def from_snn(cls, model: SNN, spike_grad=None) -> "PlainSnnTorchNet":
        """The baseline of an :class:`SNN`: same leak, thresholds and weights."""
        net = cls(model.spec, model.leak, model.thresholds(), spike_grad)
        net.load_from(model)
        return net.to(next(model.parameters()).device)

    def load_from(self, model: nn.Module) -> None:
        """Copy the synaptic weights of an SNN (or ANN) built from the same spec."""
        load_weights(self, model.state_dict(), f"{model.spec.arch} weights")

    def _layer(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, snn.Leaky):
            spk, _ = module(x)
            return spk
        if isinstance(module, BasicBlock):
            return module(x, self._layer)
        if isinstance(module, TimeDropout):
            return module(x.unsqueeze(0))[0]
        return module(x)

    def forward_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Logits for input spike frames [T, B, C, H, W]: summed output / T."""
        reset_state(self)
        T = frames.shape[0]
        acc = None
        for t in range(T):
            h = frames[t]
            for name in self._names:
                h = self._layer(getattr(self, name), h)
            acc = h if acc is None else acc + h
        return acc / T

    def forward(self, x: torch.Tensor, num_steps: int = 100) -> torch.Tensor:
        """Logits for images in [0, 1]: ``spikegen.rate`` frames, straight-through gradient."""
        return self.forward_frames(rate_frames(x, num_steps))


def rate_frames(x: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The peers' encoder: ``spikegen.rate`` frames [T, B, ...] of images in [0, 1] (the
    global RNG's draws, as the SNN's encoder without a generator), straight-through gradient."""
    p = x.detach()
    frames = spikegen.rate(p, num_steps=num_steps)
    if x.requires_grad:
        frames = frames + (x - p).unsqueeze(0)
    return frames


# -- the peer: SpikingJelly's multi-step network ------------------------------------------
@functools.cache
def spikingjelly():
    """``(spikingjelly.activation_based, None)`` where SpikingJelly is usable, else
    ``(None, why not)``: one line, never an exception (it is an optional peer,
    ``pip install -e ".[peers]"``)."""
    try:
        from spikingjelly import activation_based as sj
        from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: F401
    except ImportError as e:
        how = 'pip install -e ".[peers]" && pip install --no-deps "spikingjelly>=2.0"'
        if (e.name or "spikingjelly").split(".")[0] == "spikingjelly":
            return None, f"not installed ({e}; {how})"
        return None, f"not importable ({e}: one of its dependencies is missing; {how})"
    except Exception as e:  # a broken install (e.g. a missing dependency of a submodule)
        return None, f"not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    v = spikingjelly_version()
    major = (v or "").split(".")[0]
    if major.isdigit() and int(major) < 2:  # 0.0.0.0.x: another API (backend= per node)
        return None, f"version {v}, the bench needs SpikingJelly >= 2.0"
    return sj, None


def spikingjelly_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("spikingjelly")
    except Exception:  # not installed, or installed without metadata
        return None


class SpikingJellyNet(nn.Module):
    """The network written with SpikingJelly (``spikingjelly.activation_based``) in its
    multi-step mode (``step_mode="m"``: every layer takes all T frames [T, B, ...] at
    once): ``layer.Conv2d`` / ``Linear`` / ``AvgPool2d`` / ``Flatten`` / ``Dropout``
    (one mask per run, as :class:`~snnadv.neurons.TimeDropout`) and one neuron node per
    spiking layer, reset by ``functional.reset_net`` before every run.

    Same layer names as :class:`~snnadv.models.SNN`, so :meth:`load_from` copies its
    weights; ``thresholds`` as :class:`PlainSnnTorchNet`'s.  Neurons (soft reset,
    ``v_reset=None``; the reset carries no gradient, ``detach_reset=True``, as the SNN's):

    * leak 1.0 (IF): ``neuron.IFNode``, ``H[t] = V[t-1] + X[t]``: the SNN's IF neuron exactly;
    * leak lam < 1: ``neuron.LIFNode(tau=1 / (1 - lam), decay_input=False)``, whose charge
      ``H[t] = V[t-1] - V[t-1] / tau + X[t]`` is ``lam * V[t-1] + X[t]``.  One convention
      differs from snnTorch's (and the SNN's): SpikingJelly keeps the membrane *after*
      the reset, ``V[t] = H[t] - thr * S[t]``, so the subtracted threshold is leaked
      with it (``u[t] = lam * u[t-1] + I[t] - lam * thr * s[t-1]``, the SNN subtracts
      ``thr * s[t-1]``); no setting of its LIF removes that, and a node written to do so
      would leave SpikingJelly's fused LIF op, which is what this peer is here to time.
      At leak 0.99 the two differ by 1 % of a threshold per spike
      (``tests/test_bench.py`` checks the twin against both conventions).

    Both fire at ``H >= thr`` (the SNN at ``u > thr``: the same unless a membrane lands
    exactly on its threshold).  The neuron op is SpikingJelly's automatic choice: its
    PyTorch implementation on a CPU, its CUDA or Triton kernel on a GPU
    (:func:`spikingjelly_implementation`).  Surrogate: ``surrogate.SuperSpike(alpha=1)``,
    ``1 / (1 + |u - thr|)^2``, which is snnadv's ``fast-sigmoid`` at slope 1 (the training
    and attack backward differs from the SNN's Eq. 4 surrogate; the forward is identical).
    ``precision="bf16"``: the synaptic layers under bf16 autocast, the neurons fed fp32
    currents (membranes stay fp32, as the SNN's).  Output: the final layer's output
    averaged over time.
    """

    def __init__(self, spec: ArchSpec, leak: float = 1.0, thresholds: dict[str, float] | None = None,
                 surrogate_function=None, precision: str = "fp32"):
        super().__init__()
        sj, why = spikingjelly()
        if sj is None:
            raise SnnadvError(f"SpikingJelly is {why}")
        from spikingjelly.activation_based import layer, neuron, surrogate

        parse_precision(precision)
        self.spec, self.leak, self.precision = spec, float(leak), precision
        thresholds = thresholds or {}
        sg = surrogate_function if surrogate_function is not None else surrogate.SuperSpike(alpha=1.0)
        names = iter(spec.activations)

        def node():
            thr = float(thresholds.get(next(names), 1.0))
            if self.leak == 1.0:
                n = neuron.IFNode(v_threshold=thr, v_reset=None, surrogate_function=sg, detach_reset=True,
                                  step_mode="m")
            else:
                n = neuron.LIFNode(tau=1.0 / (1.0 - self.leak), decay_input=False, v_threshold=thr, v_reset=None,
                                   surrogate_function=sg, detach_reset=True, step_mode="m")
            n.register_forward_pre_hook(_fp32_current)
            return n

        def make(l):
            if isinstance(l, Conv):
                return layer.Conv2d(l.cin, l.cout, l.k, l.stride, l.pad, bias=False, step_mode="m")
            if isinstance(l, Linear):
                return layer.Linear(l.fin, l.fout, bias=False, step_mode="m")
            if isinstance(l, Act):
                return node()
            if isinstance(l, AvgPool):
                return layer.AvgPool2d(l.k, step_mode="m")
            if isinstance(l, Dropout):
                return layer.Dropout(l.p, step_mode="m")
            if isinstance(l, Flatten):
                return layer.Flatten(step_mode="m")
            if isinstance(l, Block):
                return _SpikingJellyBlock(l, layer, node)
            raise TypeError(f"unknown layer record {l!r}")

        self._names = [l.name for l in spec.layers]
        for l in spec.layers:  # a block builds act1 before act2: names stay in order
            self.add_module(l.name, make(l))

    @classmethod
    def from_snn(cls, model: SNN, precision: str = "fp32", surrogate_function=None) -> "SpikingJellyNet":
        """The SpikingJelly twin of an :class:`SNN`: same leak, thresholds and weights."""
        net = cls(model.spec, model.leak, model.thresholds(), surrogate_function, precision)
        net.load_from(model)
        return net.to(next(model.parameters()).device)

    def load_from(self, model: nn.Module) -> None:
        """Copy the synaptic weights of an SNN (or ANN) built from the same spec."""
        load_weights(self, model.state_dict(), f"{model.spec.arch} weights")

    def forward_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Logits for input spike frames [T, B, C, H, W]: the output averaged over time."""
        from spikingjelly.activation_based import functional

        functional.reset_net(self)
        h = frames
        with torch.autocast(frames.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            for name in self._names:
                h = getattr(self, name)(h)
        return h.float().mean(0)

    def forward(self, x: torch.Tensor, num_steps: int = 100) -> torch.Tensor:
        """Logits for images in [0, 1]: ``spikegen.rate`` frames, straight-through gradient."""
        return self.forward_frames(rate_frames(x, num_steps))


def _fp32_current(module, args):
    """Forward pre-hook of a SpikingJelly neuron: its input current in fp32 (under bf16
    autocast the synaptic layers give bf16, and the node would keep a bf16 membrane)."""
    return tuple(a.float() if torch.is_tensor(a) and a.dtype != torch.float32 else a for a in args)


class _SpikingJellyBlock(nn.Module):
    """A residual basic block in SpikingJelly's multi-step layers (the names of
    :class:`~snnadv.models.ann.BasicBlock`): act2(conv2(drop(act1(conv1 x))) + shortcut(x))."""

    def __init__(self, b: Block, layer, node):
        super().__init__()
        self.conv1 = layer.Conv2d(b.cin, b.cout, 3, b.stride, 1, bias=False, step_mode="m")
        self.act1 = node()
        self.drop = layer.Dropout(b.p, step_mode="m")
        self.conv2 = layer.Conv2d(b.cout, b.cout, 3, 1, 1, bias=False, step_mode="m")
        self.shortcut = layer.Conv2d(b.cin, b.cout, 1, b.stride, 0, bias=False, step_mode="m") \
            if b.projection else nn.Identity()
        self.act2 = node()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.drop(self.act1(self.conv1(x)))) + self.shortcut(x))


def spikingjelly_implementation(device: torch.device) -> str | None:
    """Which implementation SpikingJelly's LIF and IF ops use on ``device`` (its own
    report: ``torch-reference`` on a CPU; ``cuda``, ``triton`` or ``torch`` on a GPU)."""
    if spikingjelly()[0] is None:
        return None
    from spikingjelly.activation_based import functional

    try:
        found = {n: functional.neuron_implementation(n, torch.device(device))["implementation"] for n in ("lif", "if")}
    except Exception as e:  # no CUDA implementation at all: SpikingJelly says why
        return f"unavailable ({str(e).splitlines()[0]})"
    return found["lif"] if found["lif"] == found["if"] else ", ".join(f"{k}: {v}" for k, v in found.items())


# -- counting: FLOPs and neurons per image per timestep -----------------------------------
def count_spec(spec: ArchSpec) -> dict:
    """FLOPs of the convolutions and linear layers, and spiking neurons, per image per step."""
    c, size, flops, neurons = spec.in_channels, spec.image_size, 0, 0

    def conv(cin, cout, k, stride, pad, size):
        out = (size + 2 * pad - k) // stride + 1
        return 2 * k * k * cin * cout * out * out, out

    for l in spec.layers:
        if isinstance(l, Conv):
            f, size = conv(l.cin, l.cout, l.k, l.stride, l.pad, size)
            flops, c = flops + f, l.cout
        elif isinstance(l, Linear):
            flops, c, size = flops + 2 * l.fin * l.fout, l.fout, 1
        elif isinstance(l, AvgPool):
            size //= l.k
        elif isinstance(l, Act):
            neurons += c * size * size
        elif isinstance(l, Block):
            f1, out = conv(l.cin, l.cout, 3, l.stride, 1, size)
            f2, _ = conv(l.cout, l.cout, 3, 1, 1, out)
            fs = conv(l.cin, l.cout, 1, l.stride, 0, size)[0] if l.projection else 0
            flops += f1 + f2 + fs
            c, size = l.cout, out
            neurons += 2 * c * size * size
    return {"flops": flops, "neurons": neurons}


def _work(name: str, counts: dict, T: int) -> tuple[float, float]:
    """(FLOPs, neuron-state bytes) per image of one iteration of a workload."""
    f, n = counts["flops"], counts["neurons"]
    if name == "ann_train":
        return 3.0 * f, 0.0
    if name == "snn_train":
        return 3.0 * f * T, float(n * T * (STATE_BYTES_FWD + STATE_BYTES_BWD))
    if name == "snn_infer":
        return float(f * T), float(n * T * STATE_BYTES_FWD)
    # pgd: per step forward + input gradient (no weight gradient)
    return PGD_STEPS * 2.0 * f * T, float(PGD_STEPS * n * T * (STATE_BYTES_FWD + STATE_BYTES_BWD))


# -- measuring -------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak memory over a region: CUDA max allocated, or the sampled peak RSS increase on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.bytes: int | None = None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated (includes weights and inputs)"
        return "peak RSS increase, sampled every 2 ms from /proc/self/statm (proxy)"

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _malloc_trim()
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        if self.base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            r = _rss()
            if r is not None and r > self.peak:
                self.peak = r
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            return False
        if self.base is not None:
            self._stop.set()
            self._thread.join()
            r = _rss()
            self.peak = max(self.peak, r or 0)
            self.bytes = int(self.peak - self.base)
        return False


def measure(step, *, batch: int, timesteps: int, iters: int, warmup: int, device: torch.device,
            warmup_step=None) -> dict:
    """Three phases: one ``step()`` that measures peak memory (untimed; on CUDA after the
    warm-up, so that cuDNN's autotuning is not in the peak), ``warmup_step()``
    (default ``step``) ``warmup`` times untimed, then ``step()`` ``iters`` times timed
    (wall clock; ``cpu_seconds``: process CPU time of the timed iterations, a check on a
    loaded machine).

    Memory and speed are measured apart: on the CPU the peak-RSS proxy needs the heap
    trimmed first and a sampling thread, and both would slow the timed steps (a trimmed
    heap page-faults in again; measured: 4.9 vs 7.4 img/s for SNN-BP training at T=100).
    """
    if device.type == "cuda":  # the peak of a warm step: after cuDNN's autotuning and the allocator's warm-up
        for _ in range(warmup):
            (warmup_step or step)()
    with _PeakMemory(device) as mem:
        step()
    if device.type != "cuda":
        for _ in range(warmup):
            (warmup_step or step)()
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images_per_s": batch * iters / seconds, "seconds": seconds, "cpu_seconds": cpu,
            "peak_mem_bytes": mem.bytes, "batch": batch, "timesteps": timesteps, "iters": iters,
            "warmup": warmup, "memory_measure": mem.method}


# -- models and data ------------------------------------------------------------------
def synthetic_batch(spec: ArchSpec, batch: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0, 1] and labels (generated on the CPU, so every device gets the same)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, spec.in_channels, spec.image_size, spec.image_size, generator=g)
    y = torch.randint(0, spec.num_classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def make_snn(spec: ArchSpec, weights: dict, thresholds: dict, leak: float, device) -> SNN:
    model = SNN(spec, leak=leak, reset="subtract")
    load_weights(model, weights, "benchmark weights")
    model.set_thresholds(thresholds)
    return model.to(device)


def make_model(impl: str, spec: ArchSpec, weights: dict, thresholds: dict, leak: float, device,
               snn_options: dict | None = None) -> nn.Module:
    """The SNN (``snnadv``; ``snn_options``: its ``precision`` and ``chunk_steps``), its
    plain snnTorch twin (``snntorch``, always fp32 step by step) or its SpikingJelly twin
    (``spikingjelly``, multi-step, in the ``precision`` of ``snn_options``)."""
    model = make_snn(spec, weights, thresholds, leak, device)
    if impl == "snnadv":
        for k, v in (snn_options or {}).items():
            if v is not None:
                setattr(model, k, v)
        return model
    if impl == "snntorch":
        return PlainSnnTorchNet.from_snn(model)
    if impl == "spikingjelly":
        return SpikingJellyNet.from_snn(model, (snn_options or {}).get("precision") or "fp32")
    raise SnnadvError(f"unknown implementation '{impl}' (choose {', '.join(IMPLS)})")


def spike_rates(model: SNN, x: torch.Tensor, num_steps: int) -> dict[str, float]:
    """Mean spike rate (spikes per neuron per step) of every spiking layer of an SNN on ``x``
    (one eval forward on the fused path, counted by :func:`snnadv.models.record_spikes`)."""
    was, mode = model.training, model.mode
    model.eval()
    model.mode = "fused"
    try:
        with record_spikes(model) as spikes:
            model(x, num_steps)
    finally:
        model.train(was)
        model.mode = mode
    return spikes.mean_rates()


def calibrate(spec: ArchSpec, weights: dict, device, seed: int = 0, batch: int = 8,
              timesteps: int = 32) -> dict[str, float]:
    """Thresholds that make the random-weight network spike: balanced as in conversion
    (the ``BALANCE_PERCENTILE`` of each layer's input current) on synthetic images."""
    from .conversion import balance_thresholds

    model = make_snn(spec, weights, {}, 1.0, device)
    x, _ = synthetic_batch(spec, batch, device, seed + 1)
    return balance_thresholds(model, [x], timesteps, BALANCE_PERCENTILE)


# -- the workloads ------------------------------------------------------------------------
def ann_train(spec: ArchSpec, weights: dict, *, batch: int, iters: int, warmup: int, device,
              seed: int = 0, **_) -> dict:
    """SGD steps of the ANN (momentum 0.9), batch of synthetic images."""
    model = ANN(spec).to(device)
    load_weights(model, weights, "benchmark weights")
    model.train()
    opt = make_optimizer(torch.optim.SGD, model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = synthetic_batch(spec, batch, device, seed)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return measure(step, batch=batch, timesteps=1, iters=iters, warmup=warmup, device=device)


def snn_train(spec: ArchSpec, weights: dict, *, impl: str, thresholds: dict, batch: int, timesteps: int,
              iters: int, warmup: int, device, seed: int = 0, leak: float = BP_LEAK,
              snn_options: dict | None = None) -> dict:
    """SNN-BP steps: forward at T, cross-entropy, backward through time, Adam."""
    model = make_model(impl, spec, weights, thresholds, leak, device, snn_options).train()
    # the library's optimizer (fused where available) for both implementations: the
    # comparison is about the spiking network, not the optimizer
    opt = make_optimizer(torch.optim.Adam, model.parameters(), lr=1e-4, weight_decay=5e-4)
    x, y = synthetic_batch(spec, batch, device, seed)

    def step():
        loss = F.cross_entropy(model(x, timesteps), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return measure(step, batch=batch, timesteps=timesteps, iters=iters, warmup=warmup, device=device)


def snn_infer(spec: ArchSpec, weights: dict, *, impl: str, thresholds: dict, batch: int, timesteps: int,
              iters: int, warmup: int, device, seed: int = 0, leak: float = 1.0,
              warmup_timesteps: int | None = None, snn_options: dict | None = None) -> dict:
    """No-grad forward of the converted (IF) SNN at a large T (evaluation)."""
    model = make_model(impl, spec, weights, thresholds, leak, device, snn_options).eval()
    x, _ = synthetic_batch(spec, batch, device, seed)

    def step(T=timesteps):
        with torch.no_grad():
            model(x, T)

    return measure(step, batch=batch, timesteps=timesteps, iters=iters, warmup=warmup, device=device,
                   warmup_step=lambda: step(warmup_timesteps or timesteps))


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, timesteps: int, steps: int = PGD_STEPS,
               eps: float = PGD_EPS, alpha: float = PGD_ALPHA) -> torch.Tensor:
    """L-inf PGD (:class:`snnadv.attacks.PGD`) from the clean image at ``timesteps``; the
    gradient is w.r.t. the input only (BPTT, the models' encoders pass it straight
    through the sampling), of the batch's mean cross-entropy."""
    source = Autograd(functools.partial(model, num_steps=timesteps), loss=F.cross_entropy)
    return PGD(model, eps, alpha, steps, gradient=source)(x, y)


def pgd(spec: ArchSpec, weights: dict, *, impl: str, thresholds: dict, batch: int, timesteps: int,
        iters: int, warmup: int, device, seed: int = 0, leak: float = BP_LEAK,
        warmup_timesteps: int | None = None, snn_options: dict | None = None) -> dict:
    """PGD-7 on the SNN-BP network (one iteration = one batch attacked with 7 steps)."""
    model = make_model(impl, spec, weights, thresholds, leak, device, snn_options).eval()
    x, y = synthetic_batch(spec, batch, device, seed)
    return measure(lambda: pgd_attack(model, x, y, timesteps), batch=batch, timesteps=timesteps,
                   iters=iters, warmup=warmup, device=device,
                   warmup_step=lambda: pgd_attack(model, x, y, warmup_timesteps or timesteps))


_FUNCS = {"ann_train": ann_train, "snn_train": snn_train, "snn_infer": snn_infer, "pgd": pgd}


# -- settings -----------------------------------------------------------------------------
def resolve_bench(config=None, flags: dict | None = None) -> dict:
    """Settings of ``snnadv bench``: defaults < config [common] < config [bench] < flags."""
    return resolve("bench", config, flags)


def _per_workload(value, name: str, what: str) -> dict:
    """``32`` (every SNN workload) or ``"snn_train=32,snn_infer=256"`` -> {workload: int}."""
    if value is None:
        return {}
    if isinstance(value, int) and not isinstance(value, bool):
        out = {w: value for w in WORKLOADS if w != "ann_train"}
    elif isinstance(value, dict):
        out = dict(value)
    else:
        out = {}
        for part in parse_list(str(value)):
            key, sep, v = part.partition("=")
            try:
                if sep:
                    out[key.strip()] = int(v)
                else:
                    out.update({w: int(key) for w in WORKLOADS if w != "ann_train"})
            except ValueError:
                raise SnnadvError(f"{name} takes an integer or workload=integer pairs, got '{value}'") from None
    for k, v in out.items():
        if k not in WORKLOADS:
            raise SnnadvError(f"{name}: unknown workload '{k}' (choose {', '.join(WORKLOADS)})")
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if what == "warmup" else 1):
            raise SnnadvError(f"{name} must be a positive integer, got {v}")
    return out


def _only(value) -> list[str]:
    if value is None:
        return list(WORKLOADS)
    names = parse_list(value if isinstance(value, (list, tuple)) else str(value))
    for n in names:
        if n not in WORKLOADS:
            raise SnnadvError(f"--only: unknown workload '{n}' (choose {', '.join(WORKLOADS)})")
    if not names:
        raise SnnadvError("--only selects no workload")
    return [w for w in WORKLOADS if w in names]


def plan(cfg: dict, device: torch.device) -> tuple[str, str, dict]:
    """(preset, arch, {workload: settings}) after overrides."""
    preset = cfg.get("preset") or "auto"
    if preset == "auto":
        preset = "paper" if device.type == "cuda" else "cpu"
    if preset not in PRESETS:
        raise SnnadvError(f"unknown preset '{preset}' (choose auto, {', '.join(PRESETS)})")
    arch = cfg.get("arch") or PRESETS[preset]["arch"]
    steps = _per_workload(cfg.get("timesteps"), "--timesteps", "timesteps")
    iters = _per_workload(cfg.get("iters"), "--iters", "iters")
    if isinstance(cfg.get("iters"), int):
        iters["ann_train"] = cfg["iters"]
    warm = _per_workload(cfg.get("warmup"), "warmup", "warmup")
    if isinstance(cfg.get("warmup"), int):
        warm["ann_train"] = cfg["warmup"]
    batch = cfg.get("batch_size")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise SnnadvError(f"batch size must be a positive integer, got {batch}")
    out = {}
    for w in _only(cfg.get("only")):
        s = dict(PRESETS[preset]["workloads"][w])
        if w != "ann_train" and w in steps:
            s["timesteps"] = steps[w]
        s["iters"] = iters.get(w, s["iters"])
        s["warmup"] = warm.get(w, s["warmup"])
        if batch:
            s["batch"] = batch
        out[w] = s
    return preset, arch, out


def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
        except OSError:
            pass
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "snntorch": snn.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
            "python": platform.python_version()}


def default_peaks(device: torch.device) -> tuple[float | None, float | None]:
    """(peak TFLOP/s, peak TB/s): 989 dense bf16 for Hopper; HBM 4.8 TB/s H200, 3.35 H100."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    tbps = 4.8 if "H200" in name else 3.35 if "H100" in name else None
    return 989.0, tbps


def hardware(name: str, row: dict, counts: dict, peak_tflops, peak_tbps) -> dict:
    """How far a measured row is from the hardware limit."""
    flops, nbytes = _work(name, counts, row["timesteps"])
    ips = row["images_per_s"]
    out = {"flops_per_image": flops, "state_bytes_per_image": nbytes,
           "achieved_tflops": flops * ips / 1e12, "achieved_state_tbps": nbytes * ips / 1e12,
           "peak_tflops": peak_tflops, "peak_tbps": peak_tbps,
           "pct_peak_flops": None, "pct_peak_bandwidth": None, "bound_images_per_s": None, "pct_of_bound": None}
    if peak_tflops:
        out["pct_peak_flops"] = 100.0 * out["achieved_tflops"] / peak_tflops
    if peak_tbps:
        out["pct_peak_bandwidth"] = 100.0 * out["achieved_state_tbps"] / peak_tbps
    if peak_tflops and (peak_tbps or not nbytes):
        t = max(flops / (peak_tflops * 1e12), nbytes / (peak_tbps * 1e12) if peak_tbps else 0.0)
        out["bound_images_per_s"] = 1.0 / t
        out["pct_of_bound"] = 100.0 * ips / out["bound_images_per_s"]
    return out


# -- the run ------------------------------------------------------------------------------
def run_bench(cfg: dict, reporter: Reporter | None = None) -> dict:
    """Run the selected workloads for both implementations; returns every number."""
    reporter = reporter or Reporter(quiet=True)
    device = resolve_device(cfg.get("device") or "auto")
    preset, arch, work = plan(cfg, device)
    from .data import DATASETS

    dataset = cfg.get("dataset") or "cifar10"
    if dataset not in DATASETS:
        raise SnnadvError(f"unknown dataset '{dataset}' (choose {', '.join(DATASETS)})")
    spec = get_spec(arch, DATASETS[dataset])
    seed = int(cfg.get("seed") or 0)
    precisions = parse_precision(cfg.get("precision") or "fp32", several=True)
    chunk = cfg.get("chunk_steps")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise SnnadvError(f"chunk steps must be a positive integer, got {chunk}")
    peak_tflops, peak_tbps = default_peaks(device)
    peak_tflops = cfg.get("peak_tflops") or peak_tflops
    peak_tbps = cfg.get("peak_tbps") or peak_tbps
    cudnn_was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        torch.manual_seed(seed)
        weights = {k: v for k, v in ANN(spec).state_dict().items()}  # He init, as a fresh ANN
        counts = count_spec(spec)
        sj, sj_why = spikingjelly()
        peers = {"snntorch": {"version": snn.__version__},
                 "spikingjelly": {"available": sj is not None, "reason": sj_why, "version": spikingjelly_version(),
                                  "implementation": spikingjelly_implementation(device),
                                  "neurons": "IFNode (leak 1) / LIFNode(tau=1/(1-leak), decay_input=False), "
                                             "v_reset=None, detach_reset=True, step_mode='m'"}}
        result = {"preset": preset, "arch": arch, "dataset": dataset, "num_classes": spec.num_classes,
                  **_device_info(device), "load_avg_before": load_before, "peers": peers,
                  "snnadv_options": {"precision": ",".join(precisions), "chunk_steps": chunk,
                                     "note": "the snntorch baseline and ann_train always run in fp32; "
                                             "spikingjelly in each precision (bf16: autocast of its synaptic "
                                             "layers, fp32 membranes)"},
                  "per_image_per_step": counts, "pgd": {"steps": PGD_STEPS, "eps": PGD_EPS, "alpha": PGD_ALPHA},
                  "snn_bp": {"leak": BP_LEAK, "threshold_scale": BP_SCALE, "surrogate_snnadv": "stdb (Eq. 4)",
                             "surrogate_snntorch": "fast_sigmoid(slope=25)",
                             "surrogate_spikingjelly": "SuperSpike(alpha=1) = fast sigmoid, slope 1"}}
        if sj is None and any(w != "ann_train" for w in work):
            reporter.print(f"spikingjelly: skipped, SpikingJelly is {sj_why}", markup=False)
        thresholds, rates = {}, {}
        if any(w != "ann_train" for w in work):
            cb, ct = CALIBRATION[preset]
            reporter.print(f"calibrating thresholds of {arch} (balancing on {cb} synthetic images, "
                           f"T={ct}, percentile {BALANCE_PERCENTILE})")
            conv = calibrate(spec, weights, device, seed, cb, ct)
            thresholds = {"snn_conv": conv, "snn_bp": {k: v * BP_SCALE for k, v in conv.items()}}
            x, _ = synthetic_batch(spec, cb, device, seed + 2)
            for net, leak in (("snn_conv", 1.0), ("snn_bp", BP_LEAK)):
                model = make_snn(spec, weights, thresholds[net], leak, device)
                with torch.no_grad():
                    rates[net] = spike_rates(model, x, ct)
            result["calibration"] = {"batch": cb, "timesteps": ct, "percentile": BALANCE_PERCENTILE}
        result["thresholds"], result["spike_rates"] = thresholds, rates
        rows = []
        for w, s in work.items():
            runs = [("torch", "fp32")] if w == "ann_train" else \
                [("snnadv", p) for p in precisions] + [("snntorch", "fp32")] + \
                ([("spikingjelly", p) for p in precisions] if sj is not None else [])
            net = "snn_conv" if w == "snn_infer" else "snn_bp"
            for impl, precision in runs:
                snn_options = {"precision": precision, "chunk_steps": chunk}
                reporter.print(f"{w} ({impl} {precision}): batch {s['batch']}, T={s['timesteps']}, "
                               f"{s['warmup']} warm-up + {s['iters']} timed iteration(s)")
                torch.manual_seed(seed)
                kw = dict(batch=s["batch"], iters=s["iters"], warmup=s["warmup"], device=device, seed=seed)
                before = scan.RUNS.copy()
                if w == "ann_train":
                    row = ann_train(spec, weights, **kw)
                else:
                    if s.get("warmup_timesteps"):
                        kw["warmup_timesteps"] = min(s["warmup_timesteps"], s["timesteps"])
                    row = _FUNCS[w](spec, weights, impl=impl, thresholds=thresholds[net],
                                    timesteps=s["timesteps"], snn_options=snn_options, **kw)
                row["scan"] = scan.runs_since(before)  # which neuron scan ran (fused: torch or triton)
                row = {"workload": w, "impl": impl, "precision": precision, **row,
                       "network": None if w == "ann_train" else net,
                       "warmup_timesteps": kw.get("warmup_timesteps")}
                row["hardware"] = hardware(w, row, counts, peak_tflops, peak_tbps)
                rows.append(row)
        for r in rows:  # snnadv against each peer: snnTorch's loop (fp32), SpikingJelly in the same precision
            other = next((o for o in rows if o["workload"] == r["workload"] and o["impl"] == "snntorch"), None)
            r["speedup"] = r["images_per_s"] / other["images_per_s"] if other and r["impl"] == "snnadv" else None
            peer = next((o for o in rows if o["workload"] == r["workload"] and o["impl"] == "spikingjelly"
                         and o["precision"] == r["precision"]), None)
            r["speedup_vs_spikingjelly"] = r["images_per_s"] / peer["images_per_s"] \
                if peer and r["impl"] == "snnadv" else None
        infer = max((r for r in rows if r["workload"] == "snn_infer" and r["impl"] == "snnadv"),
                    key=lambda r: r["images_per_s"], default=None)
        result["rows"] = rows
        result["speedups"] = {_label(r): r["speedup"] for r in rows if r["speedup"] is not None}
        result["speedups_vs_spikingjelly"] = {_label(r): r["speedup_vs_spikingjelly"] for r in rows
                                              if r["speedup_vs_spikingjelly"] is not None}
        result["seconds_for_10k_test_images"] = 10000 / infer["images_per_s"] if infer else None
        result["load_avg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        loads = [l[0] for l in (load_before, result["load_avg_after"]) if l]
        result["under_load"] = bool(device.type == "cpu" and loads and max(loads) > 1.5 * (os.cpu_count() or 1))
        return result
    finally:
        torch.backends.cudnn.benchmark = cudnn_was


def _label(row: dict) -> str:
    """``workload`` for fp32 rows, ``workload:bf16`` otherwise (keys of ``speedups``)."""
    p = row.get("precision", "fp32")
    return row["workload"] if p == "fp32" else f"{row['workload']}:{p}"


def _mem(v) -> str:
    return "n/a" if v is None else f"{v / 2**20:.0f} MiB"


def print_result(result: dict, reporter: Reporter) -> None:
    rows = []
    peer = any(r["impl"] == "spikingjelly" for r in result["rows"])
    x = lambda v: None if v is None else f"{v:.2f}x"  # noqa: E731
    for r in result["rows"]:
        rows.append([r["workload"], f"{r['impl']} {r.get('precision', 'fp32')}", r["batch"], r["timesteps"], f"{r['images_per_s']:.4g}",
                     _mem(r["peak_mem_bytes"]), x(r["speedup"])]
                    + ([x(r.get("speedup_vs_spikingjelly"))] if peer else []))
    mem = result["rows"][0]["memory_measure"] if result["rows"] else ""
    opts = result.get("snnadv_options", {})
    extra = f", snnadv chunk {opts['chunk_steps']} steps" if opts.get("chunk_steps") else ""
    reporter.table(f"snnadv bench: {result['arch']} on {result['device_name']} ({result['device']}, "
                   f"{result['threads']} threads, torch {result['torch']}{extra}); peak mem = {mem}",
                   ["workload", "impl", "batch", "T", "images/s", "peak mem", "speed-up vs snntorch"]
                   + (["vs spikingjelly"] if peer else []), rows)
    hw = []
    for r in result["rows"]:
        h = r["hardware"]
        pct = lambda v: None if v is None else f"{v:.2f}%"  # noqa: E731
        hw.append([r["workload"], f"{r['impl']} {r.get('precision', 'fp32')}", f"{h['flops_per_image'] / 1e9:.3g}",
                   f"{h['achieved_tflops'] * 1e3:.4g}", pct(h["pct_peak_flops"]),
                   f"{h['state_bytes_per_image'] / 2**20:.3g}", pct(h["pct_peak_bandwidth"]), pct(h["pct_of_bound"])])
    pk = result["rows"][0]["hardware"] if result["rows"] else {}
    reporter.table(f"hardware limit: conv/linear FLOPs and neuron-state bytes per image, against "
                   f"peak {pk.get('peak_tflops') or '-'} TFLOP/s, {pk.get('peak_tbps') or '-'} TB/s",
                   ["workload", "impl", "GFLOP/img", "GFLOP/s", "%peak FLOP", "state MiB/img", "%peak BW",
                    "%bound"], hw)
    sj = result.get("peers", {}).get("spikingjelly", {})
    if peer:
        reporter.print(f"spikingjelly {sj.get('version')}: neuron op {sj.get('implementation')}; speed-up of "
                       f"snnadv against it in the same precision")
    for net, rates in result.get("spike_rates", {}).items():
        reporter.print(f"spike rate {net}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in rates.items()))
    if result.get("seconds_for_10k_test_images") is not None:
        reporter.print(f"SNN evaluation of 10,000 test images at T="
                       f"{next(r['timesteps'] for r in result['rows'] if r['workload'] == 'snn_infer')}: "
                       f"{result['seconds_for_10k_test_images']:.1f} s (projected)")
    if result.get("under_load"):
        reporter.print(f"[yellow]warning:[/] the machine was busy (load average {result['load_avg_before'][0]:.1f} "
                       f"before, {result['load_avg_after'][0]:.1f} after, {result['cpu_count']} CPUs): "
                       f"timings are disturbed; compare cpu_seconds in the JSON")


@guarded
def bench(cfg: dict, reporter: Reporter | None = None, outputs: Outputs | None = None) -> dict:
    """``snnadv bench``: run, print the table, write the JSON (``--out``, default runs/bench.json)."""
    reporter = reporter or Reporter(quiet=bool(cfg.get("quiet")))
    out = Path(cfg.get("out") or "runs/bench.json")
    if out.suffix != ".json":
        out = out / "bench.json"
    outputs.claim([out], cfg)
    result = run_bench(cfg, reporter)
    result["config"] = {k: v for k, v in cfg.items()}
    print_result(result, reporter)
    write_json(out, result)
    reporter.print(f"[green]saved[/] {out}")
    return result
