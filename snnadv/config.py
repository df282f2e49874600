"""Settings: the paper's defaults in one place, TOML configs, and flag overrides.

A config file (``configs/*.toml``, read with :mod:`tomllib`) has a ``[common]``
table, read by every stage, and one table per stage named like the subcommand
(``[train-ann]``, ``[convert]``, ``[finetune]``, ...).  A stage's settings are

    defaults (below)  <  [common]  <  [stage]  <  command-line flags

Relative paths in a config (``data_dir``, ``out``, checkpoints) are taken relative
to the current directory, as on the command line.  An unknown key is an error, so
a typo never silently falls back to a default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import SnnadvError

#: settings every stage accepts (the one CLI convention)
COMMON = {
    "dataset": "cifar10",
    "data_dir": "../shared/data/cifar10-mini",
    "download": False,
    "device": "auto",
    "seed": 0,
    "batch_size": 64,
    "train_subset": None,
    "test_subset": None,
    "out": None,
    "quiet": False,
    "precision": "fp32",  # SNN synaptic layers: fp32 | bf16 (autocast; membranes stay fp32)
}

#: per-stage defaults: the paper's recipe (Sec. 3.2, reference-notes.md)
STAGES = {
    "train-ann": {
        "arch": "vgg5", "epochs": None, "lr": None, "milestones": None, "momentum": 0.9,
        "weight_decay": 1e-4, "input_bits": None, "input_range": "unit", "resume": False,
        # a faster recipe for a CPU (configs/vgg5_cifar10_cpu.toml); these defaults are the paper's
        "optimizer": "sgd", "nesterov": False, "schedule": "step", "warmup": 0.0, "label_smoothing": 0.0,
        "init": "he", "channels_last": False,
    },
    "convert": {
        "checkpoint": None, "timesteps": 2500, "batches": 1, "percentile": 100.0, "scale": 0.7,
        "balance": "all", "curve": [100, 250, 500, 1000, 2500], "eval_batch_size": None,
    },
    "finetune": {
        "checkpoint": None, "leak": 0.99, "timesteps": None, "surrogate": "stdb", "alpha": 0.3,
        "beta": 0.01, "gamma": 0.3, "epochs": 15, "lr": 1e-4, "lr_step": 5, "lr_gamma": 0.5,
        "weight_decay": 5e-4, "scale": None, "resume": False,
    },
    "attack": {
        "source": "ann", "target": None, "source_ckpt": None, "target_ckpt": None, "attack": "pgd",
        "eps": "8/255", "alpha": "2/255", "steps": 7, "random_start": False, "timesteps": None,
        "gradient": None, "eot": 1, "input_bits": None, "eval_draws": 1, "targeted": False, "test_subset": 1000,
    },
    "table": {
        "ann": None, "snn_conv": None, "snn_bp": None, "ann_ii": None, "snn_conv_ii": None,
        "snn_bp_ii": None, "eps": "8/255", "alpha": "2/255", "steps": 7, "random_start": False,
        "conv_timesteps": None, "bp_timesteps": None, "gradient": "alg1", "eval_draws": 1,
        "input_bits": None, "test_subset": 1000, "tables": ["1", "2"],
    },
    # ``snnadv analyze ...`` (snnadv/analysis): one table for all five analyses; None
    # means "the analysis' own default" (e.g. timesteps 50,75,100,150 for the sweep,
    # 50,150,300,2000 for the encoder); lists may be TOML lists or "a,b,c" strings
    "analyze": {
        "checkpoint": None, "source_ckpt": None, "ann_ckpt": None, "model": "snn-bp", "timesteps": None,
        "bits": None, "leaks": None, "attacks": "fgsm,pgd", "eps": "8/255", "alpha": "2/255", "steps": 7,
        "random_start": False, "eval_draws": 1, "epochs": None, "lr": None, "surrogate": None, "scale": None,
        "force": False, "test_subset": 1000, "ratios": None, "lam_min": 0.75, "lam_max": 0.9999,
        "points": None, "sim_steps": 2000, "threshold": 1.0, "leak": 0.99, "reset": "zero",
        "attack": "pgd", "image": 0,
    },
    "evaluate": {  # adaptive attacks, expected accuracy, masking checks (snnadv.adaptive)
        "target_ckpt": None, "suite": "full", "eps": "8/255", "eot": 4, "eval_draws": 4, "paths": "all",
        "steps": 20, "restarts": 2, "alpha": None, "apgd_steps": 20, "square_queries": 1000,
        "sweep_eps": "0,2/255,4/255,8/255,16/255,32/255,64/255", "sweep_steps": 20, "slope": 5.0,
        "library": True, "flag_tol": None, "zero_tol": 5.0, "stat_images": 64, "timesteps": None,
        "input_bits": None, "proxy_ckpt": None, "blackbox_ckpt": None, "test_subset": 1000,
    },
    "bench": {  # snnadv.bench; batch size and T come from the preset unless given
        "preset": "auto", "arch": None, "timesteps": None, "only": None, "iters": None, "warmup": None,
        "peak_tflops": None, "peak_tbps": None, "precision": "fp32", "chunk_steps": None, "batch_size": None,
    },
}

#: the paper's ANN schedule per architecture: (epochs, lr, milestones)
ANN_SCHEDULE = {
    "vgg5": (200, 0.1, [100, 150]),
    "resnet20": (200, 0.05, [80, 120]),
    "vgg11": (250, 0.1, [125, 188]),  # "similar schedule": /10 at 1/2 and 3/4 of training
    "tiny": (30, 0.05, [20, 25]),
}

#: SNN-BP timesteps per architecture (paper: 100 for VGG5, 200 for ResNet20 and VGG11)
FINETUNE_STEPS = {"vgg5": 100, "resnet20": 200, "vgg11": 200, "tiny": 20}


#: settings added after runs were first keyed (reproduce stages, sweep settings): at
#: these values they are left out of the keys, so results computed before stay valid
LATE_DEFAULTS = {"precision": "fp32", "optimizer": "sgd", "nesterov": False, "schedule": "step", "warmup": 0.0,
                 "label_smoothing": 0.0, "init": "he", "channels_last": False}


def keyed(settings: dict) -> dict:
    """``settings`` without the :data:`LATE_DEFAULTS` that hold their default value."""
    return {k: v for k, v in settings.items() if not (k in LATE_DEFAULTS and v == LATE_DEFAULTS[k])}


def _all_keys() -> set:
    return set(COMMON).union(*(set(v) for v in STAGES.values()))


def read_config(path: str | Path | None) -> dict:
    """Parse a TOML config; a missing or malformed file is a one-line error."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise SnnadvError(f"config file '{path}' does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SnnadvError(f"config file '{path}' is not valid TOML ({e})") from None


def resolve(stage: str, config: str | Path | dict | None = None, flags: dict | None = None) -> dict:
    """The settings of ``stage``: defaults < config [common] < config [stage] < flags.

    ``flags`` holds command-line values; ``None`` means "not given".
    """
    data = config if isinstance(config, dict) else read_config(config)
    all_keys = _all_keys()
    defaults = {**COMMON, **STAGES.get(stage, {})}
    out = dict(defaults)
    for table in ("common", stage):
        section = data.get(table, {})
        if not isinstance(section, dict):
            raise SnnadvError(f"[{table}] in the config must be a table")
        for key, value in section.items():
            key = key.replace("-", "_")
            if key not in defaults:
                if table == "common" and key in all_keys:
                    continue  # [common] may hold settings of other stages
                raise SnnadvError(f"unknown setting '{key}' in [{table}] (known: {', '.join(sorted(defaults))})")
            out[key] = value
    for key, value in (flags or {}).items():
        if value is not None and key != "config":
            out[key] = value
    parse_precision(out.get("precision"), several=stage == "bench")
    out["stage"] = stage
    if isinstance(config, (str, Path)):
        out["config"] = str(config)
    return out


#: how synaptic layers run: fp32, or bf16 autocast (membranes stay fp32)
PRECISIONS = ("fp32", "bf16")


def parse_precision(value, several: bool = False) -> list[str]:
    """``fp32`` | ``bf16`` as a one-item list; with ``several`` (the bench: a row each) also
    ``"fp32,bf16"`` or a list.  Names in order, without repeats; anything else is a
    one-line error."""
    if several and isinstance(value, (list, tuple)):
        names = [str(v).strip() for v in value]
    elif several and isinstance(value, str):
        names = [v.strip() for v in value.split(",")]
    else:
        names = [value]
    for n in names:
        if n not in PRECISIONS:
            choices = "fp32, bf16 or fp32,bf16" if several else "fp32 or bf16"
            raise SnnadvError(f"unknown precision '{n}' (choose {choices})")
    return list(dict.fromkeys(names))


def check_positive(cfg: dict, *keys: str) -> None:
    for k in keys:
        v = cfg.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise SnnadvError(f"{k.replace('_', '-')} must be positive, got {v}")


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SnnadvError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise SnnadvError(f"unknown device '{name}' (choose auto, cpu or cuda)")
    return torch.device(name)
