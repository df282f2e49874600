"""Settings: the paper's defaults in one place, TOML configs, and flag overrides.

A config file (``configs/*.toml``, read with :mod:`tomllib`) has a ``[common]``
table, read by every stage, and one table per stage named like the subcommand
(``[train-ann]``, ``[convert]``, ``[finetune]``, ...).  A stage's settings are

    defaults (below)  <  [common]  <  [stage]  <  command-line flags

Relative paths in a config (``data_dir``, ``out``, checkpoints) are taken relative
to the current directory, as on the command line.  An unknown table or key is an
error (with a did-you-mean), so a typo never silently falls back to a default.

Every setting has a type and a domain in :data:`SCHEMA` (finite, sign, integer-ness,
bounds, choices); :func:`resolve` checks config values and flags where they come in,
so library code receives only values in their domains.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from .errors import SnnadvError
from .values import PRECISIONS, parse_list, parse_precision  # noqa: F401  (shared with the core)
from .registry import ARCHITECTURES, ATTACKS, GRADIENTS, NEURONS, SURROGATES
from .attacks.protocols import PROTOCOLS

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

#: settings taken from the command line (and library callers) only, never from a config
#: file: replacing an existing result has to be asked for each time (snnadv.outputs)
FLAG_ONLY = {"overwrite": False}

#: per-stage defaults: the paper's recipe (Sec. 3.2, reference-notes.md)
STAGES = {
    "train-ann": {
        "arch": "vgg5", "epochs": None, "lr": None, "milestones": None, "momentum": 0.9,
        "weight_decay": 1e-4, "input_bits": None, "input_range": "unit", "resume": False,
        # a faster recipe for a CPU (configs/vgg5_cifar10_cpu.toml); these defaults are the paper's
        "optimizer": "sgd", "nesterov": False, "schedule": "step", "warmup": 0.0, "label_smoothing": 0.0,
        "init": "he", "channels_last": False, "lr_restarts": [], "lr_restart_peak": 0.5, "save_every": 10.0,
    },
    "convert": {
        "checkpoint": None, "timesteps": 2500, "batches": 1, "percentile": 100.0, "scale": 0.7,
        "balance": "all", "curve": [100, 250, 500, 1000, 2500], "eval_batch_size": None,
        "neuron": "lif",  # the registered neuron of the SNN (lif at leak 1.0: an IF neuron)
    },
    "finetune": {
        "checkpoint": None, "leak": 0.99, "timesteps": None, "surrogate": "stdb", "alpha": 0.3,
        "beta": 0.01, "gamma": 0.3, "epochs": 15, "lr": 1e-4, "lr_step": 5, "lr_gamma": 0.5,
        "weight_decay": 5e-4, "scale": None, "resume": False, "save_every": 10.0,
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
        "input_bits": None, "test_subset": 1000, "tables": ["1", "2"], "chunk": None,
        "attacks": ("fgsm", "pgd"),  # the paper's (registered attacks: snnadv.registry.ATTACKS)
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
        "target_ckpt": None, "suite": "full", "protocol": None, "chunk": None, "cascade": True, "early_exit": None,
        "sharpness_images": None, "eps": "8/255", "eot": 4, "eval_draws": 4, "paths": "all",
        "steps": 20, "restarts": 2, "alpha": None, "apgd_steps": 20, "square_queries": 1000,
        "sweep_eps": "0,2/255,4/255,8/255,16/255,32/255,64/255", "sweep_steps": 20, "slope": 5.0,
        "library": True, "flag_tol": None, "zero_tol": 5.0, "stat_images": 64, "timesteps": None,
        "input_bits": None, "proxy_ckpt": None, "blackbox_ckpt": None, "test_subset": 1000, "protocol_attacks": None,
        "source_ckpt": None,  # a protocol crafted on this model, scored on the target (transfer)
        "source_timesteps": None,  # T of an SNN source (default: its checkpoint's)
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
                 "label_smoothing": 0.0, "init": "he", "channels_last": False, "lr_restarts": [], "lr_restart_peak": 0.5,
                 "neuron": "lif", "save_every": 10.0,
                 # the table's attacks: a tuple, so the analyses' "fgsm,pgd" string or list stays in their keys
                 "attacks": ("fgsm", "pgd"),
                 # evaluate's protocols (snnadv.attacks.protocols)
                 "protocol": None, "chunk": None, "cascade": True, "early_exit": None, "protocol_attacks": None,
                 "sharpness_images": None}

#: late defaults of one stage only (``settings["stage"]``): keys that other stages have
#: always had in their keys (``attack``'s and ``analyze``'s ``source_ckpt``)
LATE_STAGE_DEFAULTS = {"evaluate": {"source_ckpt": None, "source_timesteps": None}}


def keyed(settings: dict) -> dict:
    """``settings`` without the :data:`LATE_DEFAULTS` (and the stage's
    :data:`LATE_STAGE_DEFAULTS`) that hold their default value."""
    late = {**LATE_DEFAULTS, **LATE_STAGE_DEFAULTS.get(settings.get("stage"), {})}
    return {k: v for k, v in settings.items() if not (k in late and v == late[k])}


#: settings that never change a result (where it goes, how much is shown, whether an old
#: one is replaced, which device: the same run whether asked for as auto, cpu or cuda,
#: whether missing data may be fetched, whether a saved result is recomputed): left out
#: of every result's key (reproduce's stages, the sweeps' settings)
VOLATILE = frozenset({"quiet", "out", "config", "resume", "stage", "overwrite", "device", "download", "force",
                      "save_every"})


def result_settings(settings: dict, ignore=(), *, volatile=VOLATILE) -> dict:
    """The settings that define a result: ``settings`` without :data:`VOLATILE`, without
    ``ignore`` and without the :data:`LATE_DEFAULTS` at their default value."""
    return {k: v for k, v in keyed(settings).items() if k not in volatile and k not in ignore}


def settings_key(settings: dict, upstream=(), *, volatile=VOLATILE) -> str:
    """The key of a result: 16 hex digits of the sha256 of its :func:`result_settings` and of
    ``upstream`` (the keys of the results it was computed from, or the sha256 of its input
    files).  A saved result is re-used only under the same key.  ``volatile`` is for the
    keys of earlier versions only (snnadv.reproduce keeps those valid)."""
    blob = json.dumps(result_settings(settings, volatile=volatile), sort_keys=True, default=str)
    blob += "|" + "|".join(upstream)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _all_keys() -> set:
    return set(COMMON).union(*(set(v) for v in STAGES.values()))


def read_config(path: str | Path | None) -> dict:
    """Parse a TOML config and check its tables and keys against the schema; a missing,
    unreadable or malformed file, an unknown table or key is a one-line error."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise SnnadvError(f"config file '{path}' does not exist" if not path.exists()
                          else f"config file '{path}' is not a file")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SnnadvError(f"config file '{path}' is not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise SnnadvError(f"config file '{path}' is not valid TOML ({e})") from None
    except OSError as e:
        raise SnnadvError(f"cannot read config file '{path}': {e.strerror or e}") from None
    check_tables(data, f"'{path}'")
    return data


def check_tables(data: dict, source: str = "the config") -> None:
    """Every table of a config is known, and every key of it is a known setting of that table."""
    tables = {"common": set(COMMON) | _all_keys(), "reproduce": set(REPRODUCE),
              **{k: set(COMMON) | set(v) for k, v in STAGES.items()}}
    for table, section in data.items():
        if table not in tables:
            raise SnnadvError(f"unknown table [{table}] in {source}{_did_you_mean(table, tables)} "
                              f"(tables: {', '.join(tables)})")
        if not isinstance(section, dict):
            raise SnnadvError(f"[{table}] in {source} must be a table")
        for key in section:
            if key.replace("-", "_") not in tables[table]:
                known = sorted(tables[table] - (_all_keys() - set(COMMON) if table == "common" else set()))
                raise SnnadvError(f"unknown setting '{key}' in [{table}] of {source}"
                                  f"{_did_you_mean(key.replace('-', '_'), tables[table])} (known: {', '.join(known)})")
    for key, value in data.get("reproduce", {}).items():
        data["reproduce"][key] = check_setting("reproduce", key, value, f" ([reproduce] in {source})")


def resolve(stage: str, config: str | Path | dict | None = None, flags: dict | None = None) -> dict:
    """The settings of ``stage``: defaults < config [common] < config [stage] < flags.

    ``flags`` holds command-line values; ``None`` means "not given".  Every value is
    checked against :data:`SCHEMA` (type and domain) where it comes in, so a bad one
    is a one-line error naming the flag, or the table and file.
    """
    data = config if isinstance(config, dict) else read_config(config)
    source = f"'{config}'" if isinstance(config, (str, Path)) else "the config"
    if isinstance(config, dict):
        check_tables(data, source)
    defaults = {**COMMON, **STAGES.get(stage, {})}
    out, given = dict(defaults), set()
    for table in ("common", stage):
        for key, value in data.get(table, {}).items():
            key = key.replace("-", "_")
            if key in defaults:  # [common] may hold settings of other stages
                out[key] = check_setting(stage, key, value, f" ([{table}] in {source})")
                given.add(key)
    for key, value in (flags or {}).items():
        if value is not None and key != "config":
            if key not in defaults and key not in FLAG_ONLY:
                raise SnnadvError(f"unknown setting '{key}' for {stage}{_did_you_mean(key, defaults)}")
            out[key] = check_setting(stage, key, value)
            given.add(key)
    parse_precision(out.get("precision"), several=stage == "bench")
    out["stage"] = stage
    if stage == "evaluate" and out.get("protocol"):  # a protocol's presets yield only to what was given
        out["given"] = sorted(given)
    check_cross(out, given)
    if isinstance(config, (str, Path)):
        out["config"] = str(config)
    return out


# --------------------------------------------------------------------------- the typed schema
#: sane upper bounds (a value beyond them is a typo or would not fit in memory or time)
MAX_EPOCHS, MAX_TIMESTEPS, MAX_BATCH, MAX_IMAGES, MAX_DRAWS = 100_000, 100_000, 65_536, 100_000_000, 10_000
MAX_STEPS = 1_000_000  # attack iterations, queries, simulated steps, points
MAX_SEED = 2 ** 63 - 1
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def _kind(value) -> str:
    """'a float', 'a string', ... for messages."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
             tuple: "a list", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _num(x) -> str:
    """A number for messages: integers in full, other numbers short."""
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() and abs(x) < 1e16 else f"{x:.6g}"


@dataclass(frozen=True)
class Setting:
    """One setting's type and domain.

    ``kind``: int | float | bool | str | choice | path | device | ints | floats | fraction |
    fractions | names | text (a free string or list, parsed by the stage itself).
    ``lo``/``hi`` bound numbers (and every item of a list); ``open_lo`` excludes ``lo``.
    ``optional``: None is allowed (means "the stage's own default").
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    choices: tuple = field(default=(), hash=False)  # a tuple, or a registry (snnadv.registry)
    optional: bool = False
    as_list: bool = True  # ints/floats: hand a "a,b" string on as a list (False: as given)

    def check(self, name: str, value):
        """``value`` if it is valid (lists given as "a,b" strings become lists for ints/floats);
        else a one-line :class:`SnnadvError` naming ``name``."""
        if value is None:
            if self.optional:
                return None
            raise SnnadvError(f"{name} needs a value")
        kind = self.kind
        if kind in ("int", "float"):
            return self._number(name, value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise SnnadvError(f"{name} must be true or false, got {_shown(value)} ({_kind(value)})")
            return value
        if kind in ("str", "path", "device", "choice"):
            if not isinstance(value, (str, PurePath)) or (kind != "path" and not isinstance(value, str)):
                what = "a path" if kind == "path" else "a string"
                if kind == "choice":
                    what = f"one of {', '.join(self.choices)}"
                raise SnnadvError(f"{name} must be {what}, got {_shown(value)} ({_kind(value)})")
            if kind == "choice" and value not in self.choices:
                raise SnnadvError(f"{name} must be one of {', '.join(self.choices)}, got {_shown(value)}"
                                  + _did_you_mean(str(value), self.choices))
            if kind == "device" and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
                raise SnnadvError(f"unknown device {_shown(value)} for {name} (choose {DEVICE_FORMS})")
            if kind == "path" and not str(value).strip():
                raise SnnadvError(f"{name} must be a path, got an empty string")
            return value
        if kind in ("ints", "floats", "fractions"):
            return self._list(name, value)
        if kind == "fraction":
            return self._fraction(name, value)
        if kind in ("names", "text"):  # a comma-separated string or a list of strings (or numbers)
            items = value if isinstance(value, (list, tuple)) else list(value.values()) \
                if kind == "text" and isinstance(value, dict) else [value]
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items) or (
                    kind == "names" and not isinstance(value, (str, list, tuple))):
                raise SnnadvError(f"{name} must be a comma-separated string or a list, got {_shown(value)} "
                                  f"({_kind(value)})")
            return value
        raise AssertionError(kind)

    def _number(self, name: str, value):
        integer = self.kind == "int"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            what = "an integer" if integer else "a number"
            raise SnnadvError(f"{name} must be {what}, got {_shown(value)} ({_kind(value)})")
        if not math.isfinite(value):
            raise SnnadvError(f"{name} must be a finite number, got {value}")
        lo, hi = self.lo, self.hi
        if lo is not None and (value < lo or (self.open_lo and value == lo)):
            rng = f"> {_num(lo)}" if self.open_lo else f">= {_num(lo)}"
            if hi is not None:
                rng = f"in {'(' if self.open_lo else '['}{_num(lo)}, {_num(hi)}]"
            raise SnnadvError(f"{name} must be {rng}, got {_num(value)}")
        if hi is not None and value > hi:
            raise SnnadvError(f"{name} must be at most {_num(hi)}, got {_num(value)}")
        return value

    def _fraction(self, name: str, value) -> object:
        """A number or "a/b" (e.g. 8/255), checked against the bounds; returned as given."""
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SnnadvError(f"{name} must be a number or a fraction like 8/255, got {_shown(value)} "
                              f"({_kind(value)})")
        try:
            num, _, den = str(value).partition("/")
            x = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise SnnadvError(f"{name} must be a number or a fraction like 8/255, got {_shown(value)}") from None
        Setting("float", self.lo, self.hi, self.open_lo)._number(name, x)
        return value

    def _list(self, name: str, value):
        item = {"ints": "int", "floats": "float", "fractions": "fraction"}[self.kind]
        parsed = value
        if isinstance(value, str):
            parts = parse_list(value)
            try:
                parsed = [int(v) if item == "int" else float(v) if item == "float" else v for v in parts]
            except ValueError:
                what = "integers" if item == "int" else "numbers"
                raise SnnadvError(f"{name} takes comma-separated {what}, got {_shown(value)}") from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parsed = [value]
        elif not isinstance(value, (list, tuple)):
            raise SnnadvError(f"{name} must be a list (or a comma-separated string), got {_shown(value)} "
                              f"({_kind(value)})")
        one = Setting(item, self.lo, self.hi, self.open_lo)
        for v in parsed:
            one._fraction(name, v) if item == "fraction" else one._number(name, v)
        return list(parsed) if self.as_list and not isinstance(value, (list, tuple)) else value


def _did_you_mean(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_I = lambda lo, hi, **kw: Setting("int", lo, hi, **kw)  # noqa: E731
_F = lambda lo, hi, **kw: Setting("float", lo, hi, **kw)  # noqa: E731
_PATH = Setting("path", optional=True)
_BOOL = Setting("bool")
_POS = lambda hi: Setting("float", 0, hi, open_lo=True)  # noqa: E731  (finite, > 0)
_LEAK = Setting("float", 0, 1, open_lo=True)
_SUBSET = Setting("int", 1, MAX_IMAGES, optional=True)
_T = Setting("int", 1, MAX_TIMESTEPS, optional=True)
_BITS = Setting("int", 1, 8, optional=True)
_EPS = Setting("fraction", 0, 1)
_ALPHA = Setting("fraction", 0, 1, open_lo=True)
_STEPS = Setting("int", 1, MAX_STEPS)
_DRAWS = Setting("int", 1, MAX_DRAWS)
_SURROGATES = SURROGATES  # the registries: read when a value is checked (plugins included)
_ARCHS = ARCHITECTURES
_KINDS = ("ann", "snn-conv", "snn-bp")

#: every setting's type and domain; ``(stage, key)`` entries override ``key`` for that stage
SCHEMA: dict = {
    "dataset": Setting("choice", choices=("cifar10", "cifar100")), "data_dir": Setting("path"),
    "download": _BOOL, "device": Setting("device"), "seed": _I(0, MAX_SEED),
    "batch_size": _I(1, MAX_BATCH), "train_subset": _SUBSET, "test_subset": _SUBSET, "out": _PATH,
    "quiet": _BOOL, "precision": Setting("choice", choices=("fp32", "bf16")),
    "checkpoint": _PATH, "source_ckpt": _PATH, "target_ckpt": _PATH, "ann_ckpt": _PATH, "proxy_ckpt": _PATH,
    "blackbox_ckpt": _PATH, "ann": _PATH, "snn_conv": _PATH, "snn_bp": _PATH, "ann_ii": _PATH,
    "snn_conv_ii": _PATH, "snn_bp_ii": _PATH,
    # train-ann
    "arch": Setting("choice", choices=_ARCHS), "epochs": _I(1, MAX_EPOCHS),
    "lr": Setting("float", 0, 1e6, open_lo=True, optional=True),
    "milestones": Setting("ints", 1, MAX_EPOCHS, optional=True), "momentum": _F(0, 1),
    "weight_decay": _F(0, 1), "input_bits": _BITS, "input_range": Setting("choice", choices=("unit", "signed")),
    "resume": _BOOL, "overwrite": _BOOL,
    "optimizer": Setting("choice", choices=("sgd", "adamw")), "nesterov": _BOOL,
    "schedule": Setting("choice", choices=("step", "linear", "cosine")), "warmup": _F(0, MAX_EPOCHS),
    "label_smoothing": _F(0, 0.999), "init": Setting("choice", choices=("he", "lsuv")), "channels_last": _BOOL,
    "lr_restarts": Setting("ints", 1, MAX_EPOCHS), "lr_restart_peak": Setting("float", 0, 1, open_lo=True),
    "save_every": _F(0, 10_000),
    # convert
    "timesteps": _T, "batches": _I(1, MAX_STEPS), "percentile": Setting("float", 0, 100, open_lo=True),
    "scale": Setting("float", 0, 1e6, open_lo=True, optional=True),
    "balance": Setting("choice", choices=("all", "stem")), "curve": Setting("ints", 1, MAX_TIMESTEPS),
    "neuron": Setting("choice", choices=NEURONS),
    "eval_batch_size": Setting("int", 1, MAX_BATCH, optional=True),
    # finetune
    "leak": _LEAK, "surrogate": Setting("choice", choices=_SURROGATES), "alpha": _POS(1e6),
    "beta": _F(0, 1e6), "gamma": _POS(1e6), "lr_step": _I(1, MAX_EPOCHS),
    "lr_gamma": Setting("float", 0, 1, open_lo=True),
    # attack / table / analyze / evaluate
    "source": Setting("choice", choices=_KINDS), "target": Setting("choice", choices=_KINDS, optional=True),
    "attack": Setting("choice", choices=ATTACKS), "eps": _EPS, "steps": _STEPS,
    "random_start": _BOOL, "gradient": Setting("choice", choices=GRADIENTS, optional=True),
    "eot": _DRAWS, "eval_draws": _DRAWS, "targeted": _BOOL, "conv_timesteps": _T, "bp_timesteps": _T,
    "tables": Setting("names"), "model": Setting("choice", choices=("snn-bp", "snn-conv")),
    "bits": Setting("text", optional=True),
    "leaks": Setting("floats", 0, 1, open_lo=True, optional=True, as_list=False), "attacks": Setting("names"),
    "force": _BOOL, "ratios": Setting("floats", 0, 1e6, open_lo=True, optional=True, as_list=False),
    "lam_min": Setting("float", 0, 1, open_lo=True), "lam_max": Setting("float", 0, 1, open_lo=True),
    "points": Setting("int", 1, MAX_STEPS, optional=True), "sim_steps": _STEPS, "threshold": _POS(1e6),
    "reset": Setting("choice", choices=("zero", "subtract")), "image": _I(0, MAX_IMAGES),
    "suite": Setting("choice", choices=("paper", "adaptive", "full")), "paths": Setting("names"),
    "protocol": Setting("choice", choices=tuple(PROTOCOLS), optional=True),
    "protocol_attacks": Setting("names", optional=True), "source_timesteps": _T,
    "chunk": Setting("int", 1, MAX_IMAGES, optional=True), "cascade": _BOOL,
    "early_exit": Setting("bool", optional=True), "sharpness_images": Setting("int", 1, MAX_IMAGES, optional=True),
    "restarts": _STEPS, "apgd_steps": _STEPS, "square_queries": _STEPS,
    "sweep_eps": Setting("fractions", 0, 1, as_list=False),
    "sweep_steps": _STEPS, "slope": _POS(1e6), "library": _BOOL,
    "flag_tol": Setting("float", 0, 100, optional=True), "zero_tol": _F(0, 100), "stat_images": _I(1, MAX_IMAGES),
    # bench (workload=T pairs and lists are parsed by snnadv.bench)
    "preset": Setting("choice", choices=("auto", "cpu", "paper", "tiny")), "only": Setting("names", optional=True),
    "iters": Setting("text", optional=True), ("bench", "warmup"): Setting("text", optional=True),
    "peak_tflops": Setting("float", 0, 1e6, open_lo=True, optional=True),
    "peak_tbps": Setting("float", 0, 1e6, open_lo=True, optional=True),
    "chunk_steps": Setting("int", 1, MAX_TIMESTEPS, optional=True),
    # per-stage meanings of shared names
    ("train-ann", "lr"): Setting("float", 0, 1e6, open_lo=True, optional=True),
    ("train-ann", "epochs"): Setting("int", 1, MAX_EPOCHS, optional=True),
    ("convert", "timesteps"): _I(1, MAX_TIMESTEPS),
    ("finetune", "lr"): Setting("float", 0, 1e6, open_lo=True),
    ("attack", "alpha"): _ALPHA, ("table", "alpha"): _ALPHA, ("analyze", "alpha"): _ALPHA,
    ("evaluate", "alpha"): Setting("fraction", 0, 1, open_lo=True, optional=True),
    ("evaluate", "eps"): Setting("fractions", 0, 1, as_list=False),
    ("analyze", "timesteps"): Setting("ints", 1, MAX_TIMESTEPS, optional=True, as_list=False),
    ("analyze", "epochs"): Setting("int", 1, MAX_EPOCHS, optional=True),
    ("analyze", "lr"): Setting("float", 0, 1e6, open_lo=True, optional=True),
    ("analyze", "surrogate"): Setting("choice", choices=_SURROGATES, optional=True),
    ("analyze", "attack"): Setting("choice", choices=ATTACKS),
    ("bench", "arch"): Setting("choice", choices=_ARCHS, optional=True),
    ("bench", "timesteps"): Setting("text", optional=True),
    ("bench", "precision"): Setting("text"),
    ("bench", "batch_size"): Setting("int", 1, MAX_BATCH, optional=True),
    ("bench", "preset"): Setting("choice", choices=("auto", "cpu", "paper", "tiny")),
}

#: the [reproduce] table (read by snnadv.reproduce, not a stage)
REPRODUCE = {"run_dir": Setting("path"), "seeds": Setting("ints", 0, MAX_SEED),
             "analyses": Setting("names"), "evaluate": _BOOL,
             # the seed-II models Table 1's blackbox rows are crafted on under [evaluate] protocol
             # (snnadv.reproduce.protocol_stages; default all three, [] = whitebox only)
             "evaluate_sources": Setting("names")}


def setting(stage: str, key: str) -> Setting | None:
    if stage == "reproduce":
        return REPRODUCE.get(key)
    return SCHEMA.get((stage, key)) or SCHEMA.get(key)


def check_setting(stage: str, key: str, value, where: str = ""):
    """``value`` checked against ``key``'s type and domain for ``stage`` (a list given as
    "a,b" becomes a list); ``where`` says where it came from, for the message."""
    spec = setting(stage, key)
    name = f"--{key.replace('_', '-')}" if not where else key
    try:
        return value if spec is None else spec.check(name, value)
    except SnnadvError as e:
        raise SnnadvError(f"{e}{where}") from None


def check_cross(cfg: dict, given=None) -> None:
    """Rules between settings of one stage (each setting is already in its own domain).
    ``given``: the keys set by a config or a flag (default: all)."""
    given = cfg if given is None else given
    if cfg.get("milestones") and cfg.get("epochs"):
        # (a milestone at the last epoch takes effect when the run is extended with --resume)
        bad = [m for m in cfg["milestones"] if not 1 <= m <= cfg["epochs"]]
        if bad:
            raise SnnadvError(f"milestones must be epochs in [1, {cfg['epochs']}] (epochs {cfg['epochs']}), "
                              f"got {bad[0]}")
    if cfg.get("stage") == "train-ann":
        if cfg.get("warmup") and cfg.get("schedule") == "step":
            raise SnnadvError("warmup needs schedule = 'linear' or 'cosine' (the step schedule has none)")
        if cfg.get("epochs") and cfg.get("warmup", 0) >= cfg["epochs"]:
            raise SnnadvError(f"warmup must be below the {cfg['epochs']} epochs, got {cfg['warmup']}")
        restarts = cfg.get("lr_restarts") or []
        if restarts and cfg.get("schedule") == "step":
            raise SnnadvError("lr_restarts need schedule = 'linear' or 'cosine' (the step schedule has none)")
        if restarts and (sorted(set(restarts)) != list(restarts) or restarts[0] <= cfg.get("warmup", 0)
                         or (cfg.get("epochs") and restarts[-1] >= cfg["epochs"])):
            raise SnnadvError(f"lr_restarts must be increasing epochs after the warm-up and below the "
                              f"{cfg.get('epochs')} epochs, got {list(restarts)}")
        if cfg.get("nesterov") and (cfg.get("optimizer") != "sgd" or not cfg.get("momentum")):
            raise SnnadvError("nesterov needs optimizer = 'sgd' with a momentum above 0")
    if cfg.get("stage") == "convert" and "curve" in given:
        above = [t for t in cfg["curve"] if t > cfg["timesteps"]]
        if above:
            raise SnnadvError(f"curve point {above[0]} is above timesteps {cfg['timesteps']} (the curve is read "
                              f"from one run of T steps: raise --timesteps or drop the point)")


def check_positive(cfg: dict, *keys: str) -> None:
    for k in keys:
        v = cfg.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise SnnadvError(f"{k.replace('_', '-')} must be positive, got {v}")


def resolve_device(name: str):
    """The device named by ``--device``; under torchrun a bare ``cuda`` (or ``auto`` on a GPU
    machine) is this rank's GPU, ``cuda:LOCAL_RANK`` (:func:`snnadv.parallel.rank_device`)."""
    import torch

    from .parallel import rank_device

    if name == "auto":
        return rank_device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise SnnadvError(f"unknown device '{name}' (choose {DEVICE_FORMS})")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SnnadvError(f"--device {name} was asked for but no CUDA device is available")
        if ":" in name and int(name.split(":")[1]) >= count:
            raise SnnadvError(f"--device {name} was asked for but there {'is' if count == 1 else 'are'} "
                              f"only {count} CUDA device{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})")
    return rank_device(name)
