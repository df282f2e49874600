"""The package's layering, read from the source with ``ast`` (no module is imported).

* The computation core (:data:`CORE`) never imports the experiment layer
  (:data:`EXPERIMENT`), at any level (also inside functions), and never prints, opens or
  writes files, or uses rich: what to show and what to save is its caller's business.
* No import cycle among the package's modules, counting imports at any level (an import
  moved inside a function to dodge a cycle is still one).

A name in :data:`CORE` or :data:`EXPERIMENT` that does not exist (yet) is skipped; a
package name stands for every module in it.  :data:`KNOWN` lists the violations that
are known and not fixed yet: a new one fails, and so does a known one that is gone
(remove it from the list).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: where each package's source is (setup.py: snnadv.cli lives in cli/)
ROOTS = {"snnadv": REPO / "snnadv", "snnadv.cli": REPO / "cli"}

#: the computation core: modules, or packages (every module in them)
CORE = ("neurons", "surrogates", "kernels", "encoding", "models", "conversion", "training", "attacks", "gradients",
        "evaluation", "stats", "registry", "errors", "batching", "values", "masking", "memory", "parallel",
        "estimator", "sharpness", "paths", "eot", "comparison", "runtime")
#: the experiment layer: configs, files, printing, the stages and the command line
EXPERIMENT = ("config", "checkpoint", "outputs", "report", "data", "train", "convert", "robustness", "adaptive",
              "reproduce", "analysis", "bench", "protocol_cost", "doctor", "cuda_checks", "paper", "atomic", "cli")

#: what the core must not do: calls, attributes and imports
FORBIDDEN_CALLS = ("print", "open")
FORBIDDEN_ATTRIBUTES = {("torch", "save"): "torch.save", (None, "write_text"): ".write_text",
                        (None, "write_bytes"): ".write_bytes"}
FORBIDDEN_IMPORTS = ("rich",)

#: violations known before the parts of the restructure are merged (to be emptied then)
KNOWN: set[str] = set()
#: import cycles known (each a set of modules)
KNOWN_CYCLES: set[frozenset] = set()


# --------------------------------------------------------------------------- reading the source
def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    found = {}
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _targets(module: str, node: ast.AST) -> list[str]:
    """The package modules an import statement imports (a submodule's packages too,
    except those of the importing module itself, which are already being imported)."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if _is_package(module) else module.split(".")[:-1]
            base = base[:len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
    out = []
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            target = ".".join(parts[:i])
            if target in MODULES and target != module and not module.startswith(target + "."):
                out.append(target)
    return list(dict.fromkeys(out))


def _layer_of(module: str, names: tuple[str, ...]) -> str | None:
    """The entry of ``names`` that ``module`` belongs to (``snnadv.cli.*``: cli)."""
    rest = module.split(".")[1:]
    return rest[0] if rest and rest[0] in names else None


def _module_level(tree: ast.Module):
    """The import statements that run when the module is imported (not inside functions or
    classes, nor under ``if TYPE_CHECKING``)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        elif isinstance(node, (ast.If, ast.Try, ast.With)) or type(node).__name__ == "TryStar":
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo += getattr(node, field, [])
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body


# --------------------------------------------------------------------------- the checks
def core_violations() -> set[str]:
    found = set()
    for module, tree in TREES.items():
        if _layer_of(module, CORE) is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, node):
                    if _layer_of(target, EXPERIMENT):
                        found.add(f"{module} imports {target}")
                roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for r in roots:
                    if not getattr(node, "level", 0) and r.split(".")[0] in FORBIDDEN_IMPORTS:
                        found.add(f"{module} imports {r.split('.')[0]}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
                found.add(f"{module} calls {node.func.id}()")
            elif isinstance(node, ast.Attribute):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                what = FORBIDDEN_ATTRIBUTES.get((owner, node.attr)) or FORBIDDEN_ATTRIBUTES.get((None, node.attr))
                if what:
                    found.add(f"{module} uses {what}")
    return found


def import_cycles() -> set[frozenset]:
    """The strongly connected components (of more than one module, or a module importing
    itself) of the import graph (Tarjan), counting imports at any level: an import put
    inside a function to dodge a cycle is still a cycle."""
    graph = {m: {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                 for t in _targets(m, node)} for m, tree in TREES.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), set(), [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                cycles.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_lists_name_modules_of_the_package():
    """Every name that exists is a module or a package (a typo would silently check nothing)."""
    existing = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    assert {"training", "registry", "errors", "neurons"} <= existing & set(CORE)
    assert {"config", "train", "outputs", "report", "cli"} <= existing & set(EXPERIMENT)
    assert not set(CORE) & set(EXPERIMENT)
    # every module is on one side: a new module has to say which
    unplaced = sorted(m for m in MODULES if m.count(".") >= 1 and m.split(".")[1] not in set(CORE) | set(EXPERIMENT))
    assert not unplaced, f"modules in neither CORE nor EXPERIMENT (tests/test_layers.py): {unplaced}"


def test_the_core_never_imports_the_experiment_layer_nor_prints_or_writes():
    found = core_violations()
    new, fixed = sorted(found - KNOWN), sorted(KNOWN - found)
    assert not new, "the computation core reaches into the experiment layer or does I/O:\n  " + "\n  ".join(new)
    assert not fixed, "fixed (remove from KNOWN in tests/test_layers.py):\n  " + "\n  ".join(fixed)


def test_no_import_cycles():
    found = import_cycles()
    show = lambda cycles: "\n  ".join(" <-> ".join(sorted(c)) for c in sorted(cycles, key=sorted))  # noqa: E731
    assert not found - KNOWN_CYCLES, "import cycles:\n  " + show(found - KNOWN_CYCLES)
    assert not KNOWN_CYCLES - found, "fixed (remove from KNOWN_CYCLES in tests/test_layers.py):\n  " + show(
        KNOWN_CYCLES - found)


def test_the_checks_see_what_they_look_for():
    """The checks on a made-up core module and a made-up cycle (so a passing run means something)."""
    saved = dict(TREES), dict(MODULES)
    try:
        MODULES["snnadv.training"] = MODULES["snnadv.training"]
        TREES["snnadv.training"] = ast.parse("import rich\nfrom .config import resolve\n"
                                             "def f(p):\n    from . import report\n    print(1)\n"
                                             "    p.write_text('x')\n    torch.save({}, p)\n    open(p)\n")
        assert {"snnadv.training imports snnadv.config", "snnadv.training imports snnadv.report",
                "snnadv.training imports rich", "snnadv.training calls print()", "snnadv.training calls open()",
                "snnadv.training uses .write_text", "snnadv.training uses torch.save"} <= core_violations()
        TREES["snnadv.errors"] = ast.parse("from .stats import x\n")
        TREES["snnadv.stats"] = ast.parse("def f():\n    pass\nfrom . import errors\n")
        assert frozenset({"snnadv.errors", "snnadv.stats"}) in import_cycles()
        TREES["snnadv.stats"] = ast.parse("def f():\n    from . import errors\n")  # inside a function: still one
        assert frozenset({"snnadv.errors", "snnadv.stats"}) in import_cycles()
        TREES["snnadv.stats"] = ast.parse("def f():\n    pass\n")
        assert frozenset({"snnadv.errors", "snnadv.stats"}) not in import_cycles()
    finally:
        TREES.clear()
        TREES.update(saved[0])
        MODULES.clear()
        MODULES.update(saved[1])
