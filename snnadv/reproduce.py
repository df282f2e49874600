"""``snnadv reproduce``: the whole paper pipeline as one resumable command.

Stages, in order (each one a call into the library):

    ann, ann_ii            two ANNs (seeds[0] = the target set "I", seeds[1] = the
                           independent blackbox source set "II")
    conv, conv_ii          threshold-balanced SNN-conv of each
    bp, bp_ii              SNN-BP fine-tuned from each
    table                  paper Tables 1 and 2
    <analyses>             the configured figures (Fig. 2, 6b, 6a, 3, 4)
    evaluate               the adaptive evaluation suite (if configured)
    report                 one Markdown report of everything

Resumable and idempotent.  A stage's settings, and the hashes of the stages it
reads from, give it a *key*.  When a stage completes, ``RUN_DIR/stages/NAME.json``
records its key and outputs; a later run skips every stage whose record has the
same key and whose outputs exist, so a changed setting re-runs that stage and
everything downstream of it, nothing else.  A training stage interrupted midway
resumes from its last completed epoch (its checkpoint carries the key it was
started with; a checkpoint started under other settings is discarded).
``--only`` / ``--from`` run part of the chain; ``--max-stages N`` stops after N
stages ran (a long paper-scale run can proceed in pieces).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import keyed, read_config, resolve
from .errors import SnnadvError
from .report import Reporter, write_json


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

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def output(self, stage: str, key: str = "checkpoint") -> str:
        return self.records[stage]["outputs"][key]


def _key(settings: dict, upstream: list[str]) -> str:
    volatile = {"quiet", "out", "config", "resume", "stage"}
    blob = json.dumps({k: v for k, v in sorted(keyed(settings).items()) if k not in volatile}, sort_keys=True,
                      default=str) + "|" + "|".join(upstream)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------- stage bodies
def _model_stage(kind: str):
    """A stage that writes a checkpoint (train-ann, convert, finetune) and its JSON."""
    def run(cfg: dict, ctx: Context) -> dict:
        from .convert import convert
        from .train import finetune, train_ann

        r = {"train-ann": train_ann, "convert": convert, "finetune": finetune}[kind](cfg, ctx.reporter)
        return {"checkpoint": r["checkpoint"], "metrics": str(Path(r["checkpoint"]).with_suffix(".json"))}
    return run


def _table(cfg: dict, ctx: Context) -> dict:
    from .robustness import run_table

    run_table(cfg, ctx.reporter)
    return {"json": str(Path(cfg["out"]) / "tables.json"), "markdown": str(Path(cfg["out"]) / "tables.md")}


def _report(cfg: dict, ctx: Context) -> dict:
    from .analysis import build_report

    return {"markdown": str(build_report(ctx.run_dir, reporter=ctx.reporter))}


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
    for name in rcfg.get("analyses", []):
        if name not in ANALYSES:
            raise SnnadvError(f"unknown analysis '{name}' in [reproduce] (choose {', '.join(ANALYSES)})")
        needs, inputs = ANALYSES[name]
        extra.append(Stage(f"analyze-{name}", "analyze", needs, _analysis(name),
                           lambda c, n=name, f=inputs: {"out": str(c.path("analysis", n)), **f(c)}))
    if rcfg.get("evaluate", False):
        extra.append(Stage("evaluate", "evaluate", ["bp"], _evaluate,
                           lambda c: {"target_ckpt": c.output("bp"), "out": str(c.path("evaluate"))}))
    return extra


def _evaluate(cfg: dict, ctx: Context) -> dict:
    from .adaptive import run_evaluate

    run_evaluate(cfg, ctx.reporter)
    return {"dir": cfg["out"]}


# ----------------------------------------------------------------------- the runner
def reproduce(config_path: str | Path, run_dir: str | Path | None = None, only: list[str] | None = None,
              start: str | None = None, max_stages: int | None = None, quiet: bool = False,
              flags: dict | None = None) -> dict:
    """Run (or resume) the pipeline; returns ``{stage: record}`` of the stages that are done."""
    config = read_config(config_path)
    rcfg = config.get("reproduce", {})
    run_dir = Path(run_dir or rcfg.get("run_dir") or f"runs/{Path(config_path).stem}")
    reporter = Reporter(quiet=quiet)
    seeds = list(rcfg.get("seeds", [0, 1]))
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
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    for s in plan:  # earlier records (needed to wire the outputs of skipped stages)
        rec = run_dir / "stages" / f"{s.name}.json"
        if rec.exists():
            ctx.records[s.name] = json.loads(rec.read_text())
    ran, t_start = 0, time.perf_counter()
    reporter.print(f"[bold]reproduce[/] {config_path} -> {run_dir} ({len(plan)} stages)")
    for i, s in enumerate(plan, 1):
        missing = [u for u in s.needs if u not in ctx.records]
        if missing:
            if s.name in selected:
                raise SnnadvError(f"stage '{s.name}' needs {', '.join(missing)} first (run without --only)")
            continue
        overrides = s.overrides(ctx)
        cfg = resolve(s.kind, config, {**(flags or {}), **overrides, "quiet": quiet}) if s.kind != "report" else {}
        key = _key(cfg, [ctx.records[u]["key"] for u in s.needs])
        rec = ctx.records.get(s.name)
        done = rec is not None and rec["key"] == key and all(Path(p).exists() for p in rec["outputs"].values())
        if done or s.name not in selected:
            reporter.print(f"[dim][{i}/{len(plan)}] {s.name}: {'done' if done else 'not selected'}[/]")
            continue
        if max_stages is not None and ran >= max_stages:
            reporter.print(f"stopping after {ran} stage(s) (--max-stages); run again to continue")
            break
        _prepare_resume(s, cfg, key, run_dir)
        elapsed = time.perf_counter() - t_start
        eta = f", ~{elapsed / ran * (len(plan) - i + 1) / 60:.1f} min left at this pace" if ran else ""
        reporter.print(f"[bold cyan][{i}/{len(plan)}] {s.name}[/] ({s.kind}){eta}")
        t0 = time.perf_counter()
        outputs = s.run(cfg, ctx)
        record = {"stage": s.name, "key": key, "outputs": outputs, "seconds": time.perf_counter() - t0,
                  "needs": s.needs}
        write_json(run_dir / "stages" / f"{s.name}.json", record)
        ctx.records[s.name] = record
        (run_dir / "stages" / f"{s.name}.started").unlink(missing_ok=True)
        ran += 1
    summary = {n: ctx.records[n] for n in names if n in ctx.records}
    write_json(run_dir / "reproduce.json", {"config": str(config_path), "run_dir": str(run_dir),
                                            "stages": summary, "complete": len(summary) == len(plan)})
    reporter.print(f"results in {run_dir} ({len(summary)}/{len(plan)} stages done)"
                   + (f"; report: {summary['report']['outputs']['markdown']}" if "report" in summary else ""))
    return summary


def _prepare_resume(stage: Stage, cfg: dict, key: str, run_dir: Path) -> None:
    """Resume an interrupted training stage if it was started with the same key."""
    marker = run_dir / "stages" / f"{stage.name}.started"
    out = Path(cfg["out"]) if cfg.get("out") else None
    if stage.kind in ("train-ann", "finetune") and out is not None:
        same = marker.exists() and marker.read_text().strip() == key
        if out.exists() and same:
            cfg["resume"] = True
        elif out.exists():
            out.unlink()  # a checkpoint of other settings: start afresh
    marker.write_text(key)
