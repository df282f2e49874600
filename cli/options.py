"""The options every subcommand shares (one CLI convention for all stages)."""

from __future__ import annotations

import click

#: option name -> its Click declaration, in the order ``--help`` lists them
COMMON = {
    "--config": dict(type=click.Path(), help="TOML config ([common] + a table per stage); flags override it."),
    "--data-dir": dict(help="CIFAR folder: ImageFolder tree (train/, test/) or torchvision files."),
    "--dataset": dict(help="cifar10 | cifar100."),
    "--download": dict(is_flag=True, default=None,
                       help="When --data-dir has no data, let torchvision fetch CIFAR once into the cache."),
    "--device": dict(help="auto | cpu | cuda (default auto)."),
    "--seed": dict(type=int, help="Random seed (default 0)."),
    "--batch-size": dict(type=int, help="Batch size (default 64)."),
    "--train-subset": dict(type=int, help="Use only the first N training images (class-balanced)."),
    "--test-subset": dict(type=int, help="Use only the first N test images (class-balanced)."),
    "--out": dict(type=click.Path(), help="Output file (checkpoint .pt, results beside it)."),
    "--overwrite": dict(is_flag=True, default=None,
                        help="Replace an existing result at --out (kept until the new run has a complete replacement)."),
    "--quiet": dict(is_flag=True, default=None, help="No progress display."),
    "--precision": dict(help="fp32 (default) | bf16: bf16 autocast of the SNN's synaptic layers, membranes "
                        "stay fp32 (bench also takes fp32,bf16: a row each)."),
}


def common_options(fn=None, *, only: tuple[str, ...] | None = None, **changed: dict):
    """Add the shared options to a command: all of them, or ``only`` these names;
    ``changed`` replaces an option's declaration (``seed=dict(...)`` for ``--seed``)."""
    def add(fn):
        for name in reversed(only or tuple(COMMON)):
            fn = click.option(name, **changed.get(name[2:].replace("-", "_"), COMMON[name]))(fn)
        return fn

    return add(fn) if fn is not None else add


def flags(kw: dict) -> dict:
    """Command-line values that were given (``None`` = not given)."""
    return {k: v for k, v in kw.items() if v is not None}
