"""The options every subcommand shares (one CLI convention for all stages)."""

from __future__ import annotations

import functools

import click

COMMON_OPTIONS = [
    click.option("--config", type=click.Path(), help="TOML config ([common] + a table per stage); flags override it."),
    click.option("--data-dir", help="CIFAR folder: ImageFolder tree (train/, test/) or torchvision files."),
    click.option("--dataset", help="cifar10 | cifar100."),
    click.option("--download", is_flag=True, default=None,
                 help="When --data-dir has no data, let torchvision fetch CIFAR once into the cache."),
    click.option("--device", help="auto | cpu | cuda (default auto)."),
    click.option("--seed", type=int, help="Random seed (default 0)."),
    click.option("--batch-size", type=int, help="Batch size (default 64)."),
    click.option("--train-subset", type=int, help="Use only the first N training images (class-balanced)."),
    click.option("--test-subset", type=int, help="Use only the first N test images (class-balanced)."),
    click.option("--out", type=click.Path(), help="Output file (checkpoint .pt, results beside it)."),
    click.option("--overwrite", is_flag=True, default=None,
                 help="Replace an existing result at --out (kept until the new run has a complete replacement)."),
    click.option("--quiet", is_flag=True, default=None, help="No progress display."),
    click.option("--precision", help="fp32 (default) | bf16: bf16 autocast of the SNN's synaptic layers, membranes "
                 "stay fp32 (bench also takes fp32,bf16: a row each)."),
]


def common_options(fn):
    for opt in reversed(COMMON_OPTIONS):
        fn = opt(fn)
    return fn


def flags(kw: dict) -> dict:
    """Command-line values that were given (``None`` = not given)."""
    return {k: v for k, v in kw.items() if v is not None}
