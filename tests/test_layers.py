"""The package's layers (README, "Layout"): each module imports only modules of its own layer or
those below it, and no two modules import each other at import time (no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "microdr"

#: Bottom to top; a module's layer is the first prefix of its dotted name listed.
LAYERS = (
    ("errors", "defaults", "conventions", "__init__"),
    ("io",),
    ("view",),
    ("raster",),
    ("render", "verify"),
    ("optimize",),
    ("cli", "__main__"),
)

#: Imports that go both ways inside a layer, each made inside a function (README, "Layout").
LAZY_BOTH_WAYS = {("io.scene", "io.camera_files"), ("io.mesh", "io.materials")}


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name below ``microdr`` (``io.scene``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _layer(module: str) -> int:
    first = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if first in names)


def _imports(module: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The package modules ``module`` imports: ``(at import time, inside functions)``."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    top, nested = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level:
                base = package[: len(package) - (child.level - 1)]
                target = ".".join(base + ([child.module] if child.module else []))
                names = [target] if child.module else []
                names += [f"{target}.{alias.name}".lstrip(".") for alias in child.names]
                found = {name for name in names if name in modules}
                (nested if inner else top).update(found)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return top - {module}, nested - {module}


def test_every_module_imports_only_its_layer_and_those_below():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        top, nested = _imports(module, path, modules)
        for imported in top | nested:
            if _layer(imported) > _layer(module):
                wrong.append(f"{module} imports {imported}")
    assert not wrong
    assert _layer("optimize.loop") > _layer("render") > _layer("raster.kernels") > _layer("io.scene")


def test_no_import_cycles_and_only_the_stated_lazy_pairs():
    modules = _modules()
    graph = {module: _imports(module, path, modules) for module, path in modules.items()}
    both_ways = {
        tuple(sorted((a, b)))
        for a, (top, nested) in graph.items()
        for b in top | nested
        if a in graph[b][0] | graph[b][1] and not (a.startswith(b + ".") or b.startswith(a + "."))
    }
    assert both_ways == {tuple(sorted(pair)) for pair in LAZY_BOTH_WAYS}
    for a, b in LAZY_BOTH_WAYS:  # one direction of each pair is inside a function
        assert b not in graph[a][0] or a not in graph[b][0]

    # No cycle among import-time edges (a package's __init__ aside: it runs before its modules).
    state: dict[str, int] = {}

    def walk(module: str, trail: list[str]) -> None:
        state[module] = 1
        for imported in graph[module][0]:
            if imported.startswith(module + ".") and modules[module].name == "__init__.py":
                continue
            assert state.get(imported) != 1, " -> ".join(trail + [module, imported])
            if imported not in state:
                walk(imported, trail + [module])
        state[module] = 2

    for module in graph:
        if module not in state:
            walk(module, [])
