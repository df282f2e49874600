"""``snnadv reproduce``: the whole pipeline, resumable (see :mod:`snnadv.reproduce`)."""

from __future__ import annotations

import click

from .main import cli


@cli.command("reproduce")
@click.option("--config", type=click.Path(), required=True, help="Experiment config, e.g. configs/quick.toml.")
@click.option("--run-dir", type=click.Path(), help="Where every output goes (default: [reproduce] run_dir or runs/<config name>).")
@click.option("--only", multiple=True, help="Run only this stage (repeatable); its inputs must be done.")
@click.option("--from", "start", help="Run from this stage on (earlier completed stages are re-used).")
@click.option("--max-stages", type=click.IntRange(min=0), help="Stop after running this many stages (continue later).")
@click.option("--device", help="auto | cpu | cuda.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def reproduce(config, run_dir, only, start, max_stages, device, quiet):
    """Train two ANNs, convert, fine-tune, and produce the paper's tables, figures and report."""
    from snnadv.reproduce import reproduce as run

    run(config, run_dir, list(only) or None, start, max_stages, quiet, {"device": device} if device else None)
