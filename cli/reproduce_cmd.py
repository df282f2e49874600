"""``snnadv reproduce``: the whole pipeline, resumable (see :mod:`snnadv.reproduce`)."""

from __future__ import annotations

import click

from .options import common_options, flags

#: the shared options reproduce passes to every stage (they override the config)
STAGE_OPTIONS = ("--data-dir", "--dataset", "--download", "--device", "--precision", "--batch-size",
                 "--train-subset", "--test-subset", "--seed", "--quiet")


@click.command("reproduce")
@click.option("--config", type=click.Path(), required=True, help="Experiment config, e.g. configs/quick.toml.")
@click.option("--run-dir", type=click.Path(), help="Where every output goes (default: [reproduce] run_dir or runs/<config name>).")
@click.option("--only", multiple=True, help="Run only this stage (repeatable); its inputs must be done.")
@click.option("--from", "start", help="Run from this stage on (earlier completed stages are re-used).")
@click.option("--max-stages", type=click.IntRange(min=0), help="Stop after running this many stages (continue later).")
@click.option("--spread", is_flag=True, default=False,
              help="Under torchrun with 2+ ranks: train seed I's chain on rank 0 and seed II's on rank 1 at the "
                   "same time, each as one process; the table and what follows use every rank.")
@common_options(only=STAGE_OPTIONS,
                seed=dict(help="The two seeds I,II of the pipeline, as 'A,B' (default: [reproduce] seeds, 0,1)."))
def reproduce(config, run_dir, only, start, max_stages, spread, **kw):
    """Train two ANNs, convert, fine-tune, and produce the paper's tables, figures and report.

    The shared options (--data-dir, --download, --device, --batch-size, ...) override
    every stage's config, e.g. the full CIFAR-10 without editing the config:
    snnadv reproduce --config configs/vgg5_cifar10_cpu.toml --data-dir ~/cifar10
    """
    from snnadv.reproduce import reproduce as run

    given = flags(kw)
    quiet = bool(given.pop("quiet", False))
    run(config, run_dir, list(only) or None, start, max_stages, quiet, given, spread=spread)
