"""What a person looks at: the loss plot, the comparison sheets, the progress animation, the
progress bar and ``render --alpha``; and the layering of the modules that write them."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(module: str) -> set[str]:
    """The microdr modules that ``microdr/<module>.py`` imports anywhere (TYPE_CHECKING too)."""
    tree = ast.parse((REPO / "microdr" / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.add(node.module or "")
    return names


def test_outputs_and_result_import_only_lower_layers():
    """The files of a run are written from its records; the loop is above both (no cycle)."""
    assert "optimize" in _imported_modules("cli")
    for module in ("outputs", "result"):
        assert not _imported_modules(module) & {"optimize", "cli"}, module
