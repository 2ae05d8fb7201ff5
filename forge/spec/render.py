"""Spec as text: the resolved spec as TOML, and the key-by-key difference of two specs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forge.spec.load import ResolvedSpec

MISSING = object()


def resolved_toml(resolved: ResolvedSpec) -> str:
    """The fully resolved spec as TOML, headed by its lineage and hash (loads back to the same spec)."""
    import tomlkit

    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"resolved from: {' -> '.join(p.name for p in resolved.chain)}"))
    for assignment in resolved.overrides:
        doc.add(tomlkit.comment(f"--set {assignment}"))
    doc.add(tomlkit.comment(f"sha256: {resolved.hash}"))
    doc.add(tomlkit.nl())
    for key, value in resolved.spec.model_dump(mode="json", exclude_none=True).items():
        doc.add(key, value)
    return tomlkit.dumps(doc)


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Every scalar of a nested dict/list by dotted key (list entries by index: data.sources.0.name)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(x, (dict, list)) for x in tree):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def spec_diff(a: ResolvedSpec, b: ResolvedSpec) -> list[Change]:
    """Keys whose value differs from a to b (MISSING where a key exists on one side only)."""
    left = leaves(a.spec.model_dump(mode="json", exclude_none=True))
    right = leaves(b.spec.model_dump(mode="json", exclude_none=True))
    keys = list(left) + [k for k in right if k not in left]
    return [Change(k, left.get(k, MISSING), right.get(k, MISSING))
            for k in keys if left.get(k, MISSING) != right.get(k, MISSING)]
