"""``snnadv reproduce``: the whole paper pipeline as one resumable command.

Stages, in order (each one a call into the library):

    ann, ann_ii            two ANNs (seeds[0] = the target set "I", seeds[1] = the
                           independent blackbox source set "II")
    conv, conv_ii          threshold-balanced SNN-conv of each
    bp, bp_ii              SNN-BP fine-tuned from each
    table                  paper Tables 1 and 2
    <analyses>             the configured figures (Fig. 2, 6b, 6a, 3, 4)
    evaluate               the adaptive evaluation suite on SNN-BP (if configured); with
                           ``[evaluate] protocol``: Table 1 under that protocol instead,
                           evaluate-<target> (whitebox), evaluate-<target>-from-<source>
                           (blackbox, sources ``[reproduce] evaluate_sources``) and
                           evaluate-compare (:func:`protocol_stages`)
    report                 one Markdown report of everything

Resumable and idempotent.  A stage's settings, and the keys of the stages it
reads from, give it a *key* (the ``--device`` string is not part of it: the
hardware a stage ran on is recorded beside).  When a stage completes,
``RUN_DIR/stages/NAME.json`` records its key, its outputs with their sha256, and
the sha256 of the upstream outputs it read.  A stage is *done* only if its record
has the current key, its outputs exist with the recorded sha256 (a truncated or
edited checkpoint is not done), the upstream outputs it read are still the current
ones, and no upstream stage ran again in this run; anything else re-runs that stage
and everything downstream of it, nothing else.  ``reproduce.json`` says
``complete: true`` only when every stage is done in that sense (also after
``--only`` / ``--from`` / ``--max-stages``).

The run directory is reproduce's own: it is locked for the whole run (a second
``reproduce`` in it stops with one line naming the first), nothing in it is ever
deleted, and a stage that re-runs replaces its old output only once it has a
complete replacement (:mod:`snnadv.outputs`).  A training stage interrupted midway
resumes from its last completed epoch (its checkpoint carries the key it was
started with; a checkpoint started under other settings is replaced by the new
run's first epoch).  ``--only`` / ``--from`` run part of the chain; ``--max-stages
N`` stops after N stages ran (a long paper-scale run can proceed in pieces).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import VOLATILE, parse_list, read_config, resolve, setting, settings_key
from .errors import CheckpointError, SnnadvError
from .outputs import Outputs, remove_orphans, write_json
from .parallel import barrier, broadcast_object, solo, world
from .report import Reporter


@dataclass
class Stage:
    name: str
    kind: str                      # the config table it reads (train-ann, convert, ...)
    needs: list[str]               # upstream stages
    run: Callable[[dict, "Context"], dict]
    overrides: Callable[["Context"], dict] = field(default=lambda ctx: {})


@dataclass
class Context:
    run_dir: Path
    config: dict
    reporter: Reporter
    seeds: list[int]
    records: dict = field(default_factory=dict)
    known_sha256: dict = field(default_factory=dict)  # path -> sha256 a stage already computed

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def output(self, stage: str, key: str = "checkpoint") -> str:
        return self.records[stage]["outputs"][key]


#: what earlier versions left out of a stage's key: ``download`` and ``force`` were in
#: it, and before that the ``--device`` string (the resolved hardware is recorded beside)
LEGACY_VOLATILE = VOLATILE - {"download", "force"}


def _keys(settings: dict, upstream: list[str]) -> list[str]:
    """The stage's key (:func:`snnadv.config.settings_key`), then the keys earlier versions
    gave it, so that records of those runs stay valid."""
    legacy = [settings_key(settings, upstream, volatile=LEGACY_VOLATILE)]
    legacy += [settings_key({**settings, "device": d}, upstream, volatile=LEGACY_VOLATILE - {"device"})
               for d in dict.fromkeys([settings.get("device", "auto"), "auto", "cpu", "cuda"]) if d is not None]
    return list(dict.fromkeys([settings_key(settings, upstream), *legacy]))


def _hashes(outputs: dict, known: dict | None = None) -> dict:
    """sha256 of every output that is a file (a folder output only has to exist)."""
    from .checkpoint import file_hash  # (imports torch: only when a file changed or a stage ran)

    return {k: (known or {}).get(p) or file_hash(p) for k, p in outputs.items() if Path(p).is_file()}


def _stats(outputs: dict) -> dict:
    """(size, mtime) of every output file: while they are unchanged the sha256 is not re-read."""
    return {k: [Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for k, p in outputs.items() if Path(p).is_file()}


def _intact(rec: dict) -> bool:
    """The record's outputs exist and have the sha256 recorded when the stage finished
    (re-hashed only when a file's size or modification time changed)."""
    if not all(Path(p).exists() for p in rec["outputs"].values()):
        return False
    if "sha256" not in rec:  # a record of an earlier version
        return True
    stats = _stats(rec["outputs"])
    return stats == rec.get("stat") or _hashes(rec["outputs"]) == rec["sha256"]


def _valid(rec: dict | None, keys: list[str], upstream: dict) -> bool:
    """``rec`` is a finished stage with one of ``keys``, its outputs intact, its inputs current."""
    if rec is None or rec.get("key") not in keys or not _intact(rec):
        return False
    return "inputs" not in rec or rec["inputs"] == {u: r.get("sha256") for u, r in upstream.items()}


def _hardware(cfg: dict) -> str | None:
    if not cfg.get("device"):
        return None
    import torch

    from .config import resolve_device

    dev = resolve_device(cfg["device"])
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


# ----------------------------------------------------------------------- stage bodies
def _model_stage(kind: str):
    """A stage that writes a checkpoint (train-ann, convert, finetune) and its JSON."""
    def run(cfg: dict, ctx: Context) -> dict:
        from .convert import convert
        from .train import finetune, train_ann

        r = {"train-ann": train_ann, "convert": convert, "finetune": finetune}[kind](cfg, ctx.reporter)
        if "sha256" in r:  # (rank 0's result under torchrun)
            ctx.known_sha256[r["checkpoint"]] = r["sha256"]  # not read again to record it
        return {"checkpoint": r["checkpoint"], "metrics": str(Path(r["checkpoint"]).with_suffix(".json"))}
    return run


def _table(cfg: dict, ctx: Context) -> dict:
    from .robustness import run_table

    run_table(cfg, ctx.reporter)
    return {"json": str(Path(cfg["out"]) / "tables.json"), "markdown": str(Path(cfg["out"]) / "tables.md")}


def _report(cfg: dict, ctx: Context) -> dict:
    from .analysis import build_report

    # Table 1 under a protocol (evaluate-compare): its names hold no "evaluate", so given explicitly
    tables = [p for k, p in ctx.records.get("evaluate-compare", {}).get("outputs", {}).items()
              if k.endswith("-markdown")]
    return {"markdown": str(build_report(ctx.run_dir, reporter=ctx.reporter, include=tables))}


def _analysis(name: str):
    def run(cfg: dict, ctx: Context) -> dict:
        from .analysis import ANALYZE

        ANALYZE[name](cfg, ctx.reporter)
        return {"dir": cfg["out"]}
    return run


#: the analyses reproduce can run, with the stages whose checkpoints they read
ANALYSES = {
    "eq7": ([], lambda c: {}),
    "encoder": ([], lambda c: {}),
    "perturbation": (["ann"], lambda c: {"checkpoint": c.output("ann")}),
    "timesteps": (["conv", "ann_ii"], lambda c: {"checkpoint": c.output("conv"), "source_ckpt": c.output("ann_ii")}),
    "leak": (["conv", "ann_ii"], lambda c: {"checkpoint": c.output("conv"), "source_ckpt": c.output("ann_ii")}),
}


def stages(ctx: Context) -> list[Stage]:
    """The pipeline for this config (analyses and evaluation as configured)."""
    s0, s1 = ctx.seeds
    ck = lambda name: str(ctx.path("models", f"{name}.pt"))
    out: list[Stage] = []
    for suffix, seed in (("", s0), ("_ii", s1)):
        out += [
            Stage(f"ann{suffix}", "train-ann", [], _model_stage("train-ann"),
                  lambda c, n=f"ann{suffix}", sd=seed: {"seed": sd, "out": ck(n)}),
            Stage(f"conv{suffix}", "convert", [f"ann{suffix}"], _model_stage("convert"),
                  lambda c, n=f"conv{suffix}", u=f"ann{suffix}", sd=seed:
                  {"seed": sd, "out": ck(n), "checkpoint": c.output(u)}),
            Stage(f"bp{suffix}", "finetune", [f"conv{suffix}"], _model_stage("finetune"),
                  lambda c, n=f"bp{suffix}", u=f"conv{suffix}", sd=seed:
                  {"seed": sd, "out": ck(n), "checkpoint": c.output(u)}),
        ]
    models = ["ann", "conv", "bp", "ann_ii", "conv_ii", "bp_ii"]
    keys = {"ann": "ann", "conv": "snn_conv", "bp": "snn_bp", "ann_ii": "ann_ii", "conv_ii": "snn_conv_ii",
            "bp_ii": "snn_bp_ii"}
    out.append(Stage("table", "table", models, _table,
                     lambda c: {"out": str(c.path("tables")), **{keys[m]: c.output(m) for m in models}}))
    out += _optional_stages(ctx)
    out.append(Stage("report", "report", [s.name for s in out], _report, lambda c: {}))
    return out


def _optional_stages(ctx: Context) -> list[Stage]:
    """Analyses (settings from the config's [analyze]) and the adaptive evaluation."""
    rcfg = ctx.config.get("reproduce", {})
    extra: list[Stage] = []
    for name in parse_list(rcfg.get("analyses", [])):
        if name not in ANALYSES:
            raise SnnadvError(f"unknown analysis '{name}' in [reproduce] (choose {', '.join(ANALYSES)})")
        needs, inputs = ANALYSES[name]
        extra.append(Stage(f"analyze-{name}", "analyze", needs, _analysis(name),
                           lambda c, n=name, f=inputs: {"out": str(c.path("analysis", n)), **f(c)}))
    sources = parse_list(rcfg.get("evaluate_sources", list(EVALUATE_SOURCES)))
    unknown = [n for n in sources if n not in EVALUATE_SOURCES]
    if unknown:
        raise SnnadvError(f"unknown source '{unknown[0]}' in [reproduce] evaluate_sources "
                          f"(choose from {', '.join(EVALUATE_SOURCES)}; an empty list = whitebox only)")
    if rcfg.get("evaluate", False):
        if resolve("evaluate", ctx.config).get("protocol"):
            extra += protocol_stages(ctx, list(dict.fromkeys(sources)))
        else:  # the suite on SNN-BP (as before: its key and output unchanged)
            extra.append(Stage("evaluate", "evaluate", ["bp"], _evaluate,
                               lambda c: {"target_ckpt": c.output("bp"), "out": str(c.path("evaluate"))}))
    return extra


def _evaluate(cfg: dict, ctx: Context) -> dict:
    from .adaptive import run_evaluate

    run_evaluate(cfg, ctx.reporter)
    return {"dir": cfg["out"]}


# ------------------------------------------------------- Table 1 under a protocol
#: the seed-I targets of Table 1 (stage -> the name in the comparison tables)
EVALUATE_TARGETS = {"ann": "ANN", "conv": "SNN-conv", "bp": "SNN-BP"}
#: the seed-II models the blackbox rows may be crafted on ([reproduce] evaluate_sources)
EVALUATE_SOURCES = ("ann_ii", "conv_ii", "bp_ii")


def _timesteps(ctx: Context, target: str) -> dict:
    """The T a target is evaluated at: SNN-conv at ``[table] conv_timesteps`` and SNN-BP at
    ``[table] bp_timesteps`` when set, as :func:`snnadv.robustness.run_table` loads them
    (``steps_for``: the table stage resolves those from [common] < [table]); None (not
    given: ``[evaluate] timesteps`` or the checkpoint's own T applies) otherwise.  Sources
    likewise (:func:`_source_timesteps`)."""
    key = {"conv": "conv_timesteps", "bp": "bp_timesteps"}.get(target)
    return {"timesteps": resolve("table", ctx.config).get(key)} if key else {}


def _source_timesteps(ctx: Context, source: str) -> dict:
    """A seed-II source at the T of its seed-I twin (:func:`_timesteps`), as the table
    crafts on conv_ii / bp_ii at conv_timesteps / bp_timesteps."""
    t = _timesteps(ctx, source.removesuffix("_ii")).get("timesteps")
    return {"source_timesteps": t} if t is not None else {}


def protocol_stages(ctx: Context, sources: list[str]) -> list[Stage]:
    """``[reproduce] evaluate = true`` with ``[evaluate] protocol``: the paper's Table 1 under
    that protocol.  ``evaluate-<target>`` (whitebox, each seed-I model), then
    ``evaluate-<target>-from-<source>`` (crafted on each of ``sources``, scored on each
    target), each :func:`snnadv.adaptive.run_protocol` writing ``evaluate/<name>.json``
    (its pieces in ``evaluate/<name>-pieces/``: a stage stopped part-way resumes there),
    then ``evaluate-compare``: the side-by-side tables (``evaluate/table1-*.json/.md``)."""
    out: list[Stage] = []
    folder = lambda c: c.path("evaluate")
    for t in EVALUATE_TARGETS:
        out.append(Stage(f"evaluate-{t}", "evaluate", [t], _protocol_stage,
                         lambda c, t=t: {"target_ckpt": c.output(t), **_timesteps(c, t),
                                         "out": str(folder(c) / f"{t}.json")}))
    for src in sources:
        for t in EVALUATE_TARGETS:
            out.append(Stage(f"evaluate-{t}-from-{src}", "evaluate", [t, src], _protocol_stage,
                             lambda c, t=t, s=src: {"target_ckpt": c.output(t), "source_ckpt": c.output(s),
                                                    **_timesteps(c, t), **_source_timesteps(c, s),
                                                    "out": str(folder(c) / f"{t}-from-{s}.json")}))
    sets = {"whitebox": {t: f"{t}.json" for t in EVALUATE_TARGETS}}
    sets.update({f"from-{s}": {t: f"{t}-from-{s}.json" for t in EVALUATE_TARGETS} for s in sources})
    out.append(Stage("evaluate-compare", "evaluate", [s.name for s in out], _compare_stage(sets),
                     lambda c: {"out": str(folder(c))}))
    return out


def _protocol_stage(cfg: dict, ctx: Context) -> dict:
    from .adaptive import output_paths, run_protocol

    run_protocol(cfg, ctx.reporter)
    json_path, md_path, _ = output_paths(cfg["out"], {})
    return {"json": str(json_path), "markdown": str(md_path)}


def _compare_stage(sets: dict):
    """One comparison per set (``table1-<set>.json/.md``): ANN, SNN-conv and SNN-BP on the
    same images, ANN the reference (the paper's Table 1 reads each SNN against the ANN)."""
    def run(cfg: dict, ctx: Context) -> dict:
        from .adaptive import run_compare

        folder, outputs = Path(cfg["out"]), {}
        for name, files in sets.items():
            named = [(EVALUATE_TARGETS[t], str(folder / f)) for t, f in files.items()]
            path = folder / f"table1-{name}.json"
            run_compare(named, reference="ANN", out=str(path), reporter=ctx.reporter, overwrite=True)
            outputs[f"{name}-json"], outputs[f"{name}-markdown"] = str(path), str(path.with_suffix(".md"))
        return outputs
    return run


# ----------------------------------------------------------------------- the runner
def reproduce(config_path: str | Path, run_dir: str | Path | None = None, only: list[str] | None = None,
              start: str | None = None, max_stages: int | None = None, quiet: bool = False,
              flags: dict | None = None, spread: bool = False) -> dict:
    """Run (or resume) the pipeline; returns ``{stage: record}`` of the stages that are done.

    ``flags`` override every stage's settings (the command line's --data-dir, --device,
    --batch-size, ...); ``flags["seed"]`` is the pair of seeds ("A,B" or a list).

    Under torchrun every stage runs on all the ranks together (training in DDP, the
    test images shared out) and rank 0 writes the records; with ``spread`` (2+ ranks)
    the chains of the two seeds (ann, conv, bp and ann_ii, conv_ii, bp_ii) first run
    at the same time as independent single-process jobs on ranks 0 and 1
    (:func:`snnadv.parallel.solo`), then the rest on every rank.
    """
    config = read_config(config_path)
    rcfg = config.get("reproduce", {})
    run_dir = Path(run_dir or rcfg.get("run_dir") or f"runs/{Path(config_path).stem}")
    reporter = Reporter(quiet=quiet)
    flags = dict(flags or {})
    seeds = list(setting("reproduce", "seeds").check("--seed", flags.pop("seed")) if "seed" in flags
                 else rcfg.get("seeds", [0, 1]))
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise SnnadvError(f"[reproduce] seeds must be two different seeds, got {seeds}")
    ctx = Context(run_dir, config, reporter, seeds)
    plan = stages(ctx)
    names = [s.name for s in plan]
    for n in (only or []) + ([start] if start else []):
        if n not in names:
            raise SnnadvError(f"unknown stage '{n}' (stages: {', '.join(names)})")
    selected = set(names)
    if start:
        selected = set(names[names.index(start):])
    if only:
        selected = set(only)
    with Outputs(note=reporter.print) as outputs:
        outputs.claim([run_dir], {"config": str(config_path)}, folder=True, replace=[])
        w = world()
        if w.main:
            remove_orphans(run_dir, recursive=True)
        if spread and w.size >= 2:
            chains = [["ann", "conv", "bp"], ["ann_ii", "conv_ii", "bp_ii"]]
            if w.rank < 2:
                with solo():  # this rank's seed alone; its records are its own files
                    _run(ctx, plan, selected & set(chains[w.rank]), max_stages, quiet, flags, config_path,
                         summary_file=False)
            barrier()  # (waits up to SNNADV_DIST_TIMEOUT for the other chain)
            ctx.records.clear()
        return _run(ctx, plan, selected, max_stages, quiet, flags, config_path)


def _run(ctx: Context, plan: list[Stage], selected: set, max_stages: int | None, quiet: bool, flags: dict | None,
         config_path, summary_file: bool = True) -> dict:
    """The stages in order (each done one skipped); under torchrun rank 0 decides how a
    stage resumes and writes its record, which every rank then reads from it."""
    run_dir, reporter, names = ctx.run_dir, ctx.reporter, [s.name for s in plan]
    main = world().main
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    for s in plan:  # earlier records (needed to wire the outputs of skipped stages)
        rec = run_dir / "stages" / f"{s.name}.json"
        if rec.exists():
            ctx.records[s.name] = json.loads(rec.read_text())
    ran, t_start = 0, time.perf_counter()
    current: dict[str, bool] = {}  # stage -> its record is valid for this config and these inputs
    rerun: set[str] = set()        # stages that ran in this call (what depends on them re-runs)
    stopped = False
    reporter.print(f"[bold]reproduce[/] {config_path} -> {run_dir} ({len(plan)} stages)")
    for i, s in enumerate(plan, 1):
        current[s.name] = False
        missing = [u for u in s.needs if u not in ctx.records]
        if missing:
            if s.name in selected and not stopped:
                raise SnnadvError(f"stage '{s.name}' needs {', '.join(missing)} first (run without --only)")
            continue
        overrides = s.overrides(ctx)
        cfg = resolve(s.kind, ctx.config, {**(flags or {}), **overrides, "quiet": quiet}) if s.kind != "report" else {}
        keys = _keys(cfg, [ctx.records[u]["key"] for u in s.needs])
        done = (all(current[u] for u in s.needs) and not rerun.intersection(s.needs)
                and _valid(ctx.records.get(s.name), keys, {u: ctx.records[u] for u in s.needs}))
        current[s.name] = done
        if stopped:
            continue
        if done or s.name not in selected:
            reporter.print(f"[dim][{i}/{len(plan)}] {s.name}: {'done' if done else 'not selected'}[/]")
            continue
        stale = [u for u in s.needs if not current[u]]
        if stale:
            raise SnnadvError(f"stage '{s.name}' needs {', '.join(stale)} first: its output is missing, changed or "
                              f"made with other settings (run without --only/--from)")
        if max_stages is not None and ran >= max_stages:
            reporter.print(f"stopping after {ran} stage(s) (--max-stages); run again to continue")
            stopped = True
            continue
        cfg.update(broadcast_object(_prepare_resume(s, cfg, keys, run_dir) if main else None))
        elapsed = time.perf_counter() - t_start
        eta = f", ~{elapsed / ran * (len(plan) - i + 1) / 60:.1f} min left at this pace" if ran else ""
        reporter.print(f"[bold cyan][{i}/{len(plan)}] {s.name}[/] ({s.kind}){eta}")
        t0 = time.perf_counter()
        outputs = s.run(cfg, ctx) if main or s.kind != "report" else {}  # (the report only writes)
        record = None
        if main:
            record = {"stage": s.name, "key": keys[0], "outputs": outputs, "seconds": time.perf_counter() - t0,
                      "needs": s.needs, "sha256": _hashes(outputs, ctx.known_sha256), "stat": _stats(outputs),
                      "inputs": {u: ctx.records[u].get("sha256") for u in s.needs}, "hardware": _hardware(cfg)}
            write_json(run_dir / "stages" / f"{s.name}.json", record)
            (run_dir / "stages" / f"{s.name}.started").unlink(missing_ok=True)
        record = broadcast_object(record)  # (also: every rank waits until rank 0 has written)
        ctx.records[s.name] = record
        current[s.name] = True
        rerun.add(s.name)
        ran += 1
    summary = {n: ctx.records[n] for n in names if current[n]}
    if not summary_file:
        return summary
    if main:
        write_json(run_dir / "reproduce.json", {"config": str(config_path), "run_dir": str(run_dir),
                                                "stages": summary, "complete": len(summary) == len(plan)})
    reporter.print(f"results in {run_dir} ({len(summary)}/{len(plan)} stages done)"
                   + (f"; report: {summary['report']['outputs']['markdown']}" if "report" in summary else ""))
    return summary


def _prepare_resume(stage: Stage, cfg: dict, keys: list[str], run_dir: Path) -> dict:
    """Resume an interrupted training stage if it was started with the same key (``keys``:
    the current one, then those of earlier versions) and its checkpoint is readable;
    otherwise the stage starts afresh and its new output replaces the old one once
    complete (a training run: after its first epoch).  Returns the setting to add to
    the stage's ``cfg`` (``resume`` or ``overwrite``) and marks the stage started."""
    from .train import partial_path

    marker = run_dir / "stages" / f"{stage.name}.started"
    out = Path(cfg["out"]) if cfg.get("out") else None
    same = marker.exists() and marker.read_text().strip() in keys
    if stage.kind in ("train-ann", "finetune") and out is not None and same and (
            (out.exists() and _resumable(out)) or _resumable(partial_path(out))):
        decision = {"resume": True}
    else:
        decision = {"overwrite": True}
    marker.write_text(keys[0])
    return decision


def _resumable(path: Path) -> bool:
    from .checkpoint import load_checkpoint

    if not path.exists():
        return False
    try:
        return load_checkpoint(path).get("train_state") is not None
    except CheckpointError:
        return False
