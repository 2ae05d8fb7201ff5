"""The layering the architecture guide (docs/architecture.md) promises, checked on the source."""
from __future__ import annotations

import ast
from pathlib import Path

FORGE = Path(__file__).resolve().parents[1] / "forge"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    return names


def test_the_model_knows_nothing_of_training_or_data_parallelism():
    """Collectives and training live outside the model (nanoGPT): forge/model/ computes on its own batch."""
    offending = {str(p.relative_to(FORGE)): sorted(m for m in imported_modules(p)
                                                    if m.split(".")[:2] in (["forge", "distributed"], ["forge", "train"]))
                 for p in sorted((FORGE / "model").rglob("*.py"))}
    assert {p: m for p, m in offending.items() if m} == {}
