"""Shared plumbing of the analyses: list parsing, run directories, JSON/CSV/PNG output.

Every analysis writes into one *run directory* (``--out``; default
``runs/analysis/<name>``):

    <name>.json   the result: settings, input hashes, versions, tables, checks, data
    <name>.csv    the numbers behind the figure, one row per point
    <name>.png    the figure (matplotlib, Agg; skipped with a warning without matplotlib)

All three are written atomically (temporary file, then ``os.replace``).  The JSON
has a common shape that :mod:`snnadv.analysis.markdown` renders without knowing the
analysis: ``analysis``, ``title``, ``figure``, ``csv``, ``settings``, ``inputs``,
``tables`` (a list of ``{"title", "columns", "rows"}``), ``checks`` and ``notes``.
"""

from __future__ import annotations

import csv
import functools
import io
from pathlib import Path

from ..config import VOLATILE, parse_list
from ..encoding import check_bits
from ..errors import SnnadvError
from ..outputs import atomic_target, atomic_write_text, write_json

#: the analyses, in the paper's order (the ``snnadv analyze`` subcommands)
ANALYSES = ("timesteps", "leak", "eq7", "encoder", "perturbation")


# --------------------------------------------------------------------------- parsing
def _items(value, name: str) -> list:
    """A list from a TOML list, a number, or a comma-separated string; never empty."""
    if value is None:
        return []
    items = parse_list(value, name)
    if not items:
        raise SnnadvError(f"--{name} is empty: give at least one value")
    return items


def int_list(value, name: str, default: list[int] | None = None) -> list[int]:
    """Positive integers (e.g. ``--timesteps 50,75,100``), in the given order, no repeats."""
    items = _items(value, name) if value is not None else list(default or [])
    out = []
    for v in items:
        try:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            n = int(v)
        except (TypeError, ValueError):
            raise SnnadvError(f"--{name} takes positive integers, got '{v}'") from None
        if n < 1:
            raise SnnadvError(f"--{name} takes positive integers, got {n}")
        if n not in out:
            out.append(n)
    if not out:
        raise SnnadvError(f"--{name} is empty: give at least one value")
    return out


def bits_list(value, name: str = "bits", default: list | None = None) -> list[int | None]:
    """Input bit-widths: integers 1-8, or ``none`` (no quantisation)."""
    items = _items(value, name) if value is not None else list(default or [])
    out: list[int | None] = []
    for v in items:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "no", "off", "float")):
            b = None
        else:
            try:
                if isinstance(v, bool):
                    raise ValueError
                b = int(v) if not isinstance(v, float) or v.is_integer() else None
                if b is None:
                    raise ValueError
                check_bits(b)
            except (TypeError, ValueError, SnnadvError):
                raise SnnadvError(f"unknown bits value '{v}' in --{name} (choose 1-8 or none)") from None
        if b not in out:
            out.append(b)
    if not out:
        raise SnnadvError(f"--{name} is empty: give at least one value")
    return out


def leak_list(value, name: str = "leaks", default: list[float] | None = None) -> list[float]:
    """Leak factors lambda in (0, 1] (1.0 = IF)."""
    items = _items(value, name) if value is not None else list(default or [])
    out = []
    for v in items:
        lam = float_value(v, name)
        if not 0.0 < lam <= 1.0:
            raise SnnadvError(f"leak must be in (0, 1], got {lam:g} (in --{name})")
        if lam not in out:
            out.append(lam)
    if not out:
        raise SnnadvError(f"--{name} is empty: give at least one value")
    return out


def float_list(value, name: str, default: list[float] | None = None) -> list[float]:
    items = _items(value, name) if value is not None else list(default or [])
    out = [float_value(v, name) for v in items]
    if not out:
        raise SnnadvError(f"--{name} is empty: give at least one value")
    return out


def float_value(v, name: str) -> float:
    from ..attacks import parse_eps

    try:
        x = parse_eps(v)
    except SnnadvError:
        raise SnnadvError(f"--{name} takes numbers, got '{v}'") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise SnnadvError(f"--{name} takes finite numbers, got '{v}'")
    return x


def choice_list(value, name: str, choices: tuple[str, ...]) -> list[str]:
    out = []
    for v in _items(value, name):
        v = str(v).strip().lower()
        if v not in choices:
            raise SnnadvError(f"unknown value '{v}' in --{name} (choose {', '.join(choices)})")
        if v not in out:
            out.append(v)
    return out


def bits_label(bits: int | None) -> str:
    return "none" if bits is None else str(bits)


# --------------------------------------------------------------------------- run directories
def run_dir_path(cfg: dict, name: str) -> Path:
    """``--out`` (a file name is taken as its stem), default ``runs/analysis/<name>``."""
    out = Path(cfg.get("out") or f"runs/analysis/{name}")
    return out.parent / out.stem if out.suffix in (".json", ".csv", ".png", ".md") else out


#: analyses that keep every finished setting and continue when run again (their run
#: directory is resumed, not replaced: ``--force`` recomputes)
RESUMABLE = ("timesteps", "leak")


def claimed(name: str, fn):
    """``fn(cfg, reporter)`` with its run directory claimed first (:mod:`snnadv.outputs`): not
    an input's folder, writable, locked; an existing ``<name>.json`` of a one-shot analysis
    is replaced only with ``--overwrite``."""
    @functools.wraps(fn)
    def run(cfg: dict, reporter=None) -> dict:
        from ..outputs import Outputs

        out = run_dir_path(cfg, name)
        inputs = {f"--{k.replace('_', '-')}": cfg.get(k) for k in ("checkpoint", "source_ckpt", "ann_ckpt")}
        with Outputs() as outputs:
            outputs.claim([out], cfg, inputs=inputs, folder=True,
                          replace=[] if name in RESUMABLE else [out / f"{name}.json"])
            return fn(cfg, reporter)
    return run


def run_dir(cfg: dict, name: str) -> Path:
    """The run directory of an analysis (:func:`run_dir_path`), created."""
    out = run_dir_path(cfg, name)
    if out.exists() and not out.is_dir():
        raise SnnadvError(f"--out '{out}' exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def recorded_settings(cfg: dict, keys: tuple[str, ...] | None = None) -> dict:
    """The resolved settings recorded in a result: ``keys`` (default all but output-only
    ones), plus the config file they came from, if any."""
    out = {k: v for k, v in cfg.items() if (k in keys if keys is not None else k not in VOLATILE)}
    if cfg.get("config"):
        out["config"] = cfg["config"]
    return out


def abs_path(path) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def versions() -> dict:
    from ..checkpoint import versions as _versions

    return _versions()


# --------------------------------------------------------------------------- writing
def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in columns})
    return atomic_write_text(path, buf.getvalue())


def figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] | None = None):
    """A matplotlib ``Figure`` and its axes (no pyplot state; Agg when saved).

    Returns ``(None, None)`` when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None, None
    fig = Figure(figsize=size or (4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as PNG atomically (the Agg canvas renders it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_target(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def write_outputs(out: Path, name: str, result: dict, columns: list[str], rows: list[dict],
                  draw, reporter) -> dict:
    """Write ``<name>.csv``, ``<name>.png`` (``draw(fig_factory) -> fig``) and ``<name>.json``.

    ``draw`` gets :func:`figure` and returns the finished figure (or None).  Without
    matplotlib the figure is skipped with a warning; the JSON says so.  Under ``torchrun``
    only rank 0 writes (the others return the result with ``csv`` and ``figure`` None).
    """
    from .. import parallel

    if not parallel.world().main:
        result["csv"] = result["figure"] = None
        return result
    csv_path = write_csv(out / f"{name}.csv", columns, rows)
    result["csv"] = csv_path.name
    result["figure"] = None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        reporter.print("[yellow]warning:[/] matplotlib is not installed (pip install 'snnadv[plots]'): "
                       "no figure written")
    else:
        fig = draw(figure)
        if fig is not None:
            result["figure"] = save_figure(fig, out / f"{name}.png").name
    json_path = write_json(out / f"{name}.json", result)
    reporter.print(f"[green]saved[/] {json_path}, {csv_path.name}"
                   + (f", {result['figure']}" if result["figure"] else ""))
    return result


def table(title: str, columns: list[str], rows: list[list]) -> dict:
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows]}
