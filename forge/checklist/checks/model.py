"""Model checks (B1 budget overrun): measured on the real model built from the spec, never estimated."""
from __future__ import annotations

from forge.checklist.context import CheckContext
from forge.checklist.registry import Outcome, failed, passed, register


@register("param_budget")
def param_budget(ctx: CheckContext, target: int, tolerance: int) -> Outcome:
    """B1: the model built from [model] (on the meta device: no weights allocated) has target +/- tolerance
    parameters, the tied embedding / LM head counted once. data = the per-component breakdown."""
    from forge.model import build_model, count_parameters

    counts = ctx.cached("model:param_counts", lambda: count_parameters(
        ctx.cached("meta_model", lambda: build_model(ctx.spec.model, ctx.spec.objective, device="meta"))))
    total = counts["total"]
    table = ", ".join(f"{name} {_short(n)}" for name, n in counts.items() if name != "total" and n)
    measured = f"{total:,} ({total / 1e6:.2f}M)"
    expected = f"{target:,} +/- {tolerance:,}"
    if abs(total - target) > tolerance:
        side = "over" if total > target else "under"
        return failed(measured, expected, f"{abs(total - target):,} {side} target; {table}", data=counts)
    return passed(measured, expected, table, data=counts)


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}K"
