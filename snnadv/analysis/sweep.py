"""Sweeps from one converted network: timesteps x input bits (Fig. 2) and leak (Fig. 6b).

Both sweeps run the same grid machinery over (input bits b) x (leak lambda) x
(timesteps T).  For every grid point ("setting") the target is

* ``--model snn-bp`` (default): the converted network (``--checkpoint``) fine-tuned
  with :func:`snnadv.train.finetune` at that T and lambda, with b-bit input
  quantisation.  ``finetune`` builds its model from its parent checkpoint, so the
  quantisation is passed through the parent: for each b a copy of the converted
  checkpoint whose stored input bits are b is written once to
  ``<out>/parents/`` (weights and thresholds unchanged; it records the source
  checkpoint's hash).  Every setting starts from the same converted weights;
* ``--model snn-conv``: the converted network itself, evaluated at that T, lambda
  and b (no training).

and it is evaluated on clean test images and on **blackbox** FGSM and PGD images
crafted on a separately trained ANN (``--source-ckpt``) with the same b-bit input
quantisation (straight-through gradient through the quantiser).  The adversarial
set of a bit-width is crafted once and re-used for every T and lambda.  The ANN the
SNN was converted from (``--ann-ckpt``, default: the converted checkpoint's recorded
parent when it is present with the recorded hash) is evaluated alongside with the
same b (it is not retrained for b).

Resuming.  Each setting's result is written as soon as it is complete, to
``<out>/settings/<key>.json`` (with the fine-tuned ``<key>.pt`` beside it).  A
result records the settings that define it and the sha256 of every input
checkpoint, hashed together into a ``signature`` (:func:`snnadv.config.settings_key`);
a re-run skips every setting whose result exists with the same signature (or the one
earlier versions gave it) and computes the others, so Ctrl-C
loses at most the setting in progress (and fine-tuning itself resumes from its
last completed epoch: a ``<key>.pt`` of the same fine-tuning settings and parent is
continued with ``finetune --resume``, or re-used without training when finished).
``--force`` recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import parallel
from .. import robustness as rob
from .. import train as train_mod
from ..attacks import check_eps, craft, make_attack, parse_eps, takes
from ..checkpoint import build_model, file_hash, load_checkpoint, save_checkpoint
from ..config import FINETUNE_STEPS, STAGES, keyed, resolve, resolve_device, result_settings, settings_key
from ..data import load_split, to_float
from ..errors import CheckpointError, SnnadvError
from ..evaluation import accuracy_on
from ..gradients import make_gradient
from ..outputs import write_json
from ..registry import ATTACKS
from ..report import Reporter
from .common import (abs_path, bits_label, bits_list, choice_list, int_list, leak_list, recorded_settings, run_dir,
                     table, versions, write_outputs)

MODELS = ("snn-bp", "snn-conv")
#: the settings recorded in the result
KEYS = ("checkpoint", "source_ckpt", "ann_ckpt", "model", "timesteps", "bits", "leaks", "attacks", "eps",
        "alpha", "steps", "random_start", "eval_draws", "epochs", "lr", "surrogate", "scale", "data_dir",
        "dataset", "seed", "batch_size", "train_subset", "test_subset")
LABEL = {"snn-bp": "SNN-BP", "snn-conv": "SNN-conv", "ann": "ANN"}
#: fine-tuning settings that do not change the fine-tuned weights (left out of the match,
#: besides the volatile ones of snnadv.config)
FT_IGNORED = ("checkpoint", "test_subset")


@dataclass(frozen=True)
class Setting:
    model: str
    bits: int | None
    timesteps: int
    leak: float

    @property
    def key(self) -> str:
        return f"{self.model}_b{bits_label(self.bits)}_T{self.timesteps}_l{self.leak:g}"


def timesteps_sweep(cfg: dict, reporter: Reporter | None = None) -> dict:
    """``snnadv analyze timesteps`` (Fig. 2): accuracy vs T, one line per input bit-width."""
    return run_sweep(cfg, "timesteps", reporter)


def leak_sweep(cfg: dict, reporter: Reporter | None = None) -> dict:
    """``snnadv analyze leak`` (Fig. 6b): clean / FGSM / PGD accuracy per leak."""
    return run_sweep(cfg, "leak", reporter)


def _parse(cfg: dict, name: str) -> dict:
    """Validate everything that can be checked before any file is read."""
    model = str(cfg.get("model") or "snn-bp").lower()
    if model not in MODELS:
        raise SnnadvError(f"unknown model '{model}' (choose {', '.join(MODELS)})")
    p = {"model": model, "attacks": choice_list(cfg.get("attacks") or STAGES["analyze"]["attacks"], "attacks", ATTACKS)}
    p["timesteps"] = int_list(cfg["timesteps"], "timesteps") if cfg.get("timesteps") is not None else None
    if name == "timesteps":
        p["bits"] = bits_list(cfg.get("bits"), "bits", [2, 4])
        p["leaks"] = leak_list(cfg.get("leaks"), "leaks", [1.0] if model == "snn-conv" else [0.99])
    else:
        p["bits"] = bits_list(cfg.get("bits"), "bits", ["none"])
        p["leaks"] = leak_list(cfg.get("leaks"), "leaks", [1.0, 0.99, 0.98, 0.95])
    eps, alpha, steps = parse_eps(cfg["eps"]), parse_eps(cfg["alpha"]), int(cfg["steps"])
    p["warnings"] = check_eps(eps, alpha if any(takes(a, "alpha") for a in p["attacks"]) else None, steps)
    p.update(eps=eps, alpha=alpha, steps=steps, random_start=bool(cfg.get("random_start")))
    p["eval_draws"] = int_list(cfg.get("eval_draws"), "eval-draws", [1])[0]
    for key in ("epochs", "lr", "scale"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise SnnadvError(f"--{key} must be positive, got {v}")
    if cfg.get("checkpoint") is None:
        raise SnnadvError(f"analyze {name} needs --checkpoint: the snn-conv checkpoint to "
                          + ("fine-tune from" if model == "snn-bp" else "evaluate"))
    if cfg.get("source_ckpt") is None:
        raise SnnadvError(f"analyze {name} needs --source-ckpt: the separately trained ANN that crafts "
                          "the blackbox attacks")
    return p


def run_sweep(cfg: dict, name: str, reporter: Reporter | None = None) -> dict:
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    p = _parse(cfg, name)
    for w in p["warnings"]:
        reporter.print(f"[yellow]warning:[/] {w}")
    device = resolve_device(cfg["device"])
    stages = ("snn-conv", "snn-bp") if p["model"] == "snn-bp" else ("snn-conv",)
    conv_path = Path(cfg["checkpoint"])
    conv = load_checkpoint(conv_path, stages)
    conv_sha = file_hash(conv_path)
    src_path = Path(cfg["source_ckpt"])
    src_ckpt = load_checkpoint(src_path, "ann")
    src_sha = file_hash(src_path)
    conv_info = {"path": str(conv_path), "sha256": conv_sha, "stage": conv["stage"], "arch": conv["spec"]["arch"],
                 "dataset": conv["dataset"]}
    src_info = {"path": str(src_path), "sha256": src_sha, "stage": "ann", "arch": src_ckpt["spec"]["arch"],
                "dataset": src_ckpt["dataset"]}
    rob.check_compatible(src_info, conv_info, src_ckpt, conv)
    ann_path, ann_note = _ann_reference(cfg, conv)
    ann_ckpt = load_checkpoint(ann_path, "ann") if ann_path else None
    ann_info = ({"path": str(ann_path), "sha256": file_hash(ann_path), "stage": "ann"} if ann_path else None)
    if ann_note:
        reporter.print(f"[yellow]note:[/] {ann_note}")
    if ann_info and ann_info["sha256"] == src_sha:
        reporter.print("[yellow]warning:[/] the ANN reference is the attack source itself: its row is whitebox")

    arch = conv["spec"]["arch"]
    if p["timesteps"] is None:
        p["timesteps"] = default_timesteps(name, p["model"], conv, cfg.get("config"))
    grid = [Setting(p["model"], b, T, lam) for b in p["bits"] for lam in p["leaks"] for T in p["timesteps"]]
    out = run_dir(cfg, name)
    sdir = out / "settings"
    sdir.mkdir(exist_ok=True)
    data_dir = abs_path(cfg["data_dir"])
    eval_id = {"attacks": p["attacks"], "eps": p["eps"], "alpha": p["alpha"], "steps": p["steps"],
               "random_start": p["random_start"], "eval_draws": p["eval_draws"], "test_subset": cfg["test_subset"],
               "seed": cfg["seed"], "data_dir": data_dir, "dataset": conv["dataset"]}
    eval_id = keyed({**eval_id, "precision": cfg.get("precision", "fp32")})

    # -- lazily loaded: the test split, the adversarial sets per bit-width ----------------
    cache: dict = {}

    def test_data():
        if "test" not in cache:
            split = load_split(conv["dataset"], data_dir, train=False, device=device, subset=cfg["test_subset"],
                               download=bool(cfg.get("download")))
            cache["test"] = (to_float(split.images), split.labels)
        return cache["test"]

    def adversarial(bits) -> dict:
        if ("adv", bits) not in cache:
            images, labels = test_data()
            source = build_model(src_ckpt, device, precision=cfg.get("precision"))
            source.input_bits = bits
            sets = {}
            for a in p["attacks"]:
                gen = torch.Generator(device=device).manual_seed(cfg["seed"])
                atk = make_attack(a, source, p["eps"], p["alpha"], p["steps"], p["random_start"],
                                  make_gradient(source), False, gen)
                with reporter.progress(f"crafting {a} on the source ANN ({bits_label(bits)}-bit input)",
                                       len(images)) as adv:
                    sets[a] = craft(atk, images, labels, cfg["batch_size"], adv, seed=cfg["seed"])
            cache[("adv", bits)] = sets
        return cache[("adv", bits)]

    def evaluate(model, bits, what: str) -> dict:
        images, labels = test_data()
        sets = {"clean": images, **adversarial(bits)}  # crafted first: progress bars do not nest
        draws = p["eval_draws"] if getattr(model, "kind", "ann") != "ann" else 1
        with reporter.progress(f"evaluating {what}", len(images) * len(sets) * draws) as advance:
            return {k: accuracy_on(model, x, labels, cfg["batch_size"], p["eval_draws"], cfg["seed"],
                                   advance=advance) for k, x in sets.items()}

    force = bool(cfg.get("force"))
    n_done = 0

    reporter.print(f"{name} sweep: {len(grid)} setting(s) of {LABEL[p['model']]} {arch} "
                   f"(bits {', '.join(bits_label(b) for b in p['bits'])}; "
                   f"leak {', '.join(f'{x:g}' for x in p['leaks'])}; "
                   f"T {', '.join(map(str, p['timesteps']))}) -> {out}")

    # -- the ANN reference, one row per bit-width ------------------------------------------
    ann_rows = []
    if ann_ckpt is not None:
        for b in p["bits"]:
            key = f"ann_b{bits_label(b)}"
            settings = {"model": "ann", "bits": b, "eval": eval_id}
            inputs = {"ann": ann_info["sha256"], "source": src_sha}
            sig = _signature(settings, inputs)
            rec = None if force else _saved(sdir / f"{key}.json", settings, inputs)
            if rec is None:
                t0 = time.perf_counter()
                ann = build_model(ann_ckpt, device)
                ann.input_bits = b
                accs = evaluate(ann, b, key)
                rec = {"key": key, "signature": sig, "complete": True, "settings": settings, "inputs": inputs,
                       "models": {"ann": ann_info, "source": src_info}, "accuracy": accs,
                       "seconds": time.perf_counter() - t0, "versions": versions()}
                if parallel.world().main:
                    write_json(sdir / f"{key}.json", rec)
                status = "computed"
            else:
                status = "reused"
            ann_rows.append(_row(rec, "ann", b, None, None, status))

    # -- the grid ----------------------------------------------------------------------------
    parents: dict = {}
    rows = []
    first_ft = None  # the effective fine-tuning settings (all but T and leak are shared), for the record
    for i, s in enumerate(grid, 1):
        ft_cfg, parent = None, None
        if s.model == "snn-bp":
            parent = parents.get(s.bits)
            if parent is None:
                parent = parents[s.bits] = _parent_for_bits(conv_path, conv, conv_sha, s.bits, out)
            ft_cfg = _finetune_cfg(cfg, conv, parent, s, sdir / f"{s.key}.pt", data_dir)
            if first_ft is None:
                first_ft = {k: v for k, v in _ft_identity(ft_cfg).items() if k not in ("timesteps", "leak")}
        settings = {"model": s.model, "bits": s.bits, "timesteps": s.timesteps, "leak": s.leak, "eval": eval_id,
                    "finetune": _ft_identity(ft_cfg) if ft_cfg else None}
        inputs = {"checkpoint": conv_sha, "source": src_sha}
        sig = _signature(settings, inputs)
        rec = None if force else _saved(sdir / f"{s.key}.json", settings, inputs)
        if rec is not None:
            reporter.print(f"[{i}/{len(grid)}] {s.key}: done before (reused)")
            rows.append(_row(rec, s.model, s.bits, s.timesteps, s.leak, "reused"))
            continue
        t0 = time.perf_counter()
        state = None
        if s.model == "snn-bp":
            pt = sdir / f"{s.key}.pt"
            parent_sha = file_hash(parent["path"])
            state = _finetune_state(pt, ft_cfg, parent_sha)
        reporter.print(f"[{i}/{len(grid)}] {s.key}: " + {
            None: "evaluating", "fresh": "fine-tuning and evaluating",
            "resumable": "continuing the interrupted fine-tuning, then evaluating",
            "complete": "evaluating (the fine-tuned checkpoint is re-used)"}[state])
        models = {"checkpoint": conv_info, "source": src_info}
        finetune_metrics = None
        if s.model == "snn-bp":
            if state != "complete":
                train_mod.finetune({**ft_cfg, "resume": state == "resumable", "overwrite": state == "fresh"},
                                   reporter)
            model, info, ck = rob.load_attack_model(pt, "snn-bp", device, precision=cfg.get("precision"))
            finetune_metrics = {k: v for k, v in ck.get("metrics", {}).items()}
            models["finetuned"] = info
            models["parent"] = {"path": str(parent["path"]), "sha256": parent_sha, "input_bits": s.bits}
        else:
            model = build_model(conv, device, num_steps=s.timesteps, precision=cfg.get("precision"))
            model.set_leak(s.leak)
            model.encoder.bits = s.bits
        accs = evaluate(model, s.bits, s.key)
        rec = {"key": s.key, "signature": sig, "complete": True, "settings": settings, "inputs": inputs,
               "models": models, "accuracy": accs, "finetune": finetune_metrics,
               "seconds": time.perf_counter() - t0, "versions": versions()}
        if parallel.world().main:
            write_json(sdir / f"{s.key}.json", rec)
        n_done += 1
        reporter.print(f"    clean {accs['clean']['mean']:.2f}%  "
                       + "  ".join(f"{a} {accs[a]['mean']:.2f}%" for a in p["attacks"])
                       + f"  ({rec['seconds']:.1f} s)")
        rows.append(_row(rec, s.model, s.bits, s.timesteps, s.leak, "computed"))

    reused = sum(r["status"] == "reused" for r in rows)
    reporter.print(f"{n_done} setting(s) computed, {reused} re-used")
    result = {
        "analysis": name,
        "title": ("Accuracy vs timesteps and input quantisation (paper Fig. 2)" if name == "timesteps"
                  else "Accuracy vs leak factor (paper Fig. 6b)"),
        "settings": {**recorded_settings(cfg, KEYS), "data_dir": data_dir, "dataset": conv["dataset"],
                     "finetune": first_ft, "model": p["model"], "attacks": p["attacks"],
                     "timesteps": p["timesteps"], "bits": [bits_label(b) for b in p["bits"]], "leaks": p["leaks"],
                     "eps": p["eps"], "alpha": p["alpha"], "steps": p["steps"], "eval_draws": p["eval_draws"]},
        "inputs": {"checkpoint": conv_info, "source": src_info, "ann": ann_info},
        "versions": versions(),
        "notes": [f"Blackbox: {'/'.join(a.upper() for a in p['attacks'])} crafted on the source ANN {src_path.name} "
                  f"with the same input quantisation, eps={p['eps']:.4f}"
                  + (f", PGD alpha={p['alpha']:.4f}, {p['steps']} steps" if "pgd" in p["attacks"] else "") + ".",
                  ("SNN-BP: fine-tuned from the same converted network at every setting."
                   if p["model"] == "snn-bp" else "SNN-conv: the converted network evaluated at every setting."),
                  *([ann_note] if ann_note else [])],
        "computed": n_done, "reused": reused,
        "rows": rows, "ann": ann_rows,
        "tables": _tables(name, rows, ann_rows, p),
    }
    for t in result["tables"]:
        reporter.table(t["title"], t["columns"], t["rows"])
    columns = ["key", "model", "bits", "timesteps", "leak", "clean", "clean_std"]
    for a in p["attacks"]:
        columns += [a, f"{a}_std"]
    columns += ["finetune_test_acc", "checkpoint_sha256", "status", "seconds"]
    draw = (lambda figure: _draw_timesteps(figure, rows, ann_rows, p)) if name == "timesteps" else \
        (lambda figure: _draw_leak(figure, rows, ann_rows, p))
    return write_outputs(out, name, result, columns, ann_rows + rows, draw, reporter)


# --------------------------------------------------------------------------- helpers
def _ann_reference(cfg: dict, conv: dict) -> tuple[Path | None, str | None]:
    """The ANN shown beside the SNNs: --ann-ckpt, else the converted checkpoint's parent."""
    if cfg.get("ann_ckpt"):
        return Path(cfg["ann_ckpt"]), None
    parent = conv.get("parent") or {}
    path = parent.get("path")
    if conv["stage"] != "snn-conv" or not path:
        return None, "no ANN reference (pass --ann-ckpt to show the ANN's accuracy)"
    if not Path(path).is_file():
        return None, f"the converted network's ANN '{path}' was not found: no ANN reference (pass --ann-ckpt)"
    if file_hash(path) != parent.get("sha256"):
        return None, (f"'{path}' is not the ANN the network was converted from (hash differs): no ANN reference "
                      "(pass --ann-ckpt)")
    return Path(path), None


def _signature(settings: dict, inputs: dict) -> str:
    """A setting's key: its settings and the sha256 of the checkpoints it reads."""
    return settings_key(settings, [f"{k}:{v}" for k, v in inputs.items()])


def _legacy_signature(settings: dict, inputs: dict) -> str:
    """How earlier versions keyed a setting (its results stay valid)."""
    return hashlib.sha256(json.dumps([settings, inputs], sort_keys=True, default=str).encode()).hexdigest()


def _saved(path: Path, settings: dict, inputs: dict) -> dict | None:
    """A completed setting's saved result, if it was made with ``settings`` and ``inputs``."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(rec, dict) and rec.get("complete") and rec.get("signature") in (
            _signature(settings, inputs), _legacy_signature(settings, inputs)):
        return rec
    return None


def _parent_for_bits(conv_path: Path, conv: dict, conv_sha: str, bits, out: Path) -> dict:
    """The checkpoint finetune starts from for ``bits``: the converted one, with its input
    bits set (under torchrun rank 0 writes it and the others wait for it)."""
    if conv["model"].get("input_bits") == bits:
        return {"path": conv_path}
    path = out / "parents" / f"{conv_path.stem}_b{bits_label(bits)}.pt"
    if parallel.world().main and not _is_parent(path, conv_sha, bits):
        derived = {k: v for k, v in conv.items() if k not in ("format", "format_version", "versions")}
        derived["model"] = {**conv["model"], "input_bits": bits}
        derived["derived"] = {"from": str(conv_path), "from_sha256": conv_sha, "input_bits": bits,
                              "by": "snnadv analyze (input quantisation for fine-tuning)"}
        save_checkpoint(path, derived)
    parallel.barrier()
    return {"path": path}


def _is_parent(path: Path, conv_sha: str, bits) -> bool:
    """``path`` holds the converted checkpoint ``conv_sha`` with input bits ``bits``."""
    if not path.is_file():
        return False
    try:
        old = load_checkpoint(path)
    except CheckpointError:
        return False
    return (old.get("derived") or {}).get("from_sha256") == conv_sha and old["model"].get("input_bits") == bits


def default_timesteps(name: str, model: str, conv: dict, config=None) -> list[int]:
    """T of a sweep when none is given: Fig. 2's grid for the timesteps sweep; for the
    leak sweep the T its models are fine-tuned at (the config's ``[finetune] timesteps``,
    else the paper's for the architecture) or, for SNN-conv, the checkpoint's T."""
    if name == "timesteps":
        return [50, 75, 100, 150] if model == "snn-bp" else [300, 500, 1000, 2000]
    if model == "snn-bp":
        configured = resolve("finetune", config).get("timesteps") if config else None
        return [int(configured or FINETUNE_STEPS.get(conv["spec"]["arch"], 100))]
    return [int(conv["model"].get("num_steps", 100))]


def _finetune_cfg(cfg: dict, conv: dict, parent: dict, s: Setting, out: Path, data_dir: str) -> dict:
    """The settings of one fine-tuning: the finetune stage's (config [finetune]) < the sweep's."""
    flags = {k: cfg.get(k) for k in ("device", "seed", "batch_size", "train_subset", "test_subset", "download",
                                     "quiet", "epochs", "lr", "surrogate", "scale", "precision")}
    flags.update(data_dir=data_dir, dataset=conv["dataset"], checkpoint=str(parent["path"]),
                 timesteps=s.timesteps, leak=s.leak, out=str(out), resume=False)
    ft = resolve("finetune", cfg.get("config"), flags)
    ft["data_dir"] = abs_path(ft["data_dir"])
    return ft


def _ft_identity(ft_cfg: dict) -> dict:
    return result_settings(ft_cfg, FT_IGNORED)


def _finetune_state(pt: Path, ft_cfg: dict, parent_sha: str) -> str:
    """``complete`` (re-use), ``resumable`` (continue) or ``fresh`` for a fine-tuned checkpoint."""
    if not pt.is_file():
        return "fresh"
    try:
        ck = load_checkpoint(pt, "snn-bp")
    except CheckpointError:
        return "fresh"

    def ident(c):  # the epoch count may grow: a shorter run is continued, as ``finetune --resume`` does
        return json.dumps({k: v for k, v in _ft_identity(c).items() if k != "epochs"}, sort_keys=True, default=str)

    if ident(ck.get("config") or {}) != ident(ft_cfg) or (ck.get("parent") or {}).get("sha256") != parent_sha:
        return "fresh"
    state, metrics = ck.get("train_state") or {}, ck.get("metrics") or {}
    epoch, epochs = int(state.get("epoch", metrics.get("epochs") or 0)), int(ft_cfg["epochs"])
    if epoch == epochs and "test_acc" in metrics:
        return "complete"
    return "resumable" if state and epoch <= epochs else "fresh"


def _row(rec: dict, model: str, bits, T, leak, status: str) -> dict:
    acc = rec["accuracy"]
    row = {"key": rec["key"], "model": model, "bits": bits_label(bits), "timesteps": T, "leak": leak,
           "status": status, "seconds": rec.get("seconds")}
    for k, v in acc.items():
        row[k], row[f"{k}_std"] = v["mean"], v["std"]
    ft = rec.get("finetune") or {}
    row["finetune_test_acc"] = ft.get("test_acc")
    row["checkpoint_sha256"] = ((rec.get("models") or {}).get("finetuned") or {}).get("sha256")
    return row


def _tables(name: str, rows: list[dict], ann_rows: list[dict], p: dict) -> list[dict]:
    metrics = [("clean", "Clean accuracy (%)")] + [(a, f"Blackbox {a.upper()} accuracy (%)") for a in p["attacks"]]
    ann = {r["bits"]: r for r in ann_rows}
    model = LABEL[p["model"]]
    tables = []
    if name == "timesteps":
        Ts = p["timesteps"]
        for m, title in metrics:
            body = []
            for b in p["bits"]:
                bl = bits_label(b)
                for lam in p["leaks"]:
                    cells = []
                    for T in Ts:
                        r = [x for x in rows if (x["bits"], x["leak"], x["timesteps"]) == (bl, lam, T)]
                        cells.append(r[0].get(m) if r else None)
                    body.append([model, bl, f"{lam:g}", ann[bl].get(m) if bl in ann else None, *cells])
            tables.append(table(f"{title} vs timesteps" + (" (paper Fig. 2c)" if m == "clean" else " (Fig. 2a/b)"),
                                ["model", "input bits", "leak", "ANN", *[f"T={T}" for T in Ts]], body))
    else:
        body = [[model, f"{r['leak']:g}", r["timesteps"], r["bits"], *[r.get(m) for m, _ in metrics],
                 r.get("finetune_test_acc")] for r in rows]
        body += [["ANN", "-", "-", r["bits"], *[r.get(m) for m, _ in metrics], None] for r in ann_rows]
        tables.append(table("Clean and blackbox accuracy (%) per leak (paper Fig. 6b)",
                            ["model", "leak", "T", "input bits", *[t.split(" accuracy")[0] for _, t in metrics],
                             "fine-tune test acc"], body))
    return tables


def _bits_text(label: str) -> str:
    return "no quantisation" if label == "none" else f"{label}-bit"


def _draw_timesteps(figure, rows, ann_rows, p):
    metrics = [(a, f"blackbox {a.upper()}") for a in p["attacks"]] + [("clean", "clean")]
    fig, axes = figure(1, len(metrics), (4.4 * len(metrics), 3.8))
    series = [(b, lam) for b in p["bits"] for lam in p["leaks"]]
    ann = {r["bits"]: r for r in ann_rows}
    letters = iter("abcdefgh")
    for j, (m, title) in enumerate(metrics):
        ax = axes[0][j]
        for k, (b, lam) in enumerate(series):
            bl = bits_label(b)
            pts = sorted((r["timesteps"], r.get(m)) for r in rows if r["bits"] == bl and r["leak"] == lam)
            label = f"{LABEL[p['model']]}, {_bits_text(bl)}" + (f", λ={lam:g}" if len(p["leaks"]) > 1 else "")
            ax.plot([t for t, _ in pts], [v for _, v in pts], "-o", color=f"C{k}", label=label)
            if bl in ann and m in ann[bl] and (len(p["leaks"]) == 1 or lam == p["leaks"][0]):
                ax.axhline(ann[bl][m], color=f"C{k}", ls=":", lw=1)
                ax.plot([min(p["timesteps"])], [ann[bl][m]], "^", color="gray", mec=f"C{k}", ms=8,
                        label=f"ANN, {_bits_text(bl)}")
        ax.set_xlabel("timesteps T")
        ax.set_ylabel(f"{title} accuracy (%)")
        ax.set_title(f"({next(letters)}) {title} accuracy vs T")
        ax.legend(fontsize=7)
    return fig


def _draw_leak(figure, rows, ann_rows, p):
    metrics = ["clean", *p["attacks"]]
    groups = [(f"λ={r['leak']:g}" + (f"\nT={r['timesteps']}" if len(p["timesteps"]) > 1 else "")
               + (f"\n{_bits_text(r['bits'])}" if len(p["bits"]) > 1 else ""), r) for r in rows]
    groups += [(f"ANN\n{_bits_text(r['bits'])}", r) for r in ann_rows]
    fig, axes = figure(1, 1, (max(5.0, 1.3 * len(groups) + 2), 4.0))
    ax = axes[0][0]
    width = 0.8 / len(metrics)
    for k, m in enumerate(metrics):
        xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(groups))]
        vals = [r.get(m) or 0.0 for _, r in groups]
        bars = ax.bar(xs, vals, width, label=m if m == "clean" else f"blackbox {m.upper()}", color=f"C{k}")
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{LABEL[p['model']]}: clean and blackbox accuracy vs leak (Fig. 6b)")
    ax.legend(fontsize=7)
    return fig
