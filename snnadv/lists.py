"""The one list parser, shared by the core (attack settings) and the experiment layer
(configs, command-line lists): computation only."""

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
