"""One checkpoint format for every stage (``ann``, ``snn-conv``, ``snn-bp``).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(weights_only=True)``: no pickled code is ever executed.
Fields:

    format, format_version   "snnadv-checkpoint", 1
    stage                    "ann" | "snn-conv" | "snn-bp"
    dataset, spec            dataset name and the architecture spec (plain dict)
    model                    settings to rebuild the model (input bits/range; for
                             SNNs: timesteps, leak, reset, surrogate, thresholds...)
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
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from . import __version__
from .errors import CheckpointError
from .models import ANN, SNN, ArchSpec
from .neurons import make_surrogate, surrogate_from_dict
from .report import atomic_target

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
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def load_checkpoint(path: str | os.PathLike, stage: str | tuple | None = None) -> dict:
    """Read a checkpoint (weights only); check its format and, if given, its stage."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a torch file
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        why = next((l for l in lines if "Unsupported global" in l or "error" in l.lower()), lines[0])
        raise CheckpointError(f"'{path}' is not a readable snnadv checkpoint ({why[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an snnadv checkpoint")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"'{path}' was written by a newer snnadv (format {ckpt['format_version']})")
    if stage is not None:
        wanted = (stage,) if isinstance(stage, str) else tuple(stage)
        if ckpt["stage"] not in wanted:
            raise CheckpointError(
                f"'{path}' is an {ckpt['stage']} checkpoint; expected {' or '.join(wanted)}")
    return ckpt


def model_settings(model) -> dict:
    """The settings :func:`build_model` needs to rebuild ``model`` (plain data)."""
    from .neurons import surrogate_to_dict

    if isinstance(model, ANN):
        return {"input_bits": model.input_bits, "input_range": model.input_range}
    return {
        "input_bits": model.encoder.bits, "input_range": model.encoder.input_range,
        "gain": model.encoder.gain, "num_steps": model.num_steps, "leak": model.leak,
        "reset": "zero" if model.neurons[0].hard_reset else "subtract",
        "surrogate": surrogate_to_dict(model.surrogate), "thresholds": model.thresholds(),
    }


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
    ``precision`` (``"fp32"`` | ``"bf16"``) is how an SNN runs, not part of the checkpoint.
    """
    precision = overrides.pop("precision", None) or "fp32"
    spec = ArchSpec.from_dict(ckpt["spec"])
    s = {**ckpt.get("model", {}), **{k: v for k, v in overrides.items() if v is not None}}
    if ckpt["stage"] == "ann":
        model = ANN(spec, s.get("input_bits"), s.get("input_range", "unit"), precision=precision)
    else:
        sur = s.get("surrogate") or {"name": "stdb"}
        sur = make_surrogate(sur) if isinstance(sur, str) else surrogate_from_dict(sur)
        model = SNN(spec, num_steps=int(s.get("num_steps", 100)), leak=float(s.get("leak", 1.0)),
                    reset=s.get("reset", "subtract"), surrogate=sur, input_bits=s.get("input_bits"),
                    input_range=s.get("input_range", "unit"), gain=float(s.get("gain", 1.0)),
                    precision=precision)
    load_weights(model, ckpt["state_dict"], "checkpoint")
    if ckpt["stage"] != "ann":
        model.set_thresholds(s.get("thresholds", {}))
    model.kind = ckpt["stage"]
    return model.to(device).eval()


def load_model(path, device="cpu", **overrides):
    """``nn.Module`` from any stage's checkpoint (images in [0, 1] -> logits)."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, device, **overrides)
    model.checkpoint_path = str(path)
    return model
