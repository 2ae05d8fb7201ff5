"""build_optimizer(spec.optim, model): route the parameters, then build Muon, AdamW and Grokfast from the spec."""
from __future__ import annotations

import torch
from torch import nn

from forge.errors import ForgeError
from forge.optim.grokfast import GrokfastFilter
from forge.optim.muon import Muon
from forge.optim.optimizer import MuonGrokfast
from forge.optim.routing import GroupPlan, route_parameters
from forge.spec.optim import OptimSpec


def build_optimizer(spec: OptimSpec, model: nn.Module, precision=None) -> MuonGrokfast:
    """The optimizer of a run, every number from [optim]; `precision` (forge.train.precision.Precision, None =
    fp32) is the precision the run's step computes in, which optim.muon.ns_dtype = "auto" follows.

    optim.name = "muon_grokfast": Muon for hidden matrices, AdamW for the rest, Grokfast on every
    gradient when [optim.grokfast] enabled. optim.name = "adamw": torch AdamW for everything, no Muon,
    no Grokfast (the baseline). kl_coefficient / ste_mode are later phases' and change nothing here.
    """
    plans = route_parameters(spec, model)
    muon_plans = [g for g in plans if g.kind == "muon"]
    adamw_plans = [g for g in plans if g.kind == "adamw"]
    muon = None
    if muon_plans:
        m = spec.muon
        ns_dtype = _ns_dtype(m.ns_dtype, muon_plans[0].params[0].device, precision)
        muon = Muon([_torch_group(g) for g in muon_plans], lr=spec.lr, weight_decay=spec.weight_decay, beta=m.beta,
                    nesterov=m.nesterov, ns_steps=m.ns_steps, use_svd=m.use_svd, scaling=m.scaling,
                    ns_dtype=ns_dtype, shard=m.shard_newton_schulz)
    adamw = None
    if adamw_plans:
        a = spec.adamw
        adamw = torch.optim.AdamW([_torch_group(g) for g in adamw_plans], lr=spec.lr, betas=tuple(a.betas),
                                  eps=a.eps, weight_decay=a.weight_decay, foreach=True)
    grokfast = None
    if spec.recipe.grokfast and spec.grokfast.enabled:
        params = [p for g in muon_plans + adamw_plans for p in g.params]
        grokfast = GrokfastFilter(params, spec.grokfast.alpha, spec.grokfast.lam)
    return MuonGrokfast(muon, adamw, grokfast, spec.grad_clip)


def _ns_dtype(setting: str, device: torch.device, precision) -> str:
    """optim.muon.ns_dtype resolved: auto -> bf16 where the run computes in native bf16, else fp32; an explicit
    bf16 is refused where the device only emulates bf16 (checked on real devices, not on meta)."""
    if setting == "auto":
        return "bf16" if precision is not None and precision.name == "bf16" and precision.bf16_native else "fp32"
    if setting == "bf16" and device.type != "meta":
        from forge.train.precision import resolve_precision

        here = resolve_precision("bf16", device)
        if not here.bf16_native:
            raise ForgeError(f"optim.muon.ns_dtype = 'bf16' on a device without native bf16 ({here.describe()}): "
                             "set [optim.muon] ns_dtype = \"auto\" (or \"fp32\")")
    return setting


def _torch_group(plan: GroupPlan) -> dict:
    return {"params": plan.params, "name": plan.name, "lr": plan.lr, "base_lr": plan.lr,
            "weight_decay": plan.weight_decay}
