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

On a CPU (:func:`free_bytes`): the budget is 90 % of the system's available memory plus
what this process's C heap holds free, up to the largest pass it already ran, and the estimate is multiplied by
:data:`CPU_HEAP_FACTOR` while glibc keeps freed memory (:mod:`snnadv.runtime`, every
``snnadv`` command): its heap fragments, and the resident memory of long runs was measured
1.4-1.7 x the estimate.  ``SNNADV_MEMORY_LIMIT`` (GiB) caps the budget on any device, so
two runs can share a machine.  An attack's input gradient (:meth:`snnadv.attacks.Attack.
input_gradient`) is split into pieces that fit (keyed draws: the same result); the
estimator module's batched EOT cannot be split without changing its draws, so a pass that
would not fit is refused with the batch size that would (:func:`require`) before the
kernel's OOM killer ends the run.

``snnadv doctor --memory`` prints the plan of every stage of the paper configs on an
80 GiB budget (one H100/H200 80 GB-class GPU; :func:`snnadv.doctor.paper_plan`).
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass

import psutil
import torch
import torch.nn.functional as F

from . import runtime
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
#: resident bytes per estimated byte on a CPU whose C library keeps freed memory (the CLI's
#: setting, :mod:`snnadv.runtime`): its heap fragments.  Measured on a 2-core Xeon, VGG5,
#: peak resident growth over :func:`peak_bytes` after repeated calls: alg1 1.04-1.40, bptt
#: 1.04-1.41, batched EOT 1.36; whole runs, resident memory less the 0.8 GiB base: 1.49,
#: 1.52 and 1.71 (three runs of the medium table stage's crafting, alg1, batch 128, T=128,
#: at their OOM kills: 16.4-18.75 GiB) and 1.56 (strong-cpu).  2 leaves a margin over the worst.
#: Without the setting the estimate is above the growth (0.66-0.74).
CPU_HEAP_FACTOR = 2.0
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
    estimate (times :func:`allocator_factor` of ``device_type``) fits ``budget`` bytes:
    ``{"batch", "pieces", "chunk", "peak_bytes"}``."""
    factor = allocator_factor(device_type)
    batches = [batch] if profile.kind in TRAINING else sorted({batch, *[2 ** k for k in range(batch.bit_length())]},
                                                               reverse=True)
    for b in batches:
        if b > batch:
            continue
        chunk = chunk_for(profile, b, timesteps, device_type)
        while True:
            peak = int(factor * peak_bytes(profile, b, timesteps, chunk))
            if peak <= budget or chunk == 1:
                break
            chunk = max(1, chunk // 2)
        if peak <= budget:
            return {"batch": b, "pieces": math.ceil(batch / b), "chunk": chunk, "peak_bytes": peak}
    smallest = batches[-1]
    need = int(factor * peak_bytes(profile, smallest, timesteps, 1))
    what = "a training batch must stay whole" if profile.kind in TRAINING else "even one image does not fit"
    raise SnnadvError(f"{profile.arch} {profile.kind} at T={timesteps}, batch {smallest}: needs about "
                      f"{need / GiB:.1f} GiB, the budget is {budget / GiB:.1f} GiB ({what}); use a smaller "
                      f"--batch-size or T, or --precision bf16")


def max_batch(model, batch: int, timesteps: int, kind: str, budget: int, device_type: str = "cuda") -> int:
    """The largest piece of ``batch`` images of ``model`` (an SNN) that fits ``budget``
    bytes for ``kind`` (``alg1`` | ``bptt`` | ``infer``) on ``device_type``, measured on
    the model's architecture (cached) and precision."""
    profile = _profile(model.spec, kind, model.precision)
    chosen = plan(profile, batch, timesteps, budget, device_type)
    grant(device_type, chosen["peak_bytes"])
    return chosen["batch"]


def gradient_kind(source) -> str:
    """The stage kind whose profile a gradient source's pass is estimated with: ``alg1``
    for Algorithm 1 (and its EOT), ``bptt`` for every other path."""
    return "alg1" if getattr(source, "name", "").startswith("alg1") else "bptt"


def allocator_factor(device_type: str) -> float:
    """How much more than :func:`peak_bytes` a process holds on ``device_type``: on a CPU
    whose C library keeps freed memory (:func:`snnadv.runtime.keep_freed_memory`, what
    every ``snnadv`` command applies), :data:`CPU_HEAP_FACTOR`; else 1."""
    return CPU_HEAP_FACTOR if device_type == "cpu" and runtime.keep_freed_memory_applied() else 1.0


def _available_bytes() -> int | None:
    """The memory the system can give without swapping (psutil: ``MemAvailable`` on
    Linux); None where psutil cannot tell."""
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, AttributeError):
        return None


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _find_mallinfo2():
    """glibc's ``mallinfo2`` (looked up once), or None (another C library, glibc < 2.33)."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn


_MALLINFO2 = _find_mallinfo2()


def heap_free_bytes() -> int:
    """Bytes this process's C heap holds free for reuse (glibc's ``mallinfo2().fordblks``):
    memory that counts as used for the system but that the next tensors get; 0 where
    unknown (another C library, glibc < 2.33)."""
    return int(_MALLINFO2().fordblks) if _MALLINFO2 is not None else 0


def limit_bytes() -> int | None:
    """``SNNADV_MEMORY_LIMIT`` (GiB) as bytes, None when unset; a bad value is an error."""
    raw = os.environ.get("SNNADV_MEMORY_LIMIT", "").strip()
    if not raw:
        return None
    try:
        gib = float(raw)
    except ValueError:
        gib = float("nan")
    if not (gib > 0 and math.isfinite(gib)):
        raise SnnadvError(f"SNNADV_MEMORY_LIMIT={raw!r}: give the GiB this process may use, a positive number")
    return int(gib * GiB)


def _rss_bytes() -> int:
    """This process's resident bytes (0 where psutil cannot tell)."""
    try:
        return int(psutil.Process().memory_info().rss)
    except (OSError, RuntimeError, AttributeError, psutil.Error):
        return 0


#: the largest estimate (bytes) granted to a pass in this process, per device type
_GRANTED: dict[str, int] = {}


def grant(device_type: str, peak: int) -> None:
    """Record that a pass estimated at ``peak`` bytes runs now (see :func:`free_bytes`)."""
    _GRANTED[device_type] = max(_GRANTED.get(device_type, 0), int(peak))


def _local_ranks() -> int:
    """Processes that torchrun started on this machine (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def free_bytes(device: torch.device) -> int | None:
    """The memory an attack may plan with, in bytes.

    * CUDA: 90 % of what the GPU has free (plus what PyTorch holds cached).
    * CPU: 90 % of the memory the system has available (psutil; ``MemAvailable`` on
      Linux), shared equally by the processes torchrun started on this machine
      (``LOCAL_WORLD_SIZE``), plus what this process's heap holds free
      (:func:`heap_free_bytes`) up to the largest estimate this process was already granted
      (:func:`grant`): holes that a pass of that size left can hold it again, while holes
      left by other work (decoding a data set) may be too small for its tensors.  Where psutil cannot tell: None (batches are not split).

    ``SNNADV_MEMORY_LIMIT=G`` (GiB) caps it at G minus what this process uses now (on a
    CPU its resident memory less its free heap; on CUDA what PyTorch has allocated), so
    that two runs can share one machine without the kernel's OOM killer ending either."""
    limit = limit_bytes()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = int(0.9 * (free + cached))
    elif device.type == "cpu":
        available = _available_bytes()
        if available is None:
            return None if limit is None else max(0, limit - _rss_bytes())
        held = heap_free_bytes()
        budget = int(0.9 * available / _local_ranks()) + min(held, _GRANTED.get(device.type, 0))
    else:
        return None
    if limit is None:
        return budget
    # the process's live bytes (read only under a limit: this runs before every gradient call)
    used = torch.cuda.memory_allocated(device) if device.type == "cuda" else max(0, _rss_bytes() - held)
    return max(0, min(budget, limit - used))


def require(model, rows: int, timesteps: int, kind: str, chunk: int | None, what: str, per_row: int = 1,
            training: bool = False, option: str = "--batch-size") -> None:
    """Refuse, with the estimate and a batch size that fits, to run ``kind`` on ``rows``
    rows of ``model`` (an SNN) at ``timesteps`` in chunks of ``chunk`` when that would not
    fit :func:`free_bytes` (times :func:`allocator_factor`).  A pass that cannot be split
    into pieces without changing its random draws calls this instead of splitting (the
    estimator module's batched EOT).  ``chunk`` None: the chunk the model's time loop picks
    for ``rows`` with autograd on (:meth:`snnadv.models.SNN.chunk_for`).  ``per_row``: rows per image of the user's batch (its
    EOT copies), for the batch size suggested; ``training``: the batch is part of the recipe,
    and the line says so; ``option``: the setting whose smaller value the line suggests."""
    device = next(model.parameters()).device
    budget = free_bytes(device)
    if budget is None:
        return
    if chunk is None:
        with torch.enable_grad():
            chunk = min(model.chunk_for(rows, timesteps, device.type), timesteps)
    profile = _profile(model.spec, kind, model.precision)
    factor = allocator_factor(device.type)
    peak = int(factor * peak_bytes(profile, rows, timesteps, chunk))
    if peak <= budget:
        grant(device.type, peak)
        return

    def fits(r: int) -> bool:  # r rows, chunked as the pass would chunk them (one chunk stays one)
        c = timesteps if chunk >= timesteps else chunk_for(profile, r, timesteps, device.type)
        return int(factor * peak_bytes(profile, r, timesteps, c)) <= budget

    lo, hi = 0, rows // per_row - 1  # the largest batch of images below this one that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * per_row) else (lo, mid - 1)
    hint = f"{option} {lo} fits" if lo else "not even one image fits: lower T or use --precision bf16"
    if training and lo:
        hint = f"a training batch is not split: --batch-size {lo} fits (another recipe), or lower T, or --precision bf16"
    copies = f" x {per_row} EOT copies" if per_row > 1 else ""
    raise SnnadvError(f"{what}: {rows // per_row} images{copies} at T={timesteps} need about "
                      f"{peak / GiB:.1f} GiB, {budget / GiB:.1f} GiB is free on {device.type}; {hint}")


_PROFILES: dict = {}


def _profile(spec: ArchSpec, kind: str, precision: str) -> Profile:
    """:func:`measure`, once per process, leaving the global RNG as it was (an attack
    that plans its pieces draws the same random numbers afterwards)."""
    key = (repr(spec.to_dict()), kind, precision)
    if key not in _PROFILES:
        with torch.random.fork_rng(devices=[]):
            _PROFILES[key] = measure(spec, kind, precision)
    return _PROFILES[key]
