"""Optimizer checks (D1-D3, E1, G2)."""
from __future__ import annotations

from forge.checklist.context import CheckContext
from forge.checklist.registry import Outcome, failed, passed, register


@register("optim_routing")
def optim_routing(ctx: CheckContext) -> Outcome:
    """G2 optimizer config reuse: on the real model (meta device) and the real optimizer groups, every
    trainable parameter is in exactly one group; 1-D parameters, the embedding and the tied LM head are
    in AdamW with optim.adamw.weight_decay; hidden matrices in Muon with optim.weight_decay."""
    from forge.model import build_model
    from forge.optim.audit import audit_routing

    spec = ctx.spec
    model = ctx.cached("meta_model", lambda: build_model(spec.model, spec.objective, device="meta"))
    problems, table = audit_routing(spec.optim, model, spec.model.vocab_size)
    measured = ", ".join(f"{name}: {row['tensors']} tensors / {row['elements']:,} params"
                         for name, row in table.items())
    matrices_to = {"muon": "Muon", "adamw": "AdamW"}[spec.optim.recipe.matrices]
    expected = f"each parameter in one group; 1-D + embedding -> AdamW; hidden matrices -> {matrices_to}"
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        return failed(measured, expected, "; ".join(problems[:5]) + more, data=table)
    return passed(measured, expected, data=table)
