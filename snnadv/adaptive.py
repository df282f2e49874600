"""``snnadv evaluate``: honest robustness of one checkpoint (the experiment side of
:mod:`snnadv.attacks.suite`).

Loads the target (and, for the ``ann`` gradient path, the ANN it was converted from,
found through the checkpoint's parent chain: paths as recorded, else beside the child,
sha256 checked; ``--proxy-ckpt`` overrides; if the chain is broken the SNN's own
weights are loaded into an ANN, with a warning), runs the suite
(:func:`snnadv.attacks.suite.evaluate_model`; what it computes and the suites are
described there, the gradient-masking checks in :mod:`snnadv.masking`), prints the
table and the checks through the shared :class:`~snnadv.report.Reporter`, and writes
JSON, a Markdown section (for ``snnadv report``) and an accuracy-vs-eps plot, each
atomically.  ``--protocol NAME`` runs a named protocol instead (:func:`run_protocol`),
whitebox or, with ``--source-ckpt``, crafted on another model and scored on the target
(transfer).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import parallel
from .attacks import check_eps
from .attacks.settings import EvalSettings, proxy_path, resolve_paths
from .attacks.suite import evaluate_model
from .checkpoint import build_model, file_hash, load_checkpoint, versions
from .config import resolve_device
from .data import load_split, to_float
from .errors import SnnadvError
from .evaluation import is_snn
from .outputs import Outputs, atomic_target, atomic_write_text, guarded, write_json
from .report import Reporter
from .robustness import check_compatible, load_attack_model


# --------------------------------------------------------------------------- models
def find_proxy(target_path, ckpt: dict, device, proxy_ckpt=None, input_bits=None, warn=None):
    """The ANN for the ``ann`` path: ``proxy_ckpt``, else the parent chain's ANN (paths
    as recorded, else beside the child; sha256 checked), else the SNN's own weights
    loaded into an ANN.  Returns (model, info)."""
    warn = warn or (lambda msg: None)
    if proxy_ckpt is not None:
        model, info, _ = load_attack_model(proxy_ckpt, "ann", device, None, input_bits)
        return model, {**info, "source": "config"}
    cur_path, cur, why = Path(target_path), ckpt, None
    for _ in range(8):
        if cur["stage"] == "ann":
            break
        parent = cur.get("parent") or {}
        if not parent.get("path"):
            why = f"'{cur_path}' records no parent"
            break
        recorded = Path(parent["path"])
        found = next((c for c in (recorded, cur_path.parent / recorded.name) if c.is_file()), None)
        if found is None:
            why = f"parent '{recorded}' of '{cur_path}' not found"
            break
        if parent.get("sha256") and file_hash(found) != parent["sha256"]:
            why = f"parent '{found}' changed since '{cur_path}' was made (sha256 differs)"
            break
        cur_path, cur = found, load_checkpoint(found)
    if why is None and cur["stage"] == "ann":
        model = build_model(cur, device, input_bits=input_bits)
        return model, {"source": "parent", "path": str(cur_path), "sha256": file_hash(cur_path), "stage": "ann",
                       "arch": cur["spec"]["arch"], "dataset": cur["dataset"]}
    warn(f"ann path: {why or 'no ANN in the parent chain'}; using the SNN's own weights in an ANN")
    model = build_model({**ckpt, "stage": "ann"}, device, input_bits=input_bits)
    return model, {"source": "own-weights", "path": str(target_path), "sha256": file_hash(target_path),
                   "stage": "ann", "arch": ckpt["spec"]["arch"], "dataset": ckpt["dataset"], "why": why}


@guarded
def run_evaluate(cfg: dict, reporter: Reporter | None = None, outputs: Outputs | None = None) -> dict:
    """``snnadv evaluate``: load the target, run the suite, print, write JSON/Markdown/plot.

    The outputs are claimed (:mod:`snnadv.outputs`) once the target is loaded, before any attack."""
    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    if cfg.get("target_ckpt") is None:
        raise SnnadvError("evaluate needs --target-ckpt")
    if cfg.get("protocol"):
        return run_protocol(cfg, reporter, outputs=outputs)
    if cfg.get("source_ckpt"):
        raise SnnadvError("--source-ckpt crafts a --protocol's attacks on another model: give --protocol "
                          "(the --suite evaluation adds a transfer attack with --blackbox-ckpt)")
    s = EvalSettings.from_config({**cfg, "batch_size": cfg.get("batch_size") or 64})
    device = resolve_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    model, info, ckpt = load_attack_model(cfg["target_ckpt"], None, device, cfg.get("timesteps"),
                                          cfg.get("input_bits"), cfg.get("precision"))
    paths = resolve_paths(model, s.paths, s.slope)
    json_path, md_path, png_path = output_paths(cfg.get("out"), info)
    outputs.claim([json_path, md_path, png_path], cfg, inputs={
        f"--{k.replace('_', '-')}": cfg.get(k) for k in ("target_ckpt", "proxy_ckpt", "blackbox_ckpt")})
    warnings: list[str] = []

    def warn(msg):
        warnings.append(msg)
        reporter.print(f"[yellow]warning:[/] {msg}")

    proxy = proxy_info = None
    if is_snn(model) and any(proxy_path(p) for p in paths):
        proxy, proxy_info = find_proxy(cfg["target_ckpt"], ckpt, device, cfg.get("proxy_ckpt"),
                                       cfg.get("input_bits"), warn)
        check_compatible(info, proxy_info, ckpt, load_checkpoint(proxy_info["path"]))
    blackbox = bb_info = None
    if cfg.get("blackbox_ckpt"):
        blackbox, bb_info, bb_ckpt = load_attack_model(cfg["blackbox_ckpt"], None, device, None, cfg.get("input_bits"),
                                                       cfg.get("precision"))
        check_compatible(bb_info, info, bb_ckpt, ckpt)
    if s.library and s.suite != "paper":
        try:
            import torchattacks  # noqa: F401
        except ImportError:
            warn("torchattacks is not installed: APGD and Square skipped (pip install 'snnadv[attacks]')")
            s.library = False
    for e in s.eps + s.sweep_eps:
        for w in check_eps(e, s.alpha) if s.alpha is not None and e > 0 else []:
            warn(w)
    test = load_split(info["dataset"], cfg["data_dir"], train=False, device=device, subset=cfg["test_subset"],
                      download=cfg["download"])
    images, labels = to_float(test.images), test.labels
    result = evaluate_model(model, images, labels, s, reporter.progress, proxy, blackbox)
    lib = None
    try:
        import torchattacks

        lib = torchattacks.__version__
    except ImportError:
        pass
    result.update(target=info, proxy=proxy_info, blackbox=bb_info, config=cfg,
                  versions={**versions(), "torchattacks": lib})
    warnings.extend(result["warnings"])
    result["warnings"] = warnings  # the same list: the plot's warning lands in the JSON too
    print_result(result, reporter)
    main = parallel.world().main  # under torchrun, rank 0 writes
    result["plot"] = plot_eps(result, png_path, warn) if main else None
    if main:
        write_json(json_path, result)
        atomic_write_text(md_path, evaluate_markdown(result))
    reporter.print(f"[green]saved[/] {json_path} and {md_path}" + (f" and {png_path}" if result["plot"] else ""))
    return result


def output_paths(out, info: dict, source: dict | None = None) -> tuple[Path, Path, Path]:
    """``--out`` ending in .json: that file, the Markdown and -eps.png beside it; else a
    folder (default runs/evaluate) with evaluate-<stage>.json/.md/-eps.png
    (evaluate-<stage>-from-<source stage>.* for a transfer run crafted on ``source``).
    The Markdown name always contains "evaluate": ``snnadv report`` includes such files."""
    if out and Path(out).suffix == ".json":
        p = Path(out)
        md = p.with_suffix(".md") if "evaluate" in p.stem else p.with_name(p.stem + "-evaluate.md")
        return p, md, p.with_name(p.stem + "-eps.png")
    folder = Path(out or "runs/evaluate")
    stem = f"evaluate-{info['stage']}" + (f"-from-{source['stage']}" if source else "")
    return folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}-eps.png"


# --------------------------------------------------------------------------- output
def _cell(d: dict) -> str:
    return f"{d['mean']:.1f}" if d["std"] == 0 else f"{d['mean']:.1f}±{d['std']:.1f}"


def result_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The table (header, rows): clean first, the per-sample worst case last."""
    header = ["attack", "path", "steps", "restarts", "eot", "group"] + [f"acc % eps={l}" for l in result["eps_labels"]]
    n = len(result["eps"])
    rows = [["clean", "-", "-", "-", "-", "-"] + [_cell(result["clean"])] * n]
    order = {"paper": 0, "adaptive": 1, "library": 3, "transfer": 4, "ladder": 5}
    body = sorted(result["rows"], key=lambda r: order[r["group"]])
    worst_paths_done = False
    for r in body:
        if r["group"] != "adaptive" and not worst_paths_done and result.get("worst_paths") and order[r["group"]] > 1:
            rows.append(["worst over paths", "per sample", "", "", "", "adaptive"]
                        + [_cell(d) for d in result["worst_paths"]])
            worst_paths_done = True
        rows.append([r["label"], r["path"], str(r["steps"]), str(r["restarts"]), str(r["eot"]), r["group"]]
                    + [_cell(d) for d in r["acc"]])
    if result.get("worst_paths") and not worst_paths_done:
        rows.append(["worst over paths", "per sample", "", "", "", "adaptive"]
                    + [_cell(d) for d in result["worst_paths"]])
    rows.append(["WORST CASE", "all attacks", "", "", "", "per sample"] + [_cell(d) for d in result["worst_case"]])
    return header, rows


def flag_lines(result: dict, markdown: bool = False) -> list[str]:
    out = []
    for name, f in result["flags"].items():
        mark = {True: "FLAG", False: "ok", None: "n/a"}[f["flag"]]
        detail = f" ({'; '.join(f['detail'])})" if f["detail"] else ""
        mark = f"- **{mark}**" if markdown else mark
        out.append(f"{mark} {name}: {f['explain']}{detail}")
    return out


def _stats_rows(result: dict) -> list[list[str]]:
    def c(v):
        return "-" if v is None else f"{v:.2f}"

    return [[p, f"{v['zero_frac'] * 100:.1f}", f"{v['zero_images'] * 100:.1f}", c(v["cos_single"]), c(v["cos_eot"]),
             str(v["eot"])] for p, v in result.get("gradient_stats", {}).items()]


STATS_HEADER = ["path", "zero grad %", "all-zero images %", "cos (1 draw)", "cos (EOT)", "eot"]


def _who(result: dict) -> str:
    """The evaluated model, e.g. 'snn-bp vgg5'."""
    t = result.get("target") or {}
    return f"{t.get('stage', 'model')} {t.get('arch', '')}".strip()


def _title(result: dict) -> str:
    return (f"Robustness of {_who(result)} ({result['suite']} suite): accuracy %, "
            f"{result['images']} images, mean±std over {result['eval_draws']} encoder draw(s)")


def print_result(result: dict, reporter: Reporter) -> None:
    header, rows = result_rows(result)
    reporter.table(_title(result), header, rows, caption="\n".join(flag_lines(result)))
    if result.get("sweep"):
        sw = result["sweep"]
        reporter.table(f"Accuracy vs eps: {sw['attack']} ({sw['path']}, eot {sw['eot']})", ["eps", "acc %"],
                       [[p["label"], _cell(p["acc"])] for p in sw["points"]])
    if result.get("gradient_stats"):
        reporter.table("Gradient statistics (clean images)", STATS_HEADER, _stats_rows(result))
    if result.get("masking_suspected"):
        reporter.print("[red]gradient masking suspected[/]: the numbers above are upper bounds on robustness")


def evaluate_markdown(result: dict) -> str:
    """A Markdown section (for ``snnadv report``): settings, table, checks, statistics."""
    t = result.get("target") or {}
    s = result["settings"]
    header, rows = result_rows(result)
    lines = [f"### {_title(result)}", ""]
    if t:
        lines += [f"Target `{t.get('path')}` (sha256 `{str(t.get('sha256'))[:16]}`, T = {t.get('num_steps')}); "
                  f"paths: {', '.join(result['paths'])}; EOT {result['eot']}; PGD {s['steps']} steps x "
                  f"{s['restarts']} restarts; APGD {s['apgd_steps']} steps; Square {s['square_queries']} queries; "
                  f"seed {s['seed']}.", ""]
    if result.get("proxy"):
        p = result["proxy"]
        lines += [f"ANN proxy ({p['source']}): `{p['path']}` (sha256 `{str(p['sha256'])[:16]}`)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + ["", "**Sanity checks**", ""] + flag_lines(result, True)
    if result.get("sweep"):
        sw = result["sweep"]
        lines += ["", f"**Accuracy vs eps** ({sw['attack']}, {sw['path']}, eot {sw['eot']}): "
                  + ", ".join(f"{p['label']}: {_cell(p['acc'])}" for p in sw["points"])]
    if result.get("gradient_stats"):
        lines += ["", "**Gradient statistics** (clean images)", "", "| " + " | ".join(STATS_HEADER) + " |",
                  "|" + "---|" * len(STATS_HEADER)] + ["| " + " | ".join(r) + " |" for r in _stats_rows(result)]
    if result.get("plot"):  # named, not embedded: the report includes this text from another folder
        lines += ["", f"Accuracy-vs-eps plot: `{Path(result['plot']).name}`."]
    if result.get("masking_suspected"):
        lines += ["", "**Gradient masking suspected**: these accuracies are upper bounds on robustness."]
    return "\n".join(lines) + "\n"


def plot_eps(result: dict, path: Path, warn=None) -> str | None:
    """Accuracy vs eps: the sweep and, when several eps were given, the paper's PGD, Square
    and the worst cases (error bars: std over encoder draws); needs matplotlib."""
    warn = warn or (lambda msg: None)
    series = []
    if result.get("sweep"):
        pts = result["sweep"]["points"]
        series.append((f"{result['sweep']['attack']} ({result['sweep']['path']}) sweep", [p["eps"] for p in pts],
                       [p["acc"]["mean"] for p in pts], [p["acc"]["std"] for p in pts]))
    if len(result["eps"]) > 1:  # the paper's PGD, Square, the worst cases; from the clean accuracy at eps 0
        c = result["clean"]
        xs = [0.0] + list(result["eps"])
        picked = [(f"{r['label']} ({r['path']}, {r['group']})", r["acc"]) for r in result["rows"]
                  if (r["group"] == "paper" and r["attack"] == "pgd") or r["attack"] == "square"]
        if result.get("worst_paths"):
            picked.append(("worst over gradient paths", result["worst_paths"]))
        picked.append(("worst case", result["worst_case"]))
        for name, accs in picked:
            series.append((name, xs, [c["mean"]] + [d["mean"] for d in accs], [c["std"]] + [d["std"] for d in accs]))
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn("matplotlib is not installed: accuracy-vs-eps plot skipped (pip install matplotlib)")
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, xs, ys, es in series:
        ax.errorbar([x * 255 for x in xs], ys, yerr=es, marker="o", capsize=3, label=name,
                    linewidth=2.5 if name.endswith("sweep") or name == "worst case" else 1)
    t = result.get("target") or {}
    ax.set_title(f"{t.get('stage', 'model')} {t.get('arch', '')}: accuracy vs eps")
    ax.set_xlabel("eps (x 1/255)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_target(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------- protocols
def protocol_from_config(cfg: dict):
    """The protocol ``cfg["protocol"]`` with the settings given in the config or on the
    command line (``cfg["given"]``; every overridable one if unknown) overriding it."""
    from .attacks.protocols import OVERRIDABLE, resolve_protocol
    from .attacks.settings import parse_eps_list

    given = set(cfg.get("given", (*OVERRIDABLE, "protocol_attacks")))
    over = {k: cfg.get(k) for k in OVERRIDABLE if k in given and cfg.get(k) is not None}
    if cfg.get("protocol_attacks") is not None and "protocol_attacks" in given:  # --attacks / [evaluate] protocol_attacks
        over["attacks"] = cfg["protocol_attacks"]
    if "eps" in over:
        over["eps"] = parse_eps_list(over["eps"])
    return resolve_protocol(cfg["protocol"], over)


class PieceStore:
    """The cascade's pieces (:func:`snnadv.attacks.cascade.run_cascade`) as files of
    :class:`snnadv.outputs.Pieces` (a folder beside the JSON); ``fail_after``: raise after
    that many saves (to test resuming).

    ``common`` holds the protocol (``"protocol"``: :meth:`Protocol.to_dict`).  Its list of
    attacks is left out of the key: a piece is one attack on the images still standing
    (``what`` names both), whichever attacks come after it, so ``--attacks fgsm,pgd`` and
    a later run with the whole list share their first pieces.  Pieces saved before that
    (keyed by the whole protocol) are still read."""

    def __init__(self, folder, common: dict, fail_after: int | None = None):
        from .outputs import Pieces

        protocol = dict(common.get("protocol") or {})
        keyed = {**common, "protocol": {k: v for k, v in protocol.items() if k != "attacks"}}
        self.pieces, self.saved, self.fail_after = Pieces(folder, keyed), 0, fail_after
        self.legacy = Pieces(folder, common) if "attacks" in protocol else None

    def load(self, what: dict):
        got = self.pieces.load_tensor("cascade", what)
        if got is None and self.legacy is not None:
            got = self.legacy.load_tensor("cascade", what)
        return got

    def seconds(self, what: dict) -> dict | None:
        """What the piece cost when it was made (``{"attack": s, "eval": s}``; None for a
        piece saved before its time was kept), so a resumed run's cost table is whole."""
        got = self.pieces.load_json("cascade-seconds", what)
        return got if isinstance(got, dict) and {"attack", "eval"} <= set(got) else None

    def save(self, what: dict, x, seconds: dict | None = None) -> None:
        if seconds is not None:  # first: a piece is never found without its time
            self.pieces.save_json("cascade-seconds", what, seconds)
        self.pieces.save_tensor("cascade", what, x.to(torch.uint8))
        self.saved += 1
        if self.fail_after is not None and self.saved >= self.fail_after:
            raise RuntimeError(f"interrupted after {self.saved} pieces (test)")


def load_source(cfg: dict, target_info: dict, target_ckpt: dict, device):
    """The model a protocol's attacks are crafted on in a transfer run (``--source-ckpt``),
    or None (whitebox).  At ``--source-timesteps`` if given, else its own T (``--timesteps``
    is the target's); a missing, garbled
    or incompatible checkpoint (another dataset or input size than the target's) is one
    :class:`SnnadvError` line.  ``--blackbox-ckpt`` (the ``--suite`` evaluation's extra
    transfer row) is refused beside ``--protocol``: the two mean different things (one
    row added vs the whole protocol crafted on the other model).  Returns (model, info, ckpt)."""
    if cfg.get("blackbox_ckpt"):
        raise SnnadvError("--blackbox-ckpt adds a transfer row to the --suite evaluation; with --protocol give "
                          "--source-ckpt (the whole protocol is then crafted on that model)")
    if not cfg.get("source_ckpt"):
        return None, None, None
    try:
        source, info, ckpt = load_attack_model(cfg["source_ckpt"], None, device, cfg.get("source_timesteps"),
                                               cfg.get("input_bits"), cfg.get("precision"))
    except SnnadvError as e:
        raise SnnadvError(f"--source-ckpt: {e}") from None
    check_compatible(info, target_info, ckpt, target_ckpt)
    return source, {**info, "kind": info["stage"]}, ckpt


@guarded
def run_protocol(cfg: dict, reporter: Reporter | None = None, outputs: Outputs | None = None,
                 fail_after: int | None = None) -> dict:
    """``snnadv evaluate --protocol NAME``: the protocol as a resumable cascade
    (:func:`snnadv.attacks.run_protocol.evaluate_protocol`); prints the table and the cost
    table and writes JSON and Markdown.  Pieces are kept in ``<json stem>-pieces/`` beside
    the JSON: a run stopped part-way resumes there with the same result.

    With ``--source-ckpt`` (:func:`load_source`) a transfer run: the attacks are crafted on
    the source (its estimators, sharpness search and ``ann`` proxy: ``--proxy-ckpt`` is
    then the source's ANN) and scored on the target; Square is left out (a warning); the
    pieces' keys hold the source's sha256, so a whitebox and a transfer run never share
    pieces."""
    from .attacks.run_protocol import QUERY_ATTACKS, QUERY_REASON, evaluate_protocol
    from .evaluation import encode_correct
    from .outputs import tensor_hash

    reporter = reporter or Reporter(quiet=cfg.get("quiet", False))
    p = protocol_from_config(cfg)
    device = resolve_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    model, info, ckpt = load_attack_model(cfg["target_ckpt"], None, device, cfg.get("timesteps"),
                                          cfg.get("input_bits"), cfg.get("precision"))
    source, src_info, src_ckpt = load_source(cfg, info, ckpt, device)
    transfer = source is not None
    # the model the attacks are crafted on (whitebox: the target) and its checkpoint
    crafter, craft_path, craft_ckpt, craft_info = ((source, cfg.get("source_ckpt"), src_ckpt, src_info) if transfer
                                                   else (model, cfg["target_ckpt"], ckpt, info))
    json_path, md_path, _ = output_paths(cfg.get("out"), info, src_info)
    outputs.claim([json_path, md_path], cfg, inputs={
        f"--{k.replace('_', '-')}": cfg.get(k) for k in ("target_ckpt", "proxy_ckpt", "source_ckpt")})
    warnings: list[str] = []

    def warn(msg):
        warnings.append(msg)
        reporter.print(f"[yellow]warning:[/] {msg}")

    snn = is_snn(crafter)
    attacks = [a for a in p.attacks if not (transfer and a in QUERY_ATTACKS)]
    if transfer and len(attacks) < len(p.attacks):
        warn(f"transfer run: {', '.join(a for a in p.attacks if a in QUERY_ATTACKS)} left out ({QUERY_REASON})")
    needs_lib = "square" in attacks or any(a.endswith("-torchattacks") for a in attacks)
    if needs_lib:
        try:
            import torchattacks  # noqa: F401
        except ImportError:
            raise SnnadvError(f"protocol {p.name} needs torchattacks: pip install 'snnadv[attacks]'") from None
    proxy = proxy_info = None
    if snn and any(proxy_path(q) for q in resolve_paths(crafter, p.paths, cfg.get("slope"))) and \
            any(a.startswith("apgd") for a in attacks):
        proxy, proxy_info = find_proxy(craft_path, craft_ckpt, device, cfg.get("proxy_ckpt"),
                                       cfg.get("input_bits"), warn)
        check_compatible(craft_info, proxy_info, craft_ckpt, load_checkpoint(proxy_info["path"]))
    test = load_split(info["dataset"], cfg["data_dir"], train=False, device=device, subset=cfg["test_subset"],
                      download=cfg["download"])
    images, labels = to_float(test.images), test.labels
    heldout = None
    if snn and p.sharpness:  # training images: never the evaluated ones
        tr = load_split(info["dataset"], cfg["data_dir"], train=True, device=device, subset=p.sharpness_images,
                        download=cfg["download"])
        heldout = (to_float(tr.images), tr.labels)
    bs = cfg.get("batch_size") or 64
    cascade = cfg.get("cascade", True) is not False
    common = {"target": info.get("sha256"), "num_steps": info.get("num_steps"), "input_bits": cfg.get("input_bits"),
              "precision": cfg.get("precision"), "images": tensor_hash(images), "labels": tensor_hash(labels),
              "protocol": p.to_dict(), "slope": cfg.get("slope"), "cascade": cascade,
              "heldout": tensor_hash(heldout[0]) if heldout else None,
              "proxy": (proxy_info or {}).get("sha256"), "device": str(device)}
    if transfer:  # (only then: a whitebox run keeps the pieces' keys of before)
        common.update(mode="transfer", source=src_info["sha256"], source_num_steps=src_info.get("num_steps"))
    store = PieceStore(json_path.parent / f"{json_path.stem}-pieces", common, fail_after)
    what = f"{p.name} protocol, {'transfer from ' + src_info['stage'] if transfer else 'whitebox'}, cascade"
    with reporter.progress(f"evaluating ({what})", None) as advance:
        def step(info_):
            advance(1, info=f"{info_['attack'][0]} {info_['attack'][1]} eps={info_['eps']:.4g} "
                            f"images {info_['chunk'][0]}-{info_['chunk'][1]}")
        result = evaluate_protocol(model, images, labels, p, proxy=proxy, heldout=heldout,
                                   slope=cfg.get("slope") or 5.0, seed=cfg["seed"], batch_size=bs, cascade=cascade,
                                   store=store, advance=step, source=source, source_info=src_info)
    correct = result.pop("correct")
    result["correct"] = {"clean": encode_correct(correct["clean"]),
                         "worst": [encode_correct(w) for w in correct["worst"]],
                         "cumulative": [[encode_correct(w) for w in row] for row in correct["cumulative"]]}
    lib = None
    try:
        import torchattacks

        lib = torchattacks.__version__
    except ImportError:
        pass
    result.update(target=info, proxy=proxy_info, config=cfg, warnings=warnings, suite=None,
                  versions={**versions(), "torchattacks": lib},
                  # the evaluated images: results on the same ones pair (snnadv compare)
                  data={"dataset": info["dataset"], "images": tensor_hash(images), "labels": tensor_hash(labels),
                        "test_subset": cfg["test_subset"]})
    print_protocol(result, reporter)
    save_json_and_markdown(json_path, result, md_path, protocol_markdown(result), reporter)
    return result


def save_json_and_markdown(json_path: Path, data: dict, md_path: Path, markdown: str, reporter: Reporter) -> None:
    """Write a result's JSON and Markdown (rank 0 only under torchrun) and say where."""
    if parallel.world().main:
        write_json(json_path, data)
        atomic_write_text(md_path, markdown)
    reporter.print(f"[green]saved[/] {json_path} and {md_path}")


def _ci(d: dict) -> str:
    lo, hi = d["ci95"]
    spread = f"±{d['std']:.1f}" if d["std"] else ""
    return f"{d['mean']:.1f}{spread} [{lo:.1f}, {hi:.1f}]"


def protocol_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The protocol's table: one row per attack and estimator with its provenance; each
    cell the robust accuracy after that attack (the cascade's running worst case): mean
    over draws ± std [95 % Wilson interval], and the images attacked.  ``iterate``: the
    package's attacks' result (``last``; ``best, early exit``: :mod:`snnadv.attacks.pgd`),
    ``-`` for torchattacks' attacks."""
    header = ["protocol", "attack", "estimator", "steps", "restarts", "eot", "iterate", "draws"] + \
        [f"acc % eps={l} (attacked)" for l in result["eps_labels"]]
    P, K = result["protocol"], str(result["eval_draws"])
    rows = [[P, "clean", "-", "-", "-", "-", "-", K] + [_ci(result["clean"])] * len(result["eps"])]
    for r in result["rows"]:
        est = r["estimator"] + (f" (k={r['slope']:.3g})" if r.get("slope") else "")
        it = "-" if r.get("iterate") is None else r["iterate"] + (", early exit" if r.get("early_exit") else "")
        rows.append([P, r["label"], est, str(r["steps"]), str(r["restarts"]), str(r["eot"]), it, K]
                    + [f"{_ci(c['cumulative'])} ({c['attacked']})" for c in r["cells"]])
    rows.append([P, "WORST CASE", "per sample", "", "", "", "", K] + [_ci(w) for w in result["worst_case"]])
    return header, rows


COST_HEADER = ["attack", "estimator", "steps", "eot", "images attacked", "seconds", "s / 100 attacked",
               "s / 100 images"]


def cost_rows(result: dict) -> list[list[str]]:
    """The cost table's rows; ">=" where resumed pieces of unknown cost make it a lower bound."""
    def row(c):
        at_least = ">=" if c.get("untimed") else ""

        def f(v):
            return "-" if v is None else f"{at_least}{v:.2f}"

        return [c["attack"], c["estimator"], str(c["steps"]), str(c["eot"]), str(c["attacked"]), f(c["seconds"]),
                f(c["per_100_attacked"]), f(c["per_100_images"])]

    return [row(c) for c in result["cost"]]


def cost_title(result: dict) -> str:
    """``Cost (X s in all, ...)``: the whole protocol's cost, resumed pieces included
    (results written before ``cost_seconds``: this run's seconds)."""
    total = result.get("cost_seconds", result["seconds"])
    text = f"Cost ({'>=' if result.get('untimed_pieces') else ''}{total:.0f} s in all, evaluation draws " \
           f"{result['eval_seconds']:.0f} s"
    resumed = (result.get("pieces") or {}).get("resumed")
    if resumed:
        text += f"; this run {result['seconds']:.0f} s, {resumed} pieces resumed"
    if result.get("untimed_pieces"):
        text += f", {result['untimed_pieces']} of them saved without their time (>=: a lower bound)"
    return text + ")"


def _source_name(result: dict) -> str:
    """The source of a transfer run, e.g. "ann tiny (ann-s2.pt)"."""
    s = result.get("source") or {}
    return f"{s.get('stage', 'model')} {s.get('arch', '')} ({Path(str(s.get('path'))).name})".replace("  ", " ")


def _protocol_title(result: dict) -> str:
    mode = result.get("mode")
    if mode in ("cascade", "all"):  # a result written before transfer runs: "mode" was the cascade's
        how = mode
    else:
        how = "cascade" if result.get("cascade", True) else "all"
        how += f", transfer: crafted on {_source_name(result)}" if mode == "transfer" else ", whitebox"
    return (f"Robustness of {_who(result)}, protocol {result['protocol']} ({how}): accuracy %, "
            f"{result['images']} images, mean±std over {result['eval_draws']} encoder draw(s) [95% Wilson]")


def print_protocol(result: dict, reporter: Reporter) -> None:
    header, rows = protocol_rows(result)
    sh = result.get("sharpness")
    of = " (of the source)" if result.get("mode") == "transfer" else ""
    caption = (f"sharpness search{of}: {sh['path']} slope k = {sh['best']:.3g} on {sh['images']} held-out images"
               if sh else "")
    reporter.table(_protocol_title(result), header, rows, caption=caption)
    reporter.table(cost_title(result), COST_HEADER, cost_rows(result))


def protocol_markdown(result: dict) -> str:
    t = result.get("target") or {}
    header, rows = protocol_rows(result)
    ps = result["protocol_settings"]
    lines = [f"### {_protocol_title(result)}", ""]
    lines += [f"Protocol `{result['protocol']}`: {ps['description']}. Target `{t.get('path')}` "
              f"(sha256 `{str(t.get('sha256'))[:16]}`, T = {t.get('num_steps')}); estimators: "
              f"{', '.join(result['paths'])}; EOT {result['eot']}; seed {result['seed']}.", ""]
    if result.get("mode") == "transfer":
        src = result["source"]
        lines += [f"Transfer: every attack crafted on `{src['path']}` ({src['kind']} {src['arch']}, sha256 "
                  f"`{str(src['sha256'])[:16]}`, T = {src.get('num_steps')}) and scored on the target"
                  + (f"; left out: {'; '.join(result['skipped_attacks'])}" if result.get("skipped_attacks") else "")
                  + ".", ""]
    if result.get("sharpness"):
        sh = result["sharpness"]
        lines += [f"Sharpness search: {sh['path']} slope k = {sh['best']:.3g} ({sh['iters']} golden-section "
                  f"steps on {sh['images']} held-out training images).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"**{cost_title(result)}**", "", "| " + " | ".join(COST_HEADER) + " |",
              "|" + "---|" * len(COST_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in cost_rows(result)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- compare
def _read_result(name: str, path: str) -> dict:
    import json

    p = Path(path)
    if not p.is_file():
        raise SnnadvError(f"{name}: no result file {p}")
    try:
        r = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise SnnadvError(f"{name}: {p} is not a readable JSON result ({type(e).__name__})") from None
    if not isinstance(r, dict) or "protocol" not in r or "eps" not in r:
        raise SnnadvError(f"{name}: {p} is not a protocol result (write it with snnadv evaluate --protocol)")
    return r


@guarded
def run_compare(named: list[tuple[str, str]], reference: str | None = None, out: str | None = None,
                reporter: Reporter | None = None, overwrite: bool = False, outputs: Outputs | None = None) -> dict:
    """``snnadv compare NAME=RESULT.json ...``: protocol results of several models on the
    same images side by side (:func:`snnadv.comparison.compare_results`); prints the
    table and the verdicts, writes JSON and Markdown (``--out``)."""
    from .comparison import compare_results

    reporter = reporter or Reporter()
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise SnnadvError(f"model names must be distinct, got {', '.join(names)}")
    results = {n: _read_result(n, p) for n, p in named}
    cmp = compare_results(results, reference)
    cmp["files"] = {n: str(p) for n, p in named}
    header, rows = compare_rows(cmp)
    reporter.table(compare_title(cmp), header, rows,
                   caption="accuracy % (mean±spread over draws) [95 % Wilson]; Δ vs the reference and the stronger "
                           "protocol's cut: paired (exact McNemar on the per-image majority, bootstrap interval), "
                           "* = significant at 5 %")
    for v in cmp["verdicts"]:
        reporter.print(v)
    if out:
        json_path = Path(out) if Path(out).suffix == ".json" else Path(out) / "compare.json"
        md_path = json_path.with_suffix(".md")
        outputs.claim([json_path, md_path], {"overwrite": overwrite},
                      inputs={f"result {n}": p for n, p in named})
        save_json_and_markdown(json_path, cmp, md_path, compare_markdown(cmp), reporter)
    return cmp


def _delta(t: dict) -> str:
    lo, hi = t["ci95"]
    return f"{t['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]{'*' if t['significant'] else ''} p={t['p']:.2g}"


def compare_title(cmp: dict) -> str:
    modes = {m["mode"] for m in cmp["sources"].values()}
    kind = "Whitebox robustness" if modes == {"whitebox"} else "Robustness (" + ", ".join(
        f"{n}: {'crafted on ' + str(m['crafted_on']) if m['mode'] == 'transfer' else 'whitebox'}"
        for n, m in cmp["sources"].items()) + ")"
    return f"{kind} side by side on the same {cmp['images']} images (reference {cmp['reference']}): accuracy %"


def compare_rows(cmp: dict) -> tuple[list[str], list[list[str]]]:
    """One row per model and stage (clean, paper, the stronger protocol): accuracy with
    interval, the cut from paper to the stronger protocol, the difference to the reference."""
    header = ["model", "stage"]
    for lab in cmp["eps_labels"]:
        header += [f"acc eps={lab}", f"vs {cmp['reference']}", "stronger - paper"]
    rows = []
    for n in cmp["models"]:
        for s in cmp["stages"]:
            if s not in cmp["accuracy"][n]:
                continue
            row = [n, s]
            for j in range(len(cmp["eps"])):
                row.append(_ci(cmp["accuracy"][n][s][j]))
                vs = cmp["versus"].get(n, {}).get(s)
                row.append(_delta(vs[j]) if vs else "-")
                st = cmp["stronger"].get(n)
                row.append(_delta(st["test"][j]) if st and s == st["to"] else "-")
            rows.append(row)
    return header, rows


def compare_markdown(cmp: dict) -> str:
    header, rows = compare_rows(cmp)
    lines = [f"### {compare_title(cmp)}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Accuracy: mean±spread over encoder draws [95 % Wilson interval over images]. Differences: "
              "paired over the same images (exact McNemar on the per-image majority vote; 95 % paired bootstrap "
              "interval); * = significant at 5 %.", ""]
    lines += [f"- {v}" for v in cmp["verdicts"]]
    lines += ["", "Results: " + ", ".join(f"{n} `{p}`" for n, p in cmp["files"].items()), ""]
    return "\n".join(lines)
