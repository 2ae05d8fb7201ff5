"""Muon (Keller Jordan; Moonlight): momentum, then orthogonalise the update of each 2-D weight matrix.

Per matrix W (rows x cols) with gradient g, for one optimizer step:

    buf <- beta buf + (1 - beta) g                          momentum (EMA form)
    u   <- (1 - beta) g + beta buf   if nesterov else buf   Nesterov look-ahead
    O   <- NS_k(u)   (or the exact polar factor when use_svd)
    W   <- W (1 - lr wd) - lr scale(rows, cols) O           decoupled weight decay

O has singular values ~1, so its RMS is ~1/sqrt(max(rows, cols)) whatever the gradient's size. The
shape scale puts that back on a known footing:
  match_adamw_rms (Moonlight): 0.2 sqrt(max(rows, cols)) -> update RMS ~0.2, the RMS of a typical AdamW
      update, so an AdamW learning rate (the spec's 1e-3) means the same step size here;
  keller: sqrt(max(1, rows / cols)) -> Keller's scaling, which wants lr ~0.02.
"""
from __future__ import annotations

import math

import torch

from forge.optim.metrics import effective_rank_fraction, ortho_error, sample_indices
from forge.optim.newton_schulz import DTYPES, orthogonalize


def update_scale(rows: int, cols: int, scaling: str) -> float:
    """The shape-based multiplier of the orthogonalised update (see the module docstring)."""
    if scaling == "match_adamw_rms":
        return 0.2 * math.sqrt(max(rows, cols))
    if scaling == "keller":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"unknown Muon scaling {scaling!r} (valid: match_adamw_rms, keller)")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Every hyperparameter is per group and comes from [optim.muon]."""

    def __init__(self, param_groups: list[dict], *, lr: float, weight_decay: float, beta: float, nesterov: bool,
                 ns_steps: int, use_svd: bool, scaling: str, ns_dtype: str):
        defaults = dict(lr=lr, weight_decay=weight_decay, beta=beta, nesterov=nesterov, ns_steps=ns_steps,
                        use_svd=use_svd, scaling=scaling, ns_dtype=ns_dtype)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, collect_metrics: bool = False) -> dict[str, torch.Tensor]:
        """One Muon update of every parameter with a gradient.

        With collect_metrics, returns optim/ortho_error and optim/effective_rank averaged over a few
        sampled matrices' orthogonalised updates (before the shape scale); else an empty dict.
        """
        n_matrices = sum(p.grad is not None for group in self.param_groups for p in group["params"])
        keep = set(sample_indices(n_matrices)) if collect_metrics else set()
        sampled: list[torch.Tensor] = []
        index = 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self._momentum_buffer(p) for p in params]
            beta = group["beta"]
            torch._foreach_lerp_(bufs, grads, 1.0 - beta)
            updates = torch._foreach_lerp(grads, bufs, beta) if group["nesterov"] else bufs
            if group["weight_decay"] != 0.0:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            for p, u in zip(params, updates):
                o = orthogonalize(u, group["ns_steps"], group["use_svd"], DTYPES[group["ns_dtype"]])
                if index in keep:
                    sampled.append((o, u))
                index += 1
                p.add_(o, alpha=-group["lr"] * update_scale(p.size(0), p.size(1), group["scaling"]))
        if not sampled:
            return {}
        return {"optim/ortho_error": torch.stack([ortho_error(o, u) for o, u in sampled]).mean(),
                "optim/effective_rank": torch.stack([effective_rank_fraction(o) for o, _ in sampled]).mean()}

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]
