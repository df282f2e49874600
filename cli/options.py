"""The options every subcommand shares (one CLI convention for all stages)."""

from __future__ import annotations

import difflib

import click

from snnadv.registry import ARCHITECTURES, ATTACKS, GRADIENTS, NEURONS, SURROGATES
from snnadv.values import parse_list

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


class RegistryChoice(click.ParamType):
    """A name registered in ``registry`` (or one of ``extra``), checked when the command
    line is parsed (plugins are loaded by then, so their names count) and listed in
    ``--help``.  ``several``: a comma-separated list of such names, handed on as given."""

    def __init__(self, registry, *, several: bool = False, extra: tuple[str, ...] = ()):
        self.registry, self.several, self.extra = registry, several, tuple(extra)
        self.name = registry.kind

    def choices(self) -> list[str]:
        return list(dict.fromkeys([*self.extra, *self.registry]))

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.choices()) + "]" + (",..." if self.several else "")

    def convert(self, value, param, ctx):
        items = parse_list(value) if self.several else [value]
        known = self.choices()
        for v in items:
            if v not in known:
                close = difflib.get_close_matches(str(v), known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.fail(f"unknown {self.registry.kind} '{v}' (choose {', '.join(known)}){hint}", param, ctx)
        return value

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in self.choices() if n.startswith(incomplete)]


#: the option types of registered names (attacks, gradient paths, surrogates)
ARCH = RegistryChoice(ARCHITECTURES)
NEURON = RegistryChoice(NEURONS)
ATTACK = RegistryChoice(ATTACKS)
GRADIENT = RegistryChoice(GRADIENTS)
SURROGATE = RegistryChoice(SURROGATES)
