"""``snnadv attack`` and ``snnadv table``: thin wrappers over :mod:`snnadv.robustness`."""

from __future__ import annotations

import click

from .options import ATTACK, GRADIENT, common_options, flags

KINDS = click.Choice(["ann", "snn-conv", "snn-bp"])


@click.command("attack")
@common_options
@click.option("--source", type=KINDS, help="Kind of the source model (the one attacked; default ann).")
@click.option("--target", type=KINDS, help="Kind of the target model (default: the source; whitebox).")
@click.option("--source-ckpt", type=click.Path(), help="Checkpoint of the source model.")
@click.option("--target-ckpt", type=click.Path(), help="Checkpoint of the target (default: the source: whitebox).")
@click.option("--attack", type=ATTACK, help="Attack (default pgd).")
@click.option("--eps", help="L-inf budget in pixel scale, e.g. 8/255 (default).")
@click.option("--alpha", help="PGD step size, e.g. 2/255 (default).")
@click.option("--steps", type=int, help="PGD steps (default 7).")
@click.option("--random-start", is_flag=True, default=None, help="PGD from a random point in the eps-ball.")
@click.option("--timesteps", type=int, help="T for SNN sources and targets (default: the checkpoint's).")
@click.option("--gradient", type=GRADIENT, help="SNN source gradient path (default alg1: Algorithm 1).")
@click.option("--eot", type=int, help="SNN source: average the gradient over this many encoder draws (EOT; default 1).")
@click.option("--input-bits", type=int, help="Quantise inputs of source and target to this many bits.")
@click.option("--eval-draws", type=int, help="Encoder draws to average SNN accuracy over (default 1).")
@click.option("--targeted", is_flag=True, default=None, help="Targeted attack towards random other labels.")
def attack(**kw):
    """Craft adversarial images on a source model and evaluate a target (whitebox or blackbox)."""
    from snnadv.config import resolve
    from snnadv.robustness import run_attack

    run_attack(resolve("attack", kw.get("config"), flags(kw)))


@click.command("table")
@common_options
@click.option("--conv-timesteps", type=int, help="T for the SNN-conv models (default: their checkpoint's).")
@click.option("--bp-timesteps", type=int, help="T for the SNN-BP models (default: their checkpoint's).")
@click.option("--gradient", type=GRADIENT, help="Gradient path for SNN sources (default alg1).")
@click.option("--eps", help="L-inf budget (default 8/255).")
@click.option("--steps", type=int, help="PGD steps (default 7).")
@click.option("--eval-draws", type=int, help="Encoder draws per SNN accuracy (default 1).")
@click.option("--chunk", type=int, help="Images per resumable piece of each crafted set (default: the whole set).")
def table(**kw):
    """Paper Tables 1 and 2 from the checkpoints listed in the config's [table]."""
    from snnadv.config import resolve
    from snnadv.robustness import run_table

    run_table(resolve("table", kw.get("config"), flags(kw)))
