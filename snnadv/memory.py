"""Memory plan for paper-scale runs: how many bytes a stage needs, and which batch and
time chunk fit a device.

What is measured (:func:`measure`, on any device, in a second or two): the bytes that
autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``, every
saved storage counted once, parameters excluded) at (batch, T) = (1, 2), (1, 4) and
(2, 2), in one chunk, which gives

* ``per_step``: bytes per image and timestep (the spikes the scans keep as bool, the
  synaptic layers' inputs, dropout masks), and
* ``per_chunk``: bytes per image and chunk (state frames, the readout), and
* ``chunk_fixed``: bytes per chunk whatever the batch (under bf16 autocast, the bf16
  copies of the weights each chunk's layers keep).

What is modelled on top (:func:`peak_bytes`):

* the parameters, times the copies a stage holds (weights; gradients and optimizer
  state when training; a bf16 weight copy under autocast);
* the neuron state (membrane and dt, fp32, per neuron per image);
* the transient buffers of one chunk: :data:`TRANSIENT_BYTES` per value of the
  widest layer, per image and step of the chunk (its fp32 current, spikes, and with
  autograd their gradients);
* the training set held on the device (uint8) for training stages.

:func:`plan` picks the largest batch (at most the requested one) and the chunk that
SNN's own rule gives (:meth:`snnadv.models.SNN.chunk_for`, smaller if needed) whose
estimate fits a budget; a training stage must keep its batch (the batch is part of
the recipe), an attack or an evaluation is split into pieces of that batch.  When
nothing fits it raises :class:`~snnadv.errors.SnnadvError` with the estimate.

``snnadv doctor --memory`` prints the plan of every stage of the paper configs on an
80 GiB budget (one H100/H200 80 GB-class GPU; :func:`snnadv.doctor.paper_plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import SnnadvError
from .models.spec import ArchSpec

GiB = 2 ** 30
#: bytes per value of the widest layer, per image and step of a chunk, held at once
#: besides what autograd saves: with autograd, the fp32 current, the spikes and their
#: two gradients (4 x 4); without, the current and the spikes (2 x 4) plus the
#: encoder's frames
TRANSIENT_BYTES = {True: 16, False: 12}
#: parameter copies per stage kind: weights (+ gradients + optimizer state)
PARAM_COPIES = {"ann-train": 3, "snn-train": 4, "alg1": 1, "bptt": 1, "infer": 1}
#: which kinds keep a batch as asked (training) and which may be split into pieces
TRAINING = {"ann-train", "snn-train"}
KINDS = tuple(PARAM_COPIES)
#: CIFAR-10/100 as uint8 on the device (50,000 + 10,000 images of 3 x 32 x 32)
DATA_BYTES = 60_000 * 3 * 32 * 32


@dataclass(frozen=True)
class Profile:
    """Bytes autograd saves for one kind of stage (see the module docstring)."""

    arch: str
    kind: str
    precision: str
    per_step: int      # per image per timestep (per image for the ANN)
    per_chunk: int     # per image per chunk
    chunk_fixed: int   # per chunk, whatever the batch (bf16 copies of the weights under autocast)
    param_bytes: int   # one copy of the parameters
    neurons: int       # spiking neurons per image (state: membrane + dt, fp32)
    widest: int        # values of the widest layer per image


def _saved_bytes(model, run) -> int:
    """Bytes of the storages autograd saves while ``run()`` builds the graph (each
    counted once; parameters and buffers excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def measure(spec: ArchSpec, kind: str, precision: str = "fp32", device="cpu", leak: float = 0.99) -> Profile:
    """Measure ``kind`` (one of :data:`KINDS`) for ``spec`` with saved-tensor hooks on a
    run at (batch, T) = (1, 2), (1, 4), (2, 2), one chunk each; ``infer`` saves nothing."""
    from .gradients import Algorithm1
    from .models import ANN, SNN

    if kind not in KINDS:
        raise SnnadvError(f"unknown stage kind '{kind}' (choose {', '.join(KINDS)})")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(1, spec.in_channels, spec.image_size, spec.image_size, generator=gen, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    if kind == "ann-train":
        model = ANN(spec).to(device).train()
        per_image = _saved_bytes(model, lambda: F.cross_entropy(model(x), y))
        return Profile(spec.arch, kind, "fp32", per_image, 0, 0, _param_bytes(model), 0, spec.widest_activation())
    saved = {}
    for B, T in ((1, 2), (1, 4), (2, 2)):
        model = SNN(spec, num_steps=T, leak=leak, precision=precision, chunk_steps=T).to(device)
        model.set_thresholds({n: 0.3 for n in model.neuron_names})
        model.train(kind == "snn-train")
        xb, yb = x.expand(B, -1, -1, -1), y.expand(B)
        if kind == "alg1":
            source = Algorithm1(model)
            saved[B, T] = _saved_bytes(model, lambda: source.first_layer_grad(xb, yb))
        elif kind == "infer":
            saved[B, T] = 0
        else:
            xg = xb.clone().requires_grad_(kind == "bptt")
            saved[B, T] = _saved_bytes(model, lambda: F.cross_entropy(model(xg), yb))
    # saved(B, T) = B (T per_step + per_chunk) + chunk_fixed, one chunk
    per_step = (saved[1, 4] - saved[1, 2]) // 2
    per_chunk = max(0, saved[2, 2] - saved[1, 2] - 2 * per_step)
    fixed = max(0, saved[1, 2] - 2 * per_step - per_chunk)
    return Profile(spec.arch, kind, precision, per_step, per_chunk, fixed, _param_bytes(model),
                   sum(_neurons(spec)), spec.widest_activation())


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _neurons(spec: ArchSpec) -> list[int]:
    """Spiking neurons per image, per spiking layer (from a one-image ANN pass's shapes)."""
    from .models import ANN

    counts = []
    ann = ANN(spec)
    hooks = [m.register_forward_hook(lambda m, i, o: counts.append(o[0].numel()))
             for m in ann.modules() if isinstance(m, torch.nn.ReLU)]
    with torch.no_grad():
        ann(torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size))
    for h in hooks:
        h.remove()
    return counts


def chunk_for(profile: Profile, batch: int, timesteps: int, device_type: str = "cuda") -> int:
    """The chunk :meth:`snnadv.models.SNN.chunk_for` picks (no ``chunk_steps`` set)."""
    from .models.snn import SNN

    if profile.kind == "ann-train":
        return 1
    budget = SNN.grad_chunk_budget if profile.kind != "infer" else \
        SNN.chunk_budget.get(device_type, SNN.chunk_budget["cpu"])
    return max(1, min(timesteps, budget // (batch * profile.widest)))


def peak_bytes(profile: Profile, batch: int, timesteps: int, chunk: int) -> int:
    """Estimated peak bytes of one step of the stage at this batch, T and chunk."""
    copies = PARAM_COPIES[profile.kind] + (0.5 if profile.precision == "bf16" else 0)
    static = int(profile.param_bytes * copies) + (DATA_BYTES if profile.kind in TRAINING else 0)
    if profile.kind == "ann-train":
        return static + batch * profile.per_step
    chunks = math.ceil(timesteps / chunk)
    saved = batch * (timesteps * profile.per_step + chunks * profile.per_chunk) + chunks * profile.chunk_fixed
    state = batch * profile.neurons * 8
    transient = chunk * batch * profile.widest * TRANSIENT_BYTES[profile.kind != "infer"]
    return static + saved + state + transient


def plan(profile: Profile, batch: int, timesteps: int, budget: int, device_type: str = "cuda") -> dict:
    """The largest batch <= ``batch`` (training: exactly ``batch``) and a chunk whose
    estimate fits ``budget`` bytes: ``{"batch", "pieces", "chunk", "peak_bytes"}``."""
    batches = [batch] if profile.kind in TRAINING else sorted({batch, *[2 ** k for k in range(batch.bit_length())]},
                                                               reverse=True)
    for b in batches:
        if b > batch:
            continue
        chunk = chunk_for(profile, b, timesteps, device_type)
        while True:
            peak = peak_bytes(profile, b, timesteps, chunk)
            if peak <= budget or chunk == 1:
                break
            chunk = max(1, chunk // 2)
        if peak <= budget:
            return {"batch": b, "pieces": math.ceil(batch / b), "chunk": chunk, "peak_bytes": peak}
    smallest = batches[-1]
    need = peak_bytes(profile, smallest, timesteps, 1)
    what = "a training batch must stay whole" if profile.kind in TRAINING else "even one image does not fit"
    raise SnnadvError(f"{profile.arch} {profile.kind} at T={timesteps}, batch {smallest}: needs about "
                      f"{need / GiB:.1f} GiB, the budget is {budget / GiB:.1f} GiB ({what}); use a smaller "
                      f"--batch-size or T, or --precision bf16")


def max_batch(model, batch: int, timesteps: int, kind: str, budget: int) -> int:
    """The largest piece of ``batch`` images of ``model`` (an SNN) that fits ``budget``
    bytes for ``kind`` (``alg1`` | ``bptt`` | ``infer``), measured on the model's
    architecture (cached) and precision."""
    profile = _profile(model.spec, kind, model.precision)
    return plan(profile, batch, timesteps, budget)["batch"]


def free_bytes(device: torch.device) -> int | None:
    """The memory an attack may plan with: 90 % of what the GPU has free (plus what
    PyTorch holds cached); None on a CPU (batches are never split there)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(0.9 * (free + cached))


_PROFILES: dict = {}


def _profile(spec: ArchSpec, kind: str, precision: str) -> Profile:
    """:func:`measure`, once per process, leaving the global RNG as it was (an attack
    that plans its pieces draws the same random numbers afterwards)."""
    key = (repr(spec.to_dict()), kind, precision)
    if key not in _PROFILES:
        with torch.random.fork_rng(devices=[]):
            _PROFILES[key] = measure(spec, kind, precision)
    return _PROFILES[key]
