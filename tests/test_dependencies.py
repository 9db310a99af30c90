"""Which part of certseg may import which, checked on every module's imports (AST: function-level and
TYPE_CHECKING imports included), so the layering cannot regress:

    certseg.engine            nothing of certseg outside itself, but for one seam:
                              certseg.engine.runtimes.local_backends -> certseg.export.cache (``--runtime onnx``
                              runs graphs exported from torch weights); inside, its layers (``ENGINE_LAYERS``)
                              import only downwards
    certseg.training          certseg.engine (what makes the shipped weights)
    certseg.export            certseg.engine (exporting, repositories: the deploy layer), and one seam:
                              certseg.export.calibration -> certseg.training.scenes (int8 graphs are calibrated on
                              procedural training scenes, the generator's training seeds)
    certseg.model_repository  certseg.engine (the Triton step models)
    certseg.bench             certseg.engine, certseg.export, certseg.training, certseg.examples

Entry points (console scripts and ``python -m`` modules) may also import certseg.export: ``certseg serve`` builds
its default repository. Nothing imports a ``cli`` module except an entry point, nothing outside the bench imports
the bench, and no import cycle crosses a package boundary.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, set[str]] = {
    "certseg.engine": set(),
    "certseg.training": {"certseg.engine"},
    "certseg.export": {"certseg.engine"},
    "certseg.model_repository": {"certseg.engine"},
    "certseg.bench": {"certseg.engine", "certseg.export", "certseg.training", "certseg.examples"},
    "certseg.examples": set(),
}
"""The other packages each package may import (itself always)."""
ENTRY_POINT_EXTRA = {"certseg.export"}
SEAMS = {("certseg.engine.runtimes.local_backends", "certseg.export.cache"),
         ("certseg.export.calibration", "certseg.training.scenes")}
"""Imports against the package order, each with its reason in this module's docstring."""

Graph = Mapping[str, set[str]]


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def source_modules() -> dict[str, Path]:
    """Every Python file of the distribution (templates included), by the dotted name it has under ``certseg``."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {}
    for package, folder in config["package-dir"].items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            modules[".".join([package, *(p for p in parts if p != "__init__")])] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join([*anchor, *([base] if base else [])])
        yield base
        yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """module -> the certseg modules it imports (an imported name that is a module counts as that module)."""
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        names = {name for node in ast.walk(tree) for name in _imported(node, module, path.name == "__init__.py")}
        graph[module] = {name for name in names if name in modules and name != module}
    return graph


def entry_points(modules: Mapping[str, Path]) -> set[str]:
    """Console scripts (pyproject) and modules meant for ``python -m`` (``__main__``, or a ``__main__`` guard)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    found = {target.split(":")[0] for target in scripts.values()}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        guarded = any(isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) for node in tree.body)
        if module.endswith(".__main__") or guarded:
            found.add(module)
    return found


def direction_violations(graph: Graph, entries: set[str]) -> list[str]:
    problems = []
    for module, targets in graph.items():
        own = package_of(module)
        allowed = ALLOWED[own] | {own} | (ENTRY_POINT_EXTRA if module in entries else set())
        for target in sorted(targets):
            if package_of(target) not in allowed and (module, target) not in SEAMS:
                problems.append(f"{module} imports {target}")
    return problems


def cli_violations(graph: Graph, entries: set[str]) -> list[str]:
    return [f"{module} imports the command line {target}" for module, targets in graph.items() if module not in entries
            for target in sorted(targets) if target.rsplit(".", 1)[-1] == "cli"]


def cycles(graph: Graph) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    found.append(component)
    return found


def test_each_package_imports_only_what_lies_below_it() -> None:
    modules = source_modules()
    assert direction_violations(import_graph(modules), entry_points(modules)) == []


def test_only_entry_points_import_a_command_line_module() -> None:
    modules = source_modules()
    assert cli_violations(import_graph(modules), entry_points(modules)) == []


def test_no_import_cycle_crosses_a_package_boundary() -> None:
    crossing = [sorted(c) for c in cycles(import_graph(source_modules())) if len({package_of(m) for m in c}) > 1]
    assert crossing == []


def test_the_engine_reaches_into_export_only_through_its_seam_and_its_entry_point() -> None:
    modules = source_modules()
    graph = import_graph(modules)
    reaching = {(m, t) for m, targets in graph.items() for t in targets
                if package_of(m) == "certseg.engine" and package_of(t) == "certseg.export"}
    engine_seams = {seam for seam in SEAMS if package_of(seam[0]) == "certseg.engine"}
    assert reaching == engine_seams | {("certseg.engine.commands.cli", "certseg.export.default_repository")}
    assert "certseg.engine.commands.cli" in entry_points(modules)


ENGINE_LAYERS = ("", "maths", "core", "models", "runtimes", "files", "commands")
"""certseg.engine's sub-packages, lowest first ("": its top-level modules: errors, enums, limits, hashes, caches);
a module imports its own layer and those below it only."""


def engine_layer(module: str) -> int:
    parts = module.split(".")
    sub = parts[2] if len(parts) > 3 else ""
    return ENGINE_LAYERS.index(sub) if sub in ENGINE_LAYERS else 0


def layer_violations(graph: Graph) -> list[str]:
    return [f"{module} imports {target}, a layer above it" for module, targets in graph.items()
            if package_of(module) == "certseg.engine" for target in sorted(targets)
            if package_of(target) == "certseg.engine" and engine_layer(target) > engine_layer(module)]


def test_engine_layers_import_only_downwards() -> None:
    assert layer_violations(import_graph(source_modules())) == []


def test_the_code_uses_the_engine_modules_new_names() -> None:
    """The old top-level names (``certseg.engine.moved``) are for callers outside; the code itself uses the new."""
    from certseg.engine.moved import MOVED

    old = {f"certseg.engine.{name}" for name in MOVED}
    users = {}
    for module, path in source_modules().items():
        tree = ast.parse(path.read_text())
        names = {name for node in ast.walk(tree) for name in _imported(node, module, path.name == "__init__.py")}
        if names & old:
            users[module] = sorted(names & old)
    assert users == {}


def test_old_engine_module_names_are_the_moved_modules() -> None:
    import importlib

    from certseg.engine.moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(f"certseg.engine.{old}") is importlib.import_module(f"certseg.engine.{new}")
    from certseg.engine import certify, stages  # the README's and earlier Triton repositories' spellings

    assert certify.certify.__module__ == "certseg.engine.core.certify" and stages.__name__.endswith("maths.stages")


def test_the_checks_catch_what_they_guard_against() -> None:
    graph = {
        "certseg.engine.a": {"certseg.bench.run"},
        "certseg.export.b": {"certseg.bench.cli", "certseg.engine.a"},
        "certseg.engine.runtimes.c": {"certseg.export.b"},
        "certseg.bench.run": set(),
        "certseg.bench.cli": set(),
        "certseg.bench.tool": {"certseg.bench.cli"},
    }
    assert direction_violations(graph, {"certseg.bench.tool"}) == [
        "certseg.engine.a imports certseg.bench.run", "certseg.export.b imports certseg.bench.cli",
        "certseg.engine.runtimes.c imports certseg.export.b"]
    assert cli_violations(graph, {"certseg.bench.tool"}) == [
        "certseg.export.b imports the command line certseg.bench.cli"]
    layered = {"certseg.engine.core.certify": {"certseg.engine.runtimes.session", "certseg.engine.errors"},
               "certseg.engine.errors": {"certseg.engine.maths.stages"}}
    assert layer_violations(layered) == [
        "certseg.engine.core.certify imports certseg.engine.runtimes.session, a layer above it",
        "certseg.engine.errors imports certseg.engine.maths.stages, a layer above it"]
    looped = {"certseg.engine.x": {"certseg.export.y"}, "certseg.export.y": {"certseg.engine.x"},
              "certseg.engine.p": {"certseg.engine.q"}, "certseg.engine.q": {"certseg.engine.p", "certseg.engine.x"}}
    assert sorted(map(sorted, cycles(looped))) == [["certseg.engine.p", "certseg.engine.q"],
                                                   ["certseg.engine.x", "certseg.export.y"]]
