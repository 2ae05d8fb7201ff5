"""Parameter routing (G2): which optimizer, lr and weight decay each parameter gets.

Every 2-D parameter that is not an nn.Embedding weight is a hidden matrix -> Muon. The embedding (and
the LM head tied to it: the same Parameter), every 1-D parameter (norm gains, biases) and scalars ->
AdamW. With optim.name = "adamw" the hidden matrices go to AdamW too, keeping the Muon group's lr and
weight decay, so the baseline differs from MuonGrokfast only in the update rule.

Each trainable parameter lands in exactly one group; lr_overrides split a group by parameter-name
substring (e.g. match = "q_proj", scale = 0.5 puts W_Q at half lr).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from forge.errors import ForgeError
from forge.spec.optim import OptimSpec


@dataclass
class GroupPlan:
    name: str                   # "muon", "adamw", "adamw_matrices"; ":<match>" when an lr override applies
    kind: str                   # the optimizer that updates it: "muon" or "adamw"
    lr: float
    weight_decay: float
    params: list[nn.Parameter] = field(default_factory=list)


def embedding_weight_ids(model: nn.Module) -> set[int]:
    """ids of every nn.Embedding weight (a tied LM head is the same Parameter, so it is covered)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def is_hidden_matrix(param: torch.Tensor, embedding_ids: set[int]) -> bool:
    return param.ndim == 2 and id(param) not in embedding_ids


def route_parameters(spec: OptimSpec, model: nn.Module) -> list[GroupPlan]:
    """The optimizer groups of `model` under `spec`, in a deterministic order; empty groups are dropped."""
    embedding_ids = embedding_weight_ids(model)
    matrix_kind = spec.recipe.matrices
    base = {
        "matrix": GroupPlan("muon" if matrix_kind == "muon" else "adamw_matrices", matrix_kind,
                            spec.lr, spec.weight_decay),
        "other": GroupPlan("adamw", "adamw", spec.lr if spec.adamw.lr is None else spec.adamw.lr,
                           spec.adamw.weight_decay),
    }
    groups: dict[tuple[str, int], GroupPlan] = {}
    hits = [0] * len(spec.lr_overrides)
    for name, param in model.named_parameters():  # named_parameters() yields a tied Parameter once
        if not param.requires_grad:
            continue
        role = "matrix" if is_hidden_matrix(param, embedding_ids) else "other"
        override = _override_for(spec, name)
        key = (role, override)
        if key not in groups:
            plan = base[role]
            if override < 0:
                groups[key] = GroupPlan(plan.name, plan.kind, plan.lr, plan.weight_decay)
            else:
                rule = spec.lr_overrides[override]
                groups[key] = GroupPlan(f"{plan.name}:{rule.match}", plan.kind, plan.lr * rule.scale,
                                        plan.weight_decay)
        if override >= 0:
            hits[override] += 1
        groups[key].params.append(param)
    unused = [i for i, n in enumerate(hits) if n == 0]
    if unused:
        example = next(iter(dict(model.named_parameters())), "(none)")
        raise ForgeError("; ".join(f"optim.lr_overrides[{i}].match = {spec.lr_overrides[i].match!r} matches no "
                                   f"trainable parameter" for i in unused)
                         + f" (parameter names look like {example!r}); fix or remove it in [[optim.lr_overrides]]")
    if not groups:
        raise ForgeError("the model has no trainable parameters to optimize")
    return sorted(groups.values(), key=lambda g: (g.kind != "muon", g.name))


def _override_for(spec: OptimSpec, name: str) -> int:
    """Index of the lr override whose substring occurs in `name`, -1 for none; two matches are an error."""
    matches = [i for i, rule in enumerate(spec.lr_overrides) if rule.match in name]
    if len(matches) > 1:
        rules = ", ".join(f"optim.lr_overrides[{i}].match = {spec.lr_overrides[i].match!r}" for i in matches)
        raise ForgeError(f"parameter {name!r} matches several lr overrides ({rules}); make the substrings disjoint")
    return matches[0] if matches else -1

