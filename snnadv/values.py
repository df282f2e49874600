"""Parsers of user-given values shared by the core and the experiment layer: the one
list parser (configs, command-line lists, attack settings) and the precision names.
Computation only."""

from __future__ import annotations

from .errors import SnnadvError


def parse_list(value, name: str | None = None) -> list:
    """The one list parser: a TOML list (or tuple) as it is, a comma-separated string
    (``"a, b,c"``) as its stripped items, anything else as a one-item list.  Empty items
    of a string are dropped; with ``name``, an empty item among several (``"4,,2"``) is
    a one-line error naming ``--name``.  Items are not converted: each setting checks
    its own (:class:`Setting`); the command line's list flags reach it through
    :func:`resolve`."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
        if name is not None and len(items) > 1 and "" in items:
            raise SnnadvError(f"--{name} has an empty item in '{value}'")
        return [v for v in items if v]
    return [value]


#: how synaptic layers run: fp32, or bf16 autocast (membranes stay fp32)
PRECISIONS = ("fp32", "bf16")


def parse_precision(value, several: bool = False) -> list[str]:
    """``fp32`` | ``bf16`` as a one-item list; with ``several`` (the bench: a row each) also
    ``"fp32,bf16"`` or a list.  Names in order, without repeats; anything else is a
    one-line error."""
    names = [str(v).strip() for v in parse_list(value, "precision")] if several else [value]
    for n in names or [""]:  # (no name at all is an unknown one)
        if n not in PRECISIONS:
            choices = "fp32, bf16 or fp32,bf16" if several else "fp32 or bf16"
            raise SnnadvError(f"unknown precision '{n}' (choose {choices})")
    return list(dict.fromkeys(names))
