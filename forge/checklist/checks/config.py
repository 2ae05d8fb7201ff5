"""Configuration checks (G2: a config reused or half-filled is a silent failure)."""
from __future__ import annotations

import math
from typing import Any

from forge.checklist.context import CheckContext
from forge.checklist.registry import Outcome, failed, passed, register


def flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Dotted leaves of a nested dict; lists are leaves (they are replaced whole, never merged)."""
    if isinstance(tree, dict) and tree:
        out: dict[tuple, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, (*prefix, key)))
        return out
    return {prefix: tree}


def value_at(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@register("config_complete")
def config_complete(ctx: CheckContext, sections: list[str]) -> Outcome:
    """Every required section is written in the spec files (not left to schema defaults)."""
    origins = ctx.resolved.origins
    missing = [s for s in sections if (s,) not in origins]
    leaves = flatten(ctx.spec.model_dump(mode="json", exclude_none=True))
    defaulted = sorted(".".join(map(str, k)) for k in leaves if k not in origins)
    measured = f"{len(sections) - len(missing)}/{len(sections)} sections; {len(leaves) - len(defaulted)} keys set"
    detail = f"from schema defaults: {', '.join(defaulted)}" if defaulted else "every key set in the spec files"
    if missing:
        return failed(measured, "all sections present", f"missing sections: {', '.join(missing)}")
    return passed(measured, "all sections present", detail)


@register("spec_values")
def spec_values(ctx: CheckContext, expected: dict[str, Any], mitigations: dict[str, list] | None = None) -> Outcome:
    """The spec carries the design's values for these keys. A value listed in `mitigations` (the
    design's documented fallback, e.g. Grokfast lam 0.1 for D1) is accepted with a warning, so a spec
    patched by forge diagnose still launches, and says so."""
    mitigations = mitigations or {}
    data = ctx.spec.model_dump(mode="json")
    wrong, fallback = [], []
    for key, want in expected.items():
        got = value_at(data, key)
        if same(got, want):
            continue
        if any(same(got, alt) for alt in mitigations.get(key, [])):
            fallback.append(f"{key}={got!r} (design: {want!r}; documented mitigation)")
        else:
            wrong.append(f"{key}={got!r} (design: {want!r})")
    want_text = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in expected.items())
    if wrong:
        return failed("; ".join(wrong + fallback), want_text, f"{len(wrong)} of {len(expected)} differ from the design")
    if fallback:
        return Outcome("warn", "; ".join(fallback), want_text, "a mitigation of the design is in use")
    return passed(f"{len(expected)}/{len(expected)} match", want_text)
