"""Whitebox and blackbox robustness: ``snnadv attack`` and the paper's Tables 1 and 2.

Terms (paper Sec. 4.1-4.2):

* **source**: the model the adversarial images are crafted on; **target**: the model
  they are evaluated on.  Whitebox: source = target.  Blackbox: the source is a
  separately trained model (another seed) of the same architecture.
* An SNN source needs a gradient path: ``alg1`` (paper Algorithm 1) or ``bptt``
  (straight-through BPTT); see :mod:`snnadv.gradients`.  The report names it.
* SNN accuracies are means over ``eval_draws`` encoder draws (spread reported).
* Every accuracy keeps its per-image correctness (per draw), so each carries a
  95 % Wilson interval and each difference the paper draws (Table 1's Δ, SNN-BP vs
  SNN-conv vs ANN under one blackbox attack, Table 2's ANN- vs SNN-crafted inputs)
  a paired test on the same images (:mod:`snnadv.stats`, :func:`comparisons`).

:func:`run_table` crafts each adversarial set once and evaluates it on every
target that needs it (the blackbox ANN-II sets serve Table 1 and Table 2).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import parallel
from .atomic import _jsonable
from .attacks import check_eps, craft, make_attack, parse_eps, takes
from .checkpoint import build_model, file_hash, load_checkpoint
from .config import resolve_device
from .data import load_split, to_float
from .errors import SnnadvError
from .evaluation import accuracy_on, decode_correct, is_snn, predictions
from .gradients import make_gradient
from .outputs import Outputs, Pieces, atomic_write_text, guarded, remove_orphans, tensor_hash, write_json
from .report import Reporter
from .stats import compare

KINDS = ("ann", "snn-conv", "snn-bp")


def load_attack_model(path, kind: str | None, device, num_steps=None, input_bits=None, precision=None):
    """A model from a checkpoint, checked against the expected kind, with its hash."""
    ckpt = load_checkpoint(path, kind)
    model = build_model(ckpt, device, num_steps=num_steps if ckpt["stage"] != "ann" else None,
                        input_bits=input_bits, precision=precision)
    return model, {"path": str(path), "sha256": file_hash(path), "stage": ckpt["stage"],
                   "arch": ckpt["spec"]["arch"], "dataset": ckpt["dataset"],
                   "num_steps": getattr(model, "num_steps", None)}, ckpt


def check_compatible(a: dict, b: dict, ckpt_a: dict, ckpt_b: dict) -> None:
    """Source and target must share the dataset and the input size."""
    if a["dataset"] != b["dataset"]:
        raise SnnadvError(f"source '{a['path']}' is a {a['dataset']} model but target '{b['path']}' "
                          f"is a {b['dataset']} model")
    sa, sb = ckpt_a["spec"], ckpt_b["spec"]
    shape = [(s.get("in_channels", 3), s.get("image_size", 32)) for s in (sa, sb)]
    if shape[0] != shape[1]:
        (ca, wa), (cb, wb) = shape
        raise SnnadvError(f"source and target take inputs of different sizes: '{a['path']}' {ca}x{wa}x{wa}, "
                          f"'{b['path']}' {cb}x{wb}x{wb}")


def _attack_settings(cfg: dict, attacks: list[str]) -> dict:
    eps, alpha = parse_eps(cfg["eps"]), parse_eps(cfg["alpha"])
    steps = int(cfg["steps"])
    warnings = check_eps(eps, alpha if any(takes(a, "alpha") for a in attacks) else None, steps)
    return {"eps": eps, "alpha": alpha, "steps": steps, "random_start": bool(cfg["random_start"]),
            "warnings": warnings}


@guarded
def run_attack(cfg: dict, reporter: Reporter | None = None, outputs: Outputs | None = None) -> dict:
    """``snnadv attack``: craft on the source, evaluate clean and adversarial accuracy of the target."""
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    if cfg["source_ckpt"] is None:
        raise SnnadvError("attack needs --source-ckpt")
    out = Path(cfg["out"] or "runs/attack.json")
    out = out if out.suffix == ".json" else out / "attack.json"
    outputs.claim([out], cfg, inputs={"--source-ckpt": cfg["source_ckpt"], "--target-ckpt": cfg["target_ckpt"]})
    for role in ("source", "target"):
        if cfg[role] is not None and cfg[role] not in KINDS:
            raise SnnadvError(f"unknown {role} kind '{cfg[role]}' (choose {', '.join(KINDS)})")
    settings = _attack_settings(cfg, [cfg["attack"]])
    for w in settings["warnings"]:
        reporter.print(f"[yellow]warning:[/] {w}")
    if cfg["source"] == "ann" and cfg["gradient"] is not None:
        raise SnnadvError("--gradient applies to SNN sources only; an ANN source uses autograd")
    eot = cfg.get("eot", 1)
    if not isinstance(eot, int) or isinstance(eot, bool) or eot < 1:
        raise SnnadvError(f"--eot must be a positive integer, got {eot}")
    if cfg["source"] == "ann" and eot > 1:
        raise SnnadvError("--eot applies to SNN sources only (an ANN's gradient has no randomness to average)")
    device = resolve_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    source, src_info, src_ckpt = load_attack_model(cfg["source_ckpt"], cfg["source"], device,
                                                   cfg["timesteps"], cfg["input_bits"], cfg.get("precision"))
    target_ckpt = cfg["target_ckpt"] or cfg["source_ckpt"]
    target_kind = cfg["target"] or (cfg["source"] if cfg["target_ckpt"] is None else None)
    target, tgt_info, tgt_ckpt = load_attack_model(target_ckpt, target_kind, device, cfg["timesteps"],
                                                   cfg["input_bits"], cfg.get("precision"))
    check_compatible(src_info, tgt_info, src_ckpt, tgt_ckpt)
    whitebox = src_info["sha256"] == tgt_info["sha256"] and src_info["num_steps"] == tgt_info["num_steps"]
    test = load_split(src_info["dataset"], cfg["data_dir"], train=False, device=device,
                      subset=cfg["test_subset"], download=cfg["download"])
    images, labels = to_float(test.images), test.labels
    gradient = make_gradient(source, cfg["gradient"], eot) if is_snn(source) else make_gradient(source)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    attack = make_attack(cfg["attack"], source, settings["eps"], settings["alpha"], settings["steps"],
                         settings["random_start"], gradient, bool(cfg["targeted"]), gen)
    targets = None
    if cfg["targeted"]:
        shift = torch.randint(1, _num_classes(tgt_ckpt), labels.shape, generator=gen, device=device)
        targets = (labels + shift) % _num_classes(tgt_ckpt)
    t0 = time.perf_counter()
    with reporter.progress(f"crafting {cfg['attack']} on {src_info['stage']} ({gradient.name})", len(images)) as adv:
        x_adv = craft(attack, images, labels, cfg["batch_size"], adv, targets, seed=cfg["seed"])
    craft_s = time.perf_counter() - t0
    draws, bs = int(cfg["eval_draws"]), cfg["batch_size"]
    clean = accuracy_on(target, images, labels, bs, draws, cfg["seed"], per_sample=True)
    adv_acc = accuracy_on(target, x_adv, labels, bs, draws, cfg["seed"], per_sample=True)
    linf = (x_adv - images).abs().amax().item()
    result = {
        "attack": cfg["attack"], **{k: v for k, v in settings.items() if k != "warnings"},
        "targeted": bool(cfg["targeted"]), "gradient": gradient.name, "mode": "whitebox" if whitebox else "blackbox",
        "source": src_info, "target": tgt_info, "images": len(images), "eval_draws": draws,
        "clean_acc": clean, "adv_acc": adv_acc, "max_linf": linf, "craft_seconds": craft_s,
        "target_success": None if targets is None else
        float((_predict(target, x_adv, bs, cfg["seed"]) == targets).float().mean() * 100),
        "config": cfg, "warnings": settings["warnings"],
    }
    diff = compare(decode_correct(adv_acc["correct"]), decode_correct(clean["correct"]), cfg["seed"])
    result["adv_minus_clean"] = diff
    reporter.table(f"{result['mode']} {cfg['attack'].upper()} eps={settings['eps']:.4f}: "
                   f"{src_info['stage']} ({gradient.name}) -> {tgt_info['stage']}",
                   ["target", "clean %", "adversarial %", "Δ (paired)", "images", "draws"],
                   [[tgt_info["stage"], cell_text(clean), cell_text(adv_acc), delta_text(diff), len(images), draws]])
    reporter.print(SIGNIFICANCE_NOTE)
    if parallel.world().main:
        write_json(out, result)
    return result


def _num_classes(ckpt: dict) -> int:
    return int(ckpt["spec"]["num_classes"])


def _predict(model, images, batch_size, seed):
    """One draw's predictions (keyed, sharded: :func:`snnadv.evaluation.predictions`)."""
    return predictions(model, images, batch_size, 1, seed)[0]


# --------------------------------------------------------------------------- tables
ROLES = {"ann": "ANN", "snn_conv": "SNN-conv", "snn_bp": "SNN-BP"}


@guarded
def run_table(cfg: dict, reporter: Reporter | None = None, outputs: Outputs | None = None) -> dict:
    """Paper Table 1 (whitebox + blackbox from ANN-II) and Table 2 (sources II x targets I)."""
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    out = Path(cfg["out"] or "runs/table")
    out = out.parent / out.stem if out.suffix else out
    outputs.claim([out, out / "tables.json", out / "tables.md"], cfg, folder=True, replace=[out / "tables.json"],
                  inputs={f"[table] {r}{x}": cfg.get(r + x) for r in ROLES for x in ("", "_ii")})
    attacks = [str(a) for a in cfg["attacks"]]
    settings = _attack_settings(cfg, attacks)
    device = resolve_device(cfg["device"])
    main = parallel.world().main
    if main:
        remove_orphans(out / "pieces")  # temporary files of a killed run (the folder is ours: locked)
    torch.manual_seed(cfg["seed"])
    steps_for = {"ann": None, "snn_conv": cfg["conv_timesteps"], "snn_bp": cfg["bp_timesteps"]}
    models, infos = {}, {}
    for role in ROLES:
        for suffix in ("", "_ii"):
            key = role + suffix
            if cfg[key] is None:
                raise SnnadvError(f"table needs the '{key}' checkpoint (set it in [table] of the config)")
            models[key], infos[key], ckpt = load_attack_model(cfg[key], role.replace("_", "-"), device,
                                                              steps_for[role], cfg["input_bits"],
                                                              cfg.get("precision"))
    datasets = {i["dataset"] for i in infos.values()}
    if len(datasets) != 1:
        raise SnnadvError(f"the table's checkpoints mix datasets: {sorted(datasets)}")
    test = load_split(datasets.pop(), cfg["data_dir"], train=False, device=device, subset=cfg["test_subset"],
                      download=cfg["download"])
    images, labels = to_float(test.images), test.labels
    bs, draws, seed = cfg["batch_size"], int(cfg["eval_draws"]), cfg["seed"]
    cache: dict[tuple[str, str], torch.Tensor] = {}
    # every crafted set and every accuracy is also kept in out/pieces/, keyed by what makes it,
    # so an interrupted table resumes where it stopped (each piece draws from its own seed:
    # skipping the ones already made changes none of the others)
    pieces = Pieces(out / "pieces", {"images": tensor_hash(images), "labels": tensor_hash(labels),
                                     "seed": seed, "batch_size": bs, "precision": cfg.get("precision"),
                                     "device": device.type})
    model_id = {k: {"sha256": i["sha256"], "num_steps": i["num_steps"]} for k, i in infos.items()}

    # a crafted set is made (and kept) in chunks of whole batches: the keyed attacks give
    # every image the same result in any chunk, so a long crafting run resumes mid-set
    step = max(1, -(-(cfg.get("chunk") or len(images)) // bs)) * bs

    def craft_in_chunks(name, what, model, grad, source_key, attack_name) -> torch.Tensor:
        parts, atk = [], None
        with reporter.progress(f"crafting {attack_name} on {source_key} ({grad.name})", len(images)) as adv:
            for a in range(0, len(images), step):
                b = min(a + step, len(images))
                part = pieces.load_tensor(f"{name}-{a}-{b}", what) if step < len(images) else None
                if parallel.any_rank(part is None, device):
                    if atk is None:  # built once, for the first chunk not kept
                        gen = torch.Generator(device=device).manual_seed(seed)
                        atk = make_attack(attack_name, model, settings["eps"], settings["alpha"], settings["steps"],
                                          settings["random_start"], grad, False, gen)
                    part = craft(atk, images[a:b], labels[a:b], bs, adv, seed=seed, start=a)
                    if main and step < len(images):
                        pieces.save_tensor(f"{name}-{a}-{b}", what, part)
                else:
                    adv(b - a)
                parts.append(part)
        return torch.cat(parts)

    def adversarial(source_key: str, attack_name: str) -> torch.Tensor:
        if (source_key, attack_name) not in cache:
            model = models[source_key]
            grad = make_gradient(model, cfg["gradient"] if is_snn(model) else None)
            what = {"source": model_id[source_key], "attack": attack_name, "gradient": grad.name,
                    **{k: v for k, v in settings.items() if k != "warnings"}}
            name = f"adv-{source_key}-{attack_name}"
            x = pieces.load_tensor(name, what)
            if parallel.any_rank(x is None, device):  # every process makes it, or none does
                x = craft_in_chunks(name, what, model, grad, source_key, attack_name)
                if main:
                    pieces.save_tensor(name, what, x)
            cache[(source_key, attack_name)] = x
        return cache[(source_key, attack_name)]

    def acc(target_key: str, source_key: str | None = None, attack_name: str | None = None) -> dict:
        x = images if source_key is None else adversarial(source_key, attack_name)
        what = {"target": model_id[target_key], "draws": draws,
                "input": "clean" if source_key is None else [source_key, attack_name]}
        name = f"acc-{target_key}-" + ("clean" if source_key is None else f"{source_key}-{attack_name}")
        found = pieces.load_json(name, what)
        if parallel.any_rank(found is None, device):  # every process computes it, or none does
            model = models[target_key]
            seen = "clean" if source_key is None else f"{attack_name} from {source_key}"
            with reporter.progress(f"accuracy of {target_key} on {seen}",
                                   len(images) * (draws if is_snn(model) else 1)) as advance:
                found = accuracy_on(model, x, labels, bs, draws, seed, advance=advance, per_sample=True)
            if main:
                pieces.save_json(name, what, found)
            found = json.loads(json.dumps(found, default=_jsonable))  # as a resumed run reads it (JSON types)
        return found

    result = {"settings": {k: v for k, v in settings.items() if k != "warnings"}, "gradient": cfg["gradient"],
              "eval_draws": draws, "images": len(images), "models": infos, "config": cfg}
    roles = list(ROLES)
    if "1" in [str(t) for t in cfg["tables"]]:
        t1 = {"clean": {r: acc(r) for r in roles}, "whitebox": {}, "blackbox": {}}
        for a in attacks:
            t1["whitebox"][a] = {r: acc(r, r, a) for r in roles}
            t1["blackbox"][a] = {r: acc(r, "ann_ii", a) for r in roles}
        result["table1"] = t1
    if "2" in [str(t) for t in cfg["tables"]]:
        result["table2"] = {a: {s + "_ii": {t: acc(t, s + "_ii", a) for t in roles} for s in roles}
                            for a in attacks}
    result["comparisons"] = comparisons(result, seed)
    _print_tables(result, reporter)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "tables.json", result)
        atomic_write_text(out / "tables.md", tables_markdown(result))
    reporter.print(f"[green]saved[/] {out / 'tables.json'} and {out / 'tables.md'}")
    return result


SIGNIFICANCE_NOTE = ("Accuracy: mean % [95 % Wilson interval over images]; SNNs over several encoder draws also "
                     "± std (min–max) over draws. Δ: paired difference in points [95 % paired bootstrap interval]; "
                     "* = significant at 5 % (exact McNemar test on per-image correctness, majority over draws).")


def _pair(a: tuple, b: tuple, label: str) -> dict:
    return {"label": label, "a": list(a), "b": list(b)}


def comparison_pairs(result: dict) -> list[dict]:
    """The paired comparisons the paper draws, as (cell A, cell B): A − B is reported.

    Table 1: Δ = SNN-BP − ANN in every row (the paper's Δ), and in the blackbox
    columns SNN-BP − SNN-conv (is SNN-BP the highest?) and SNN-conv − ANN (are they
    about equal?).  Table 2: for every target, accuracy under SNN-crafted minus under
    ANN-crafted inputs (positive = the ANN-crafted attack is the stronger one).
    A cell is its path in the result, e.g. ``("table1", "blackbox", "fgsm", "snn_bp")``.
    """
    pairs = []
    if "table1" in result:
        pairs.append(_pair(("table1", "clean", "snn_bp"), ("table1", "clean", "ann"), "Table 1 clean: SNN-BP − ANN"))
        for mode in ("whitebox", "blackbox"):
            for a in result["table1"][mode]:
                cell = lambda r: ("table1", mode, a, r)  # noqa: E731
                name = f"Table 1 {mode} {a.upper()}"
                pairs.append(_pair(cell("snn_bp"), cell("ann"), f"{name}: SNN-BP − ANN (Δ)"))
                if mode == "blackbox":
                    pairs.append(_pair(cell("snn_bp"), cell("snn_conv"), f"{name}: SNN-BP − SNN-conv"))
                    pairs.append(_pair(cell("snn_conv"), cell("ann"), f"{name}: SNN-conv − ANN"))
    if "table2" in result:
        for a in result["table2"]:
            for t in ROLES:
                for s in ("snn_conv", "snn_bp"):
                    pairs.append(_pair(("table2", a, s + "_ii", t), ("table2", a, "ann_ii", t),
                                       f"Table 2 {a.upper()} on {ROLES[t]}-I: {ROLES[s]}-II-crafted − "
                                       f"ANN-II-crafted"))
    return pairs


def cell_at(result: dict, path) -> dict:
    d = result
    for k in path:
        d = d[k]
    return d


def comparisons(result: dict, seed: int = 0) -> list[dict]:
    """:func:`comparison_pairs` with their paired statistics (:func:`snnadv.stats.compare`)."""
    out = []
    for pair in comparison_pairs(result):
        a, b = cell_at(result, pair["a"]), cell_at(result, pair["b"])
        out.append({**pair, **compare(decode_correct(a["correct"]), decode_correct(b["correct"]), seed)})
    return out


def cell_text(d: dict) -> str:
    """``mean [lo, hi]``, plus ``±std (min–max)`` over draws when there are several (older files: mean±std)."""
    text = f"{d['mean']:.1f}"
    if "ci95" in d:
        text += f" [{d['ci95'][0]:.1f}, {d['ci95'][1]:.1f}]"
    if len(d.get("draws") or []) > 1:
        text += f" ±{d['std']:.1f}" + (f" ({d['min']:.1f}–{d['max']:.1f})" if "min" in d else "")
    return text


def delta_text(c: dict | None, plain: float | None = None) -> str:
    """``+3.0* [+1.2, +4.8]`` for a comparison; the plain difference when there is none (older files)."""
    if c is None:
        return "—" if plain is None else f"{plain:+.1f}"
    return f"{c['diff']:+.1f}{'*' if c['significant'] else ''} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"


def find_comparison(result: dict, a: tuple, b: tuple) -> dict | None:
    """The comparison of cell ``a`` with cell ``b`` in ``result`` (None when it has none)."""
    for c in result.get("comparisons") or []:
        if tuple(c["a"]) == a and tuple(c["b"]) == b:
            return c
    return None


def table_rows(result: dict) -> dict:
    """The tables as lists of rows (shared by the terminal and Markdown output)."""
    rows = {}
    roles = list(ROLES)
    if "table1" in result:
        t1 = result["table1"]

        def delta(*path) -> str:
            a, b = ("table1", *path, "snn_bp"), ("table1", *path, "ann")
            found = find_comparison(result, a, b)
            return delta_text(found, None if found or path == ("clean",) else
                              cell_at(result, a)["mean"] - cell_at(result, b)["mean"])

        r = [["Clean"] + [cell_text(t1["clean"][x]) for x in roles] + [delta("clean")]
             + [cell_text(t1["clean"][x]) for x in roles] + [delta("clean")]]
        for a in t1["whitebox"]:
            wb, bb = t1["whitebox"][a], t1["blackbox"][a]
            r.append([a.upper()] + [cell_text(wb[x]) for x in roles] + [delta("whitebox", a)]
                     + [cell_text(bb[x]) for x in roles] + [delta("blackbox", a)])
        rows["table1"] = (["", "WB ANN", "WB SNN-conv", "WB SNN-BP", "WB Δ", "BB ANN", "BB SNN-conv",
                           "BB SNN-BP", "BB Δ"], r)
    if "table2" in result:
        t2 = result["table2"]
        header = ["source \\ target"] + [f"{a.upper()} {ROLES[t]}-I" for a in t2 for t in roles]
        r = [[f"{ROLES[s]}-II"] + [cell_text(t2[a][s + "_ii"][t]) for a in t2 for t in roles] for s in roles]
        rows["table2"] = (header, r)
    if result.get("comparisons"):
        rows["comparisons"] = (["comparison (A − B)", "Δ points", "95 % CI", "only A / only B right",
                                "McNemar p", "significant"],
                               [[c["label"], f"{c['diff']:+.1f}", f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]",
                                 f"{c['only_a']} / {c['only_b']}", f"{c['p']:.3g}", "yes" if c["significant"] else "no"]
                                for c in result["comparisons"]])
    return rows


TITLES = {"table1": "Table 1: clean and adversarial accuracy (%), whitebox (WB) and blackbox (BB, crafted on ANN-II)",
          "table2": "Table 2: blackbox accuracy (%), sources (II) x targets (I)",
          "comparisons": "Paired comparisons on the same test images"}


def _print_tables(result: dict, reporter: Reporter) -> None:
    for key, (header, rows) in table_rows(result).items():
        reporter.table(TITLES[key], header, rows)
    if result.get("comparisons"):
        reporter.print(SIGNIFICANCE_NOTE)


def tables_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"eps = {s['eps']:.4f}, PGD alpha = {s['alpha']:.4f}, {s['steps']} steps, "
             f"random start: {s['random_start']}; SNN gradient: {result['gradient']}; "
             f"{result['images']} test images; SNN accuracies: mean over {result['eval_draws']} encoder draw(s)", ""]
    if result.get("comparisons"):
        lines += [SIGNIFICANCE_NOTE, ""]
    for key, (header, rows) in table_rows(result).items():
        lines += [f"**{TITLES[key]}**", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]
    return "\n".join(lines)
