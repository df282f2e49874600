"""Registries: the names the CLI, the configs, the tables and the sweeps can choose from.

A new neuron, surrogate, attack, gradient path or architecture is one file with one
decorator; nothing else in the package lists names::

    import snnadv

    @snnadv.register_attack("mifgsm")
    class MomentumFGSM(snnadv.attacks.Attack):
        ...

Kinds and what an entry is:

=============  ==========================================================================
neuron         an ``nn.Module`` class following :class:`snnadv.neurons.Neuron`'s protocol
surrogate      a :class:`snnadv.surrogates.Surrogate` subclass (a spike's pseudo-derivative)
attack         an :class:`snnadv.attacks.Attack` subclass (``forward(images, labels)``)
gradient       a factory ``(model, **options) -> gradient source`` (how an attack
               differentiates a model: Algorithm 1, BPTT, rate, ...); ``bptt-<s>``
               for every registered surrogate s (:meth:`Registry.register_family`)
architecture   a function ``num_classes -> ArchSpec``
=============  ==========================================================================

Entries of the package register themselves when their module is imported; a registry
imports those modules the first time it is read (so this module imports nothing of
snnadv but its errors, and cannot be part of an import cycle).  Plugins outside the package register
the same way and are found through the entry-point group ``snnadv.plugins`` (each entry
point names a module) or the ``SNNADV_PLUGINS`` variable (module names, comma
separated); :func:`load_plugins` imports them, and every registry calls it before it is
read.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from .errors import SnnadvError

PLUGIN_GROUP = "snnadv.plugins"
PLUGIN_ENV = "SNNADV_PLUGINS"

_plugins_loaded: dict[str, str] = {}  # module name -> where it came from (entry point / env)


class RegistryError(SnnadvError, LookupError):
    """An unknown or duplicate name (its message is one line, made for the user)."""


class Registry(Mapping):
    """Name -> entry, filled by :meth:`register`; a read-only mapping otherwise.

    ``modules``: the package's modules whose import registers its own entries.
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._modules = modules
        self._entries: dict[str, Any] = {}  # name -> entry, or a placeholder -> _Family
        self._ready = False

    def register(self, name: str, *, replace: bool = False) -> Callable[[Any], Any]:
        """Decorator: ``@REG.register("name")`` adds the decorated object under ``name``
        (a second object under a taken name is refused unless ``replace``)."""
        if not isinstance(name, str) or not name or name != name.strip() or "," in name:
            raise RegistryError(f"a {self.kind} name must be a non-empty string without commas, got {name!r}")

        def add(obj):
            old = self._entries.get(name)
            if old is not None and old is not obj and not replace and _qualname(old) != _qualname(obj):
                raise RegistryError(f"{self.kind} '{name}' is already registered ({_qualname(old)}); "
                                    f"choose another name or pass replace=True")
            self._entries[name] = obj
            return obj
        return add

    def register_family(self, prefix: str, names: Mapping) -> Callable[[Any], Any]:
        """Decorator on ``make(name) -> entry``: an entry ``prefix + n`` for every name n of
        ``names`` (another registry), read whenever this one is, so a name registered there
        later (a plugin's) has its entry here too; listed where the family was registered.
        A name registered with :meth:`register` wins over a family's."""
        def add(make):
            self._entries[f"{prefix}<{getattr(names, 'kind', 'name')}>"] = _Family(prefix, names, make)
            return make
        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and interactive sessions)."""
        self._entries.pop(name, None)

    def _load(self) -> None:
        if not self._ready:
            self._ready = True
            for mod in self._modules:
                importlib.import_module(mod)
        load_plugins()

    def _all(self) -> dict[str, Any]:
        """Every name -> entry, the families expanded."""
        self._load()
        out: dict[str, Any] = {}
        for key, obj in self._entries.items():
            if isinstance(obj, _Family):
                for n in obj.names:
                    if obj.prefix + n not in self._entries:
                        out.setdefault(obj.prefix + n, obj.entry(n))
            else:
                out[key] = obj
        return out

    def get(self, name: str, default=None):
        return self._all().get(name, default)

    def __getitem__(self, name: str):
        entries = self._all()
        if name not in entries:
            raise RegistryError(self.unknown(name))
        return entries[name]

    def unknown(self, name: str) -> str:
        """One line: ``name`` is unknown, with the choices and a did-you-mean."""
        names = list(self._all())
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}' (choose {', '.join(names)}){hint}"

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._all()))

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name) -> bool:
        return name in self._all()

    def names(self) -> list[str]:
        return list(self)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries) or 'not loaded'})"


class _Family:
    """The entries ``prefix + n`` for the names n of another registry (see :meth:`Registry.register_family`)."""

    def __init__(self, prefix: str, names: Mapping, make: Callable[[str], Any]):
        self.prefix, self.names, self.make = prefix, names, make
        self._made: dict[str, Any] = {}

    def entry(self, name: str):
        if name not in self._made:
            self._made[name] = self.make(name)
        return self._made[name]


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


@functools.cache
def _entry_point_plugins() -> tuple[tuple[str, str], ...]:
    """(module, source) of the ``snnadv.plugins`` entry points, read once per process
    (installed distributions do not change while it runs)."""
    try:
        from importlib.metadata import entry_points

        return tuple((ep.value.split(":")[0], f"entry point '{ep.name}'") for ep in entry_points(group=PLUGIN_GROUP))
    except Exception:  # noqa: BLE001 (broken distribution metadata must not break the package)
        return ()


def load_plugins() -> dict[str, str]:
    """Import every plugin module named by the ``snnadv.plugins`` entry points and by
    ``SNNADV_PLUGINS`` (once each); returns ``{module: source}``.  A plugin that fails
    to import raises :class:`RegistryError` naming it (one line)."""
    wanted = list(_entry_point_plugins())
    wanted += [(m.strip(), PLUGIN_ENV) for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()]
    for module, source in wanted:
        if module in _plugins_loaded:
            continue
        _plugins_loaded[module] = source  # before the import: a plugin may read a registry
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 (any failure of a user's module is reported as one line)
            del _plugins_loaded[module]
            raise RegistryError(f"plugin module '{module}' (from {source}) failed to import: "
                                f"{type(e).__name__}: {e}") from e
    return dict(_plugins_loaded)


NEURONS = Registry("neuron", ("snnadv.neurons",))
SURROGATES = Registry("surrogate", ("snnadv.surrogates",))
ATTACKS = Registry("attack", ("snnadv.attacks",))
GRADIENTS = Registry("gradient path", ("snnadv.gradients", "snnadv.paths.hart", "snnadv.paths.pdsg"))
ARCHITECTURES = Registry("architecture", ("snnadv.models.spec",))


def register_neuron(name: str, *, replace: bool = False):
    """``@snnadv.register_neuron("name")`` on a neuron class (see :class:`snnadv.neurons.Neuron`)."""
    return NEURONS.register(name, replace=replace)


def register_surrogate(name: str, *, replace: bool = False):
    """``@snnadv.register_surrogate("name")`` on a :class:`Surrogate` subclass."""
    return SURROGATES.register(name, replace=replace)


def register_attack(name: str, *, replace: bool = False):
    """``@snnadv.register_attack("name")`` on an :class:`snnadv.attacks.Attack` subclass."""
    return ATTACKS.register(name, replace=replace)


def register_gradient(name: str, *, replace: bool = False):
    """``@snnadv.register_gradient("name")`` on a factory ``(model, **options) -> gradient source``."""
    return GRADIENTS.register(name, replace=replace)


def register_architecture(name: str, *, replace: bool = False):
    """``@snnadv.register_architecture("name")`` on a function ``num_classes -> ArchSpec``."""
    return ARCHITECTURES.register(name, replace=replace)
