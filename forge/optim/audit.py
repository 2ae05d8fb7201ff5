"""Routing audit (G2): are the optimizer's real groups what the spec and the routing rule say?

Used by the checklist item G2-routing on the real model, and by the tests.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from torch import nn

from forge.optim.build import build_optimizer
from forge.optim.routing import embedding_weight_ids, is_hidden_matrix
from forge.spec.optim import OptimSpec


def audit_routing(spec: OptimSpec, model: nn.Module, vocab_size: int) -> tuple[list[str], dict[str, Any]]:
    """Build the real optimizer for `model` and list every routing problem (empty = correct), with a
    per-group table {group: {optimizer, tensors, elements, lr, weight_decay}}.

    Problems looked for: a trainable parameter in no group or in several; a 1-D parameter, an
    embedding, or any vocab-sized matrix (an untied LM head) outside AdamW or with a weight decay
    other than optim.adamw.weight_decay; a hidden matrix outside Muon (muon_grokfast) or with a weight
    decay other than optim.weight_decay.
    """
    opt = build_optimizer(spec, model)
    muon_groups = {id(g) for g in opt.muon.param_groups} if opt.muon is not None else set()
    kind_of_group = {id(g): "muon" if id(g) in muon_groups else "adamw" for g in opt.param_groups}
    seen = Counter(id(p) for g in opt.param_groups for p in g["params"])
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    embedding_ids = embedding_weight_ids(model)
    problems = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if seen[id(p)] != 1:
            problems.append(f"{name} is in {seen[id(p)]} groups (must be exactly 1)")
            continue
        group = group_of[id(p)]
        kind = kind_of_group[id(group)]
        if is_hidden_matrix(p, embedding_ids) and vocab_size not in p.shape:
            want_kind = spec.recipe.matrices
            want_wd = spec.weight_decay
        else:
            want_kind, want_wd = "adamw", spec.adamw.weight_decay
        if kind != want_kind:
            problems.append(f"{name} {tuple(p.shape)} is in {kind}, expected {want_kind}")
        elif group["weight_decay"] != want_wd:
            problems.append(f"{name} has weight_decay {group['weight_decay']}, expected {want_wd}")
    table = {g["name"]: {"optimizer": kind_of_group[id(g)], "tensors": len(g["params"]),
                         "elements": sum(p.numel() for p in g["params"]), "lr": g["lr"],
                         "weight_decay": g["weight_decay"]}
             for g in opt.param_groups}
    return problems, table
