"""The package's import graph: no cycles, the schema at the bottom, the CLI at the top.

Read from the source with :mod:`ast` (nothing is imported, so no torch): every
``import`` and ``from ... import`` of a zeromega module, at the top of a file
or inside a function (a lazy import is still a dependency), relative imports
resolved, the folders mapped to packages as setup.cfg's ``package_dir`` maps
them. Also ``importlib.import_module("zeromega....")`` with a literal name.

The layers, bottom to top (DESIGN.md, "Layout")::

    config -> integrations -> plugins -> checkpoint -> run -> launch

A module may import its own layer and the layers below it, never one above.
``zeromega.config`` imports nothing else of zeromega. The root package
(``zeromega/__init__.py``, the lazy public façade) and ``zeromega/__main__.py``
are outside the layers. Imports under ``if TYPE_CHECKING:`` never run, so
they are no edge for the cycle check; they still count for the layer rules.
"""

from __future__ import annotations

import ast
import configparser
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "zeromega"

# Bottom to top; a module's layer is the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    ("zeromega.config", "zeromega.version"),
    ("zeromega.integrations",),
    ("zeromega.plugins",),
    ("zeromega.checkpoint",),
    ("zeromega.run",),
    ("zeromega.launch",),
]
EXEMPT = {"zeromega", "zeromega.__main__"}  # the lazy façade and ``python -m zeromega``

# Upward imports inside files being rewritten elsewhere, (importer, imported): each is to be fixed, then
# removed from here. The test fails on an entry that no longer occurs, so the list only shrinks.
KNOWN_UPWARD: set[tuple[str, str]] = set()


# ------------------------------------------------------------------ reading the source


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, from setup.cfg's ``package_dir``."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pairs = (line.split("=") for line in cfg["options"]["package_dir"].split("\n") if line.strip())
    return {name.strip(): ROOT / folder.strip() for name, folder in pairs}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file (``__init__.py`` for a package)."""
    found: dict[str, Path] = {}
    for package, folder in package_dirs().items():
        for init in folder.rglob("__init__.py"):
            parts = (package, *init.parent.relative_to(folder).parts)
            for source in init.parent.glob("*.py"):
                name = ".".join(parts if source.name == "__init__.py" else (*parts, source.stem))
                found[name] = source
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, type_only: bool = False):
    """(node, type_only) for every import statement and literal ``import_module`` call, at any depth."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports_of(child, True)
            for child in node.orelse:
                yield from _imports_of(child, type_only)
            continue
        yield from _imports_of(node, type_only)


def _imports_of(node: ast.AST, type_only: bool):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, type_only
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
               or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
        yield node, type_only
    yield from _imports(node, type_only)


def _known(name: str, known: dict[str, Path]) -> str:
    """``name`` if it is a module, else the longest prefix that is (``from pkg import NAME`` imports pkg)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def edges(known: dict[str, Path]) -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, type_only) for every import of a zeromega module by a zeromega module."""
    found = []
    for module, source in sorted(known.items()):
        package = module if source.name == "__init__.py" else module.rsplit(".", 1)[0]
        tree = ast.parse(source.read_text(), str(source))
        for node, type_only in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module
                # ``from pkg import sub`` imports the module pkg.sub; ``from mod import name`` imports mod
                targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in known else base_name
                           for a in node.names]
            else:
                targets = [node.args[0].value]
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    found.append((module, target, node.lineno, type_only))
    return found


# ------------------------------------------------------------------ the graph


def layer(module: str) -> int | None:
    best, index = "", None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    return index


def _graph():
    known = modules()
    return known, edges(known)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    found, seen = [], set()
    for component in components:
        for start in sorted(component):  # the shortest cycle through each member, each cycle once
            cycle = _shortest_cycle(graph, component, start)
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                found.append(cycle)
    return found


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def _where(found, importer, imported) -> str:
    lines = sorted({line for a, b, line, _ in found if (a, b) == (importer, imported)})
    return f"{importer} -> {imported} (line {', '.join(map(str, lines))})"


# ------------------------------------------------------------------ the tests


def test_the_walk_finds_the_package():
    known = modules()
    for name in ("zeromega", "zeromega.config.schema", "zeromega.launch.cli", "zeromega.plugins.zero.engine",
                 "zeromega.integrations.megatron.model", "zeromega.checkpoint"):
        assert name in known, f"{name} not found; the walk found {sorted(known)}"


def test_the_walk_sees_lazy_relative_and_type_only_imports():
    known, found = _graph()
    pairs = {(a, b): type_only for a, b, _, type_only in found}
    assert ("zeromega.launch.export", "zeromega.checkpoint.export") in pairs  # inside a function
    assert ("zeromega.plugins.zero.engine", "zeromega.plugins.zero.ds_config") in pairs  # from .ds_config import
    assert ("zeromega.checkpoint.weights", "zeromega.checkpoint") in pairs  # from . import _agree (a name)
    assert pairs[("zeromega.config.rules", "zeromega.config.schema")] is True  # under TYPE_CHECKING


def test_the_cycle_finder_names_each_cycle():
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}, "d": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b", "a"], ["c", "b", "c"]]  # each cycle once
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_import_names_an_existing_module():
    known, found = _graph()
    missing = sorted({f"{a} -> {b} (line {line})" for a, b, line, _ in found if _known(b, known) == PACKAGE
                      and b != PACKAGE and not b.startswith(PACKAGE + ".__")})
    assert not missing, "imports of zeromega modules that do not exist:\n  " + "\n  ".join(missing)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if m not in EXEMPT and layer(m) is None)
    assert not unplaced, f"modules in no layer (add their package to LAYERS in {Path(__file__).name}): {unplaced}"


def test_no_import_cycles():
    known, found = _graph()
    graph: dict[str, set[str]] = defaultdict(set)
    for module in known:
        graph[module]
    for importer, imported, _, type_only in found:
        target = _known(imported, known)
        if not type_only and target != importer:
            graph[importer].add(target)
    loops = cycles(graph)
    described = []
    for loop in loops:
        hops = [_where(found, a, b) for a, b in zip(loop, loop[1:])]
        described.append(" -> ".join(loop) + "\n      " + "\n      ".join(hops))
    assert not loops, "import cycles among zeromega modules:\n  " + "\n  ".join(described)


def test_config_imports_nothing_else_of_zeromega():
    known, found = _graph()
    outside = sorted({_where(found, a, b) for a, b, _, _ in found
                      if layer(a) == 0 and a.startswith("zeromega.config")
                      and not (b == "zeromega.config" or b.startswith("zeromega.config."))})
    assert not outside, "zeromega.config must import nothing else of zeromega:\n  " + "\n  ".join(outside)


def _upward():
    known, found = _graph()
    upward = {}
    for importer, imported, _, _ in found:
        target = _known(imported, known)
        if importer in EXEMPT or target in EXEMPT:
            continue
        low, high = layer(importer), layer(target)
        if low is not None and high is not None and high > low:
            upward[(importer, target)] = _where(found, importer, target)
    return upward


def test_no_upward_imports():
    upward = _upward()
    offenders = sorted(text for pair, text in upward.items() if pair not in KNOWN_UPWARD)
    order = " -> ".join(prefixes[0].split(".")[1] for prefixes in LAYERS)
    assert not offenders, f"imports pointing up the layers ({order}):\n  " + "\n  ".join(offenders)


def test_known_upward_imports_still_exist():
    """An entry fixed in its file is removed from KNOWN_UPWARD, so the exemption cannot hide a new one."""
    gone = sorted(f"{a} -> {b}" for a, b in KNOWN_UPWARD - set(_upward()))
    assert not gone, f"KNOWN_UPWARD lists imports that are gone; remove them: {gone}"


def test_the_root_facade_names_modules_that_exist():
    """``zeromega/__init__.py`` imports its public names lazily, by string: each must name a real module."""
    import zeromega

    known = modules()
    missing = sorted(f"{name}: {module}" for name, (module, _) in zeromega._EXPORTS.items() if module not in known)
    assert not missing, f"zeromega._EXPORTS names modules that do not exist: {missing}"
