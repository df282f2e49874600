"""One checkpoint format for every stage (``ann``, ``snn-conv``, ``snn-bp``).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(weights_only=True)``: no pickled code is ever executed.
Fields:

    format, format_version   "snnadv-checkpoint", 1
    stage                    "ann" | "snn-conv" | "snn-bp"
    dataset, spec            dataset name and the architecture spec (plain dict)
    model                    settings to rebuild the model (input bits/range; for
                             SNNs: timesteps, leak, reset, surrogate, thresholds...,
                             the registered neuron and its extra parameters,
                             ``neuron``/``neuron_params``: "lif" when absent)
    state_dict               the weights
    config, metrics          the full resolved settings and the results
    versions                 snnadv / torch / snntorch versions
    parent                   {"path", "sha256"} of the checkpoint this one came from
    train_state              for --resume: epoch, optimizer, scheduler, RNG states,
                             history (kept after the last epoch, so a finished run
                             can be extended with --resume and more epochs; None
                             for stages that do not train)

Writes are atomic (temporary file in the same folder, then ``os.replace``), so an
interrupted write never leaves a half-written checkpoint in place of a good one.

Both directions are checked (:func:`check_checkpoint`): a checkpoint whose fields are
missing or ill-typed, whose spec is not a sane architecture (unknown layer kinds,
non-positive or absurd sizes, more parameters than :data:`MAX_PARAMS`), whose weights
are not finite or whose thresholds / neuron settings are out of their domain is
neither written nor loaded: one line names the file and what was expected, before
any model is allocated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import warnings
import zipfile
from pathlib import Path

import torch

from . import __version__
from .errors import CheckpointError
from .models import ANN, SNN, ArchSpec
from .models.spec import _KIND
from .registry import NEURONS, SURROGATES
from .surrogates import make_surrogate, surrogate_from_dict, surrogate_to_dict
from .atomic import atomic_target

FORMAT = "snnadv-checkpoint"
FORMAT_VERSION = 1
STAGES = ("ann", "snn-conv", "snn-bp")


def versions() -> dict:
    import snntorch

    return {"snnadv": __version__, "torch": str(torch.__version__), "snntorch": str(snntorch.__version__)}


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file (recorded in every result that used it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> Path:
    """Write ``ckpt`` to ``path`` atomically; returns the path."""
    path = Path(path)
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **ckpt}
    check_checkpoint(ckpt, f"not writing '{path}'")
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def load_checkpoint(path: str | os.PathLike, stage: str | tuple | None = None) -> dict:
    """Read a checkpoint (weights only); check its format, structure and values
    (:func:`check_checkpoint`) and, if given, its stage."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist" if not path.exists()
                              else f"checkpoint '{path}' is not a file")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the error below says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, not a torch file, or pickled code
        raise CheckpointError(_unreadable(path, e)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an snnadv checkpoint")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"'{path}' was written by a newer snnadv (format {version})")
    check_checkpoint(ckpt, f"'{path}'")
    if stage is not None:
        wanted = (stage,) if isinstance(stage, str) else tuple(stage)
        if ckpt["stage"] not in wanted:
            raise CheckpointError(
                f"'{path}' is an {ckpt['stage']} checkpoint; expected {' or '.join(wanted)}")
    return ckpt


def _unreadable(path: Path, e: Exception) -> str:
    """Why ``torch.load`` refused ``path``, in words (never torch's advice to load unsafely)."""
    if "Unsupported global" in str(e) or "GLOBAL" in str(e):
        return (f"'{path}' is not an snnadv checkpoint: it holds pickled Python objects, which snnadv never "
                f"loads (the file may be unsafe)")
    with open(path, "rb") as f:
        head = f.read(2)
    if zipfile.is_zipfile(path) or head == b"PK" or head[:1] == b"\x80":  # a torch zip or a legacy pickle
        return f"'{path}' is not a readable snnadv checkpoint: damaged, truncated, or holding data snnadv does not load"
    return f"'{path}' is not a torch checkpoint (not a file written by snnadv)"


#: architecture bounds a checkpoint's spec must keep (a spec beyond them is not a model
#: snnadv wrote, and building it could allocate terabytes)
MAX_WIDTH, MAX_KERNEL, MAX_PARAMS = 1 << 20, 64, 2_000_000_000
_INT_FIELDS = {"cin": (1, MAX_WIDTH), "cout": (1, MAX_WIDTH), "fin": (1, MAX_WIDTH), "fout": (1, MAX_WIDTH),
               "k": (1, MAX_KERNEL), "stride": (1, MAX_KERNEL), "pad": (0, MAX_KERNEL)}


def _bad(where: str, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: {what}")


def _is_int(v, lo, hi) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_spec(spec, where: str) -> int:
    """Check an architecture spec (plain dict) without building it; its parameter count."""
    if not isinstance(spec, dict):
        raise _bad(where, f"'spec' must be a table describing the architecture, got {type(spec).__name__}")
    if not isinstance(spec.get("arch"), str):
        raise _bad(where, "spec has no architecture name ('arch')")
    for key, lo, hi in (("num_classes", 1, 100_000), ("in_channels", 1, 64), ("image_size", 1, 4096)):
        if (key != "num_classes" and key not in spec):
            continue
        if not _is_int(spec.get(key), lo, hi):
            raise _bad(where, f"spec {key} must be an integer in [{lo}, {hi}], got {spec.get(key)!r}")
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _bad(where, "spec 'layers' must be a non-empty list")
    params = 0
    for i, rec in enumerate(layers):
        if not isinstance(rec, dict) or rec.get("kind") not in _KIND:
            kind = rec.get("kind") if isinstance(rec, dict) else rec
            raise _bad(where, f"spec layer {i} has unknown kind {kind!r} (known: {', '.join(_KIND)})")
        fields = {f.name: f for f in dataclasses.fields(_KIND[rec["kind"]])}
        extra = set(rec) - set(fields) - {"kind"}
        missing = [n for n, f in fields.items() if n not in rec and f.default is dataclasses.MISSING]
        if extra or missing:
            raise _bad(where, f"spec layer {i} ({rec['kind']}) has " + (
                f"unknown field '{sorted(extra)[0]}'" if extra else f"no '{missing[0]}'"))
        name = rec.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            raise _bad(where, f"spec layer {i} has an invalid name {name!r}")
        for key, v in rec.items():
            if key in _INT_FIELDS and not _is_int(v, *_INT_FIELDS[key]):
                lo, hi = _INT_FIELDS[key]
                raise _bad(where, f"layer {name}: {key} must be an integer in [{lo}, {hi}], got {v!r}")
            if key == "p" and not (_is_num(v) and 0 <= v < 1):
                raise _bad(where, f"layer {name}: dropout p must be in [0, 1), got {v!r}")
        kind, g = rec["kind"], {**{n: f.default for n, f in fields.items()}, **rec}
        if kind == "Conv":
            params += g["cin"] * g["cout"] * g["k"] ** 2
        elif kind == "Linear":
            params += g["fin"] * g["fout"]
        elif kind == "Block":
            params += 9 * g["cout"] * (g["cin"] + g["cout"]) + g["cin"] * g["cout"]
    if params > MAX_PARAMS:
        raise _bad(where, f"its spec has {params:.3g} weights ({params * 4 / 1e9:.3g} GB); "
                          f"more than {MAX_PARAMS:.0e} is not a model snnadv builds")
    return params


def check_checkpoint(ckpt: dict, where: str) -> None:
    """The fields every stage reads, with sane types and values (no model is built).

    ``where`` starts the message (e.g. the file name).  Weights must be finite; SNN
    thresholds and the scale stored by ``convert`` finite and positive; the leak in
    (0, 1]; timesteps a positive integer.
    """
    if ckpt.get("stage") not in STAGES:
        raise _bad(where, f"'stage' must be one of {', '.join(STAGES)}, got {ckpt.get('stage')!r}")
    from .data import DATASETS

    if ckpt.get("dataset") not in DATASETS:
        raise _bad(where, f"'dataset' must be one of {', '.join(DATASETS)}, got {ckpt.get('dataset')!r}")
    check_spec(ckpt.get("spec"), where)
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise _bad(where, "'state_dict' (the weights) is missing or empty")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise _bad(where, f"weight '{k}' is not a tensor")
        # one reduction (NaN and inf survive a sum); the elementwise test only to confirm
        if v.is_floating_point() and not math.isfinite(float(v.sum())) and not bool(torch.isfinite(v).all()):
            raise _bad(where, f"weight '{k}' has non-finite values (NaN or inf): the model diverged")
    model = ckpt.get("model", {})
    if not isinstance(model, dict):
        raise _bad(where, "'model' must be a table of model settings")
    bits = model.get("input_bits")
    if bits is not None and not _is_int(bits, 1, 8):
        raise _bad(where, f"input_bits must be an integer from 1 to 8 or none, got {bits!r}")
    if ckpt["stage"] == "ann":
        return
    thresholds = model.get("thresholds", {})
    if not isinstance(thresholds, dict):
        raise _bad(where, "'thresholds' must be a table of layer -> threshold")
    for name, v in thresholds.items():
        if not (_is_num(v) and v > 0):
            raise _bad(where, f"threshold of {name} must be a finite positive number, got {v!r}")
    for key, ok, domain in (("leak", lambda v: _is_num(v) and 0 < v <= 1, "in (0, 1]"),
                            ("finetune_scale", lambda v: _is_num(v) and v > 0, "finite and positive"),
                            ("gain", lambda v: _is_num(v) and v > 0, "finite and positive"),
                            ("num_steps", lambda v: _is_int(v, 1, 10 ** 6), "a positive integer")):
        if key in model and not ok(model[key]):
            raise _bad(where, f"{key} must be {domain}, got {model[key]!r}")
    sur = model.get("surrogate")
    name = sur.get("name") if isinstance(sur, dict) else sur
    if sur is not None and (name not in SURROGATES or isinstance(sur, dict) and not all(
            _is_num(v) for k, v in sur.items() if k != "name")):
        raise _bad(where, f"surrogate must be one of {', '.join(SURROGATES)} with finite parameters, got {sur!r}")
    neuron = model.get("neuron", "lif")
    if not isinstance(neuron, str) or neuron not in NEURONS:
        raise _bad(where, f"its neuron {neuron!r} is not a registered neuron (registered: {', '.join(NEURONS)}; "
                          f"a plugin's neuron needs its plugin loaded)")
    params = model.get("neuron_params", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) and (
            v is None or isinstance(v, (str, bool)) or _is_num(v)) for k, v in params.items()):
        raise _bad(where, f"neuron_params must be a table of finite numbers, strings or booleans, got {params!r}")


def model_settings(model) -> dict:
    """The settings :func:`build_model` needs to rebuild ``model`` (plain data): for an
    SNN also its registered neuron and the neuron's extra parameters (a neuron without
    a leak or a swappable surrogate records none)."""
    if isinstance(model, ANN):
        return {"input_bits": model.input_bits, "input_range": model.input_range}
    settings = {
        "input_bits": model.encoder.bits, "input_range": model.encoder.input_range,
        "gain": model.encoder.gain, "num_steps": model.num_steps, "leak": model.leak,
        "reset": model.reset, "surrogate": surrogate_to_dict(model.surrogate) if model.surrogate else None,
        "thresholds": model.thresholds(), "neuron": model.neuron, "neuron_params": model.neuron_params,
    }
    return {k: v for k, v in settings.items() if v is not None or k == "input_bits"}


def weights(model) -> dict:
    """The model's learned weights (neuron settings live in ``model`` settings, not here)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not _neuron_buffer(k)}


def load_weights(model, state_dict: dict, source: str = "checkpoint") -> None:
    """Load weights, turning a shape or name mismatch into a one-line error."""
    own = {k: v for k, v in model.state_dict().items() if not _neuron_buffer(k)}
    state_dict = {k: v for k, v in state_dict.items() if not _neuron_buffer(k)}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or bad:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"{bad[0]} has shape {tuple(state_dict[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
        raise CheckpointError(f"{source} does not fit a {model.spec.arch} with {model.spec.num_classes} "
                              f"classes ({what})")
    model.load_state_dict(state_dict, strict=False)


def _neuron_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("threshold", "beta", "graded_spikes_factor", "reset_mechanism_val")


def build_model(ckpt: dict, device="cpu", **overrides):
    """The model a checkpoint describes, weights loaded, in eval mode.

    ``overrides`` change settings (e.g. ``num_steps=50``, ``input_bits=4``);
    ``precision`` (``"fp32"`` | ``"bf16"``) is how an SNN runs, not part of the checkpoint;
    ``kind``: the SNN's stage when it differs from the checkpoint's (fine-tuning starts
    an ``snn-bp`` model from an ``snn-conv`` checkpoint).
    """
    precision = overrides.pop("precision", None) or "fp32"
    kind = overrides.pop("kind", None) or ckpt["stage"]
    spec = ArchSpec.from_dict(ckpt["spec"])
    s = {**ckpt.get("model", {}), **{k: v for k, v in overrides.items() if v is not None}}
    if ckpt["stage"] == "ann":
        model = ANN(spec, s.get("input_bits"), s.get("input_range", "unit"), precision=precision)
    else:
        sur = s.get("surrogate") or {"name": "stdb"}
        sur = make_surrogate(sur) if isinstance(sur, str) else surrogate_from_dict(sur)
        # (checkpoints written before neurons were named are LIF networks)
        model = SNN(spec, num_steps=int(s.get("num_steps", 100)), leak=float(s.get("leak", 1.0)),
                    reset=s.get("reset", "subtract"), surrogate=sur, input_bits=s.get("input_bits"),
                    input_range=s.get("input_range", "unit"), gain=float(s.get("gain", 1.0)),
                    precision=precision, neuron=s.get("neuron", "lif"), neuron_params=s.get("neuron_params"),
                    kind=kind)
    load_weights(model, ckpt["state_dict"], "checkpoint")
    if ckpt["stage"] != "ann":
        model.set_thresholds(s.get("thresholds", {}))
    return model.to(device).eval()


def load_model(path, device="cpu", **overrides):
    """``nn.Module`` from any stage's checkpoint (images in [0, 1] -> logits)."""
    return build_model(load_checkpoint(path), device, **overrides)
