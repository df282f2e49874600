"""``snnadv report RUN_DIR``: one Markdown report from the results in a run directory.

Walks ``RUN_DIR`` (recursively) for the JSON that snnadv stages write and renders
each kind it knows:

* analyses (``snnadv analyze ...``: JSON with an ``analysis`` key): title, figure,
  tables, theory checks, notes, settings and input checkpoint hashes;
* pipeline stages (``train-ann``, ``convert``, ``finetune`` metrics: ``stage`` +
  ``metrics``): one summary table (accuracy, epochs, checkpoint hash, parent);
* attack results (``snnadv attack``): one table of clean / adversarial accuracy;
* paper tables (``tables.json``; the ``tables.md`` beside it when present), then the
  paper's own Tables 1 and 2 beside ours cell by cell and one line per claim of the
  paper saying whether it holds on our models (:mod:`snnadv.paper`);
* an ``evaluate`` section for every ``*evaluate*.md`` file (included as is);
* every other JSON is listed with its top-level keys, so nothing is silently lost;
* PNG figures not shown by a section above are listed at the end.

The per-setting files of a sweep (``<run>/settings/``, ``<run>/parents/``) are
summarised by their sweep's own JSON and not listed again.  Images and files are
linked relative to the report, so the report directory can be shared as is.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from .. import __version__
from ..errors import SnnadvError
from ..report import Reporter
from ..outputs import atomic_write_text
from .common import ANALYSES

INTERNAL_DIRS = ("settings", "parents")


def _esc(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "–"
        if v == 0:
            return "0"
        a = abs(v)
        return f"{v:.2f}" if 1 <= a < 1e5 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        items = [fmt(x) for x in v]
        if len(items) > 12:
            items = items[:5] + ["…"] + items[-2:] + [f"({len(v)} values)"]
        return "[" + ", ".join(items) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def md_table(columns: list, rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(_esc(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_esc(fmt(c)) for c in r) + " |" for r in rows]
    return lines + [""]


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _settings_lines(settings: dict) -> list[str]:
    items = [f"`{k}` = {fmt(v)}" for k, v in sorted(settings.items()) if v is not None and k != "eval"]
    return ["<details><summary>Settings</summary>", "", "; ".join(items), "", "</details>", ""] if items else []


def _inputs_lines(inputs: dict) -> list[str]:
    lines = []
    for role, info in (inputs or {}).items():
        if isinstance(info, dict) and info.get("sha256"):
            extra = ", ".join(f"{k} {info[k]}" for k in ("stage", "arch", "dataset") if info.get(k))
            lines.append(f"- {role}: `{info.get('path')}` ({extra}); sha256 `{info['sha256']}`")
    return (["Input checkpoints:", ""] + lines + [""]) if lines else []


# --------------------------------------------------------------------------- sections
def _analysis_section(path: Path, d: dict, base: Path, shown: set) -> list[str]:
    name = d["analysis"]
    lines = [f"## {d.get('title') or name}", "", f"Analysis `{name}` (`snnadv analyze {name}`), "
             f"result `{_rel(path, base)}`" + (f", data `{_rel(path.parent / d['csv'], base)}`" if d.get("csv") else "")
             + ".", ""]
    if d.get("figure"):
        png = path.parent / d["figure"]
        shown.add(png.resolve())
        lines += [f"![{name}]({_rel(png, base)})", ""]
    for note in d.get("notes") or []:
        lines += [note, ""]
    if "computed" in d:
        lines += [f"Settings computed in the last run: {d['computed']}; "
                  f"re-used from earlier runs: {d.get('reused', 0)}.", ""]
    for t in d.get("tables") or []:
        lines += [f"**{t.get('title', '')}**", ""] + md_table(t["columns"], t["rows"])
    if d.get("checks"):
        lines += ["Checks against theory:", ""]
        lines += [f"- {k}: {fmt(v)}" for k, v in d["checks"].items()] + [""]
    lines += _inputs_lines(d.get("inputs") or {})
    lines += _settings_lines(d.get("settings") or {})
    if d.get("versions"):
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()), ""]
    return lines


def _stage_section(items: list[tuple[Path, dict]], base: Path) -> list[str]:
    rows = []
    for path, d in items:
        m = d.get("metrics") or {}
        cfg = d.get("config") or {}
        parent = d.get("parent") or {}
        rows.append([_rel(path, base), d.get("stage"), cfg.get("arch"),
                     cfg.get("dataset"), m.get("test_acc"), m.get("epochs"),
                     fmt(m.get("curve")) if m.get("curve") else None,
                     f"`{d['sha256'][:16]}…`" if d.get("sha256") else None,
                     f"`{parent['sha256'][:16]}…`" if parent.get("sha256") else None])
    lines = ["## Pipeline stages (train-ann, convert, finetune)", ""]
    lines += md_table(["result", "stage", "arch", "dataset", "test acc %", "epochs", "accuracy vs T",
                       "checkpoint sha256", "parent sha256"], rows)
    for path, d in items:
        if d.get("checkpoint") and d.get("sha256"):
            lines.append(f"- `{d['checkpoint']}`: sha256 `{d['sha256']}`")
    return lines + [""]


def _acc(d: dict):
    """An accuracy with its interval (and spread over draws) when the result has them."""
    from ..robustness import cell_text

    return cell_text(d) if "mean" in d else None


def _attack_section(items: list[tuple[Path, dict]], base: Path) -> list[str]:
    rows = []
    for path, d in items:
        s, t = d.get("source") or {}, d.get("target") or {}
        ca, aa = d.get("clean_acc") or {}, d.get("adv_acc") or {}
        rows.append([_rel(path, base), d.get("mode"), str(d.get("attack", "")).upper(), d.get("eps"),
                     f"{s.get('stage')} `{Path(str(s.get('path'))).name}`",
                     f"{t.get('stage')} `{Path(str(t.get('path'))).name}`",
                     d.get("gradient"), _acc(ca), _acc(aa), d.get("images"), d.get("eval_draws")])
    lines = ["## Attacks (snnadv attack)", ""]
    lines += md_table(["result", "mode", "attack", "eps", "source", "target", "gradient", "clean % [95 % CI]",
                       "adversarial % [95 % CI]", "images", "draws"], rows)
    for path, d in items:
        for role in ("source", "target"):
            info = d.get(role) or {}
            if info.get("sha256"):
                lines.append(f"- {_rel(path, base)} {role}: `{info.get('path')}` sha256 `{info['sha256']}`")
    return lines + [""]


def _tables_section(path: Path, d: dict, base: Path) -> list[str]:
    md = path.with_suffix(".md")
    lines = [f"## Paper tables ({_rel(path, base)})", ""]
    if md.is_file():
        lines += [md.read_text().strip(), ""]
    else:
        try:
            from ..robustness import tables_markdown

            lines += [tables_markdown(d), ""]
        except Exception as e:  # noqa: BLE001 - a malformed file is listed, not fatal
            lines += [f"(could not render: {type(e).__name__})", ""]
    lines += _inputs_lines(d.get("models") or {})
    return lines


def _paper_section(d: dict, reporter: Reporter) -> list[str]:
    """The paper's Tables 1 and 2 beside ours, cell by cell, and its claims judged on our tests."""
    from ..paper import CITATION, claims, paper_tables
    from ..robustness import TITLES, table_rows

    t1, t2 = paper_tables(d)
    info = (d.get("models") or {}).get("ann") or {}
    lines = ["### Beside the paper", "", f"Paper: {CITATION}. Each cell: ours [95 % interval] / the paper's.", ""]
    if t1 is None:
        return lines + [f"The paper has no tables for {info.get('arch')} on {info.get('dataset')}.", ""]
    ours = table_rows(d)
    theirs = table_rows({**({"table1": t1} if "table1" in d else {}),
                         **({"table2": t2} if t2 and "table2" in d else {})})
    for key, (header, rows) in theirs.items():
        merged = [[o[0]] + [f"{a} / {b}" for a, b in zip(o[1:], p[1:])] for o, p in zip(ours[key][1], rows)]
        lines += [f"**{TITLES[key]}**", ""] + md_table(header, merged)
    if "table2" in d and t2 is None:
        lines += [f"The paper has no Table 2 for {info.get('arch')} on {info.get('dataset')}.", ""]
    verdicts = claims(d)
    for line in verdicts:
        reporter.print(line)
    return lines + ["The paper's claims on our models:", ""] + [f"- {line}" for line in verdicts] + [""]


# --------------------------------------------------------------------------- the report
def build_report(run_dir, out=None, title: str | None = None, reporter: Reporter | None = None,
                 include=()) -> Path:
    """Write the Markdown report of ``run_dir`` (default ``run_dir/report.md``); returns its path.
    ``include``: further Markdown files shown as evaluate sections, first (``snnadv
    reproduce``'s Table 1 under a protocol)."""
    reporter = reporter or Reporter(quiet=True)
    root = Path(run_dir)
    if not root.is_dir():
        raise SnnadvError(f"run directory '{root}' does not exist or is not a directory")
    out = Path(out) if out else root / "report.md"
    if out.suffix != ".md":
        out = out / "report.md"
    base = out.parent

    def visible(p: Path) -> bool:
        return not any(part.startswith(".") for part in p.relative_to(root).parts)

    found = sorted(p for p in root.rglob("*.json") if visible(p) and p.is_file())
    loaded, unreadable = [], []
    for p in found:
        try:
            loaded.append((p, json.loads(p.read_text())))
        except (OSError, ValueError) as e:
            unreadable.append((p, type(e).__name__))
    analysis_dirs = {p.parent for p, d in loaded if isinstance(d, dict) and d.get("analysis")}
    internal = {a / sub for a in analysis_dirs for sub in INTERNAL_DIRS}

    def is_internal(p: Path) -> bool:
        return any(i in p.parents for i in internal)

    analyses, stages, attacks, tables, other = [], [], [], [], []
    skipped = 0
    for p, d in loaded:
        if is_internal(p):
            skipped += 1
        elif not isinstance(d, dict):
            other.append((p, f"a JSON {type(d).__name__}"))
        elif d.get("analysis"):
            analyses.append((p, d))
        elif "table1" in d or "table2" in d:
            tables.append((p, d))
        elif "adv_acc" in d and "attack" in d:
            attacks.append((p, d))
        elif d.get("stage") in ("ann", "snn-conv", "snn-bp") and "metrics" in d:
            stages.append((p, d))
        else:
            other.append((p, d))
    order = {n: i for i, n in enumerate(ANALYSES)}
    analyses.sort(key=lambda x: (order.get(x[1]["analysis"], len(order)), str(x[0])))
    evaluates = sorted(p for p in root.rglob("*evaluate*.md") if visible(p) and p.resolve() != out.resolve())
    first = [Path(p) for p in include if Path(p).is_file()]
    evaluates = first + [p for p in evaluates if p.resolve() not in {f.resolve() for f in first}]

    shown: set = set()
    body: list[str] = []
    for p, d in analyses:
        body += _analysis_section(p, d, base, shown)
    if stages:
        body += _stage_section(stages, base)
    if attacks:
        body += _attack_section(attacks, base)
    for p, d in tables:
        body += _tables_section(p, d, base)
        try:
            body += _paper_section(d, reporter)
        except (KeyError, TypeError, ValueError, IndexError) as e:  # a malformed file is listed, not fatal
            body += [f"(could not compare with the paper: {type(e).__name__})", ""]
    for p in evaluates:
        body += [f"## Evaluate ({_rel(p, base)})", "", p.read_text().strip(), ""]
    figures = sorted(p for p in root.rglob("*.png") if visible(p) and p.resolve() not in shown and not is_internal(p))
    if figures:
        body += ["## Other figures", ""]
        for p in figures:
            body += [f"![{p.stem}]({_rel(p, base)})", ""]
    if other or unreadable:
        body += ["## Other results", "", "JSON files of a kind this report does not know, with their top-level keys:",
                 ""]
        for p, d in other:
            keys = ", ".join(f"`{k}`" for k in list(d)[:30]) if isinstance(d, dict) else d
            body.append(f"- `{_rel(p, base)}`: {keys}")
        for p, why in unreadable:
            body.append(f"- `{_rel(p, base)}`: unreadable ({why})")
        body.append("")

    now = _dt.datetime.now().isoformat(timespec="seconds")
    head = [f"# {title or 'snnadv report: ' + root.name}", "",
            f"Generated by snnadv {__version__} from `{root}` on {now}: {len(analyses)} analysis result(s), "
            f"{len(stages)} training result(s), {len(attacks)} attack result(s), {len(tables)} table file(s), "
            f"{len(evaluates)} evaluate file(s), {len(other) + len(unreadable)} other file(s)"
            + (f"; {skipped} per-setting file(s) summarised by their sweeps" if skipped else "") + ".", ""]
    if analyses:
        head += ["Analyses: " + ", ".join(f"`{d['analysis']}`" for _, d in analyses), ""]
    if not (analyses or stages or attacks or tables or evaluates or figures or other or unreadable):
        head += ["No results found.", ""]
    atomic_write_text(out, "\n".join(head + body).rstrip() + "\n")
    reporter.print(f"[green]saved[/] {out}")
    return out
