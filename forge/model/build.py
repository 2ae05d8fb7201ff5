"""Build the model from its spec sections, and count its parameters per component (B1 budget)."""
from __future__ import annotations

import torch
from torch import nn

from forge.model.model import CognateModel
from forge.model.norm import RMSNorm
from forge.spec.model import ModelSpec
from forge.spec.objective import ObjectiveSpec

COMPONENTS = ("embedding", "backbone_attention", "backbone_ffn", "memory", "gate", "trm", "act", "norms")


def build_model(spec: ModelSpec, objective: ObjectiveSpec, device: torch.device | str | None = None) -> CognateModel:
    """The Phase 1 model in fp32 on `device` (CPU by default). device="meta" allocates no weights (counting)."""
    with torch.device(device if device is not None else "cpu"):
        return CognateModel(spec, objective)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per component (COMPONENTS) and "total"; the tied embedding / LM head counts once. Every
    RMSNorm gain counts under "norms", wherever the norm sits."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():       # named_parameters yields a shared tensor once
        owner = model.get_submodule(name.rpartition(".")[0])
        counts[_component(name, owner)] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


def _component(name: str, owner: nn.Module) -> str:
    if isinstance(owner, RMSNorm):
        return "norms"
    if name.startswith("tok_emb."):
        return "embedding"
    if name.startswith("blocks."):
        return "backbone_attention" if ".attn." in name else "backbone_ffn"
    for prefix, component in (("memory.", "memory"), ("gate.", "gate"), ("trm.act.", "act"), ("trm.", "trm")):
        if name.startswith(prefix):
            return component
    raise ValueError(f"parameter {name!r} belongs to no budget component; add it to forge.model.build._component")
