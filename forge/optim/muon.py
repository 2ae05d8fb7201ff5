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

Newton-Schulz (the cost) runs same-shape matrices of a group as one batched iteration, in optim.muon.ns_dtype.
Under data parallelism every rank holds the same averaged gradient, so the momenta stay replicated. The
Newton-Schulz iterations either run on every rank for every matrix (replicated), or with
shard=True on one owner rank per matrix (balanced by NS cost), which then broadcasts the updated weight:
the same arithmetic on the same inputs, so the same weights, and momenta that never need gathering.
"""
from __future__ import annotations

import math

import torch

from forge.distributed import initialised
from forge.optim.metrics import effective_rank_fraction, ortho_error, sample_indices
from forge.optim.newton_schulz import DTYPES, orthogonalize


def update_scale(rows: int, cols: int, scaling: str) -> float:
    """The shape-based multiplier of the orthogonalised update (see the module docstring)."""
    if scaling == "match_adamw_rms":
        return 0.2 * math.sqrt(max(rows, cols))
    if scaling == "keller":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"unknown Muon scaling {scaling!r} (valid: match_adamw_rms, keller)")


def _ns_cost(p: torch.Tensor) -> int:
    rows, cols = p.shape
    return rows * cols * min(rows, cols)


def _rank() -> int:
    return torch.distributed.get_rank() if initialised() else 0


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Every hyperparameter is per group and comes from [optim.muon]."""

    def __init__(self, param_groups: list[dict], *, lr: float, weight_decay: float, beta: float, nesterov: bool,
                 ns_steps: int, use_svd: bool, scaling: str, ns_dtype: str, shard: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, beta=beta, nesterov=nesterov, ns_steps=ns_steps,
                        use_svd=use_svd, scaling=scaling, ns_dtype=ns_dtype)
        super().__init__(param_groups, defaults)
        self.shard = shard
        self._owner_map: dict[torch.Tensor, int] | None = None
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
        owners, rank = self._owners(), _rank()
        sends = []
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
            mine = [i for i, p in enumerate(params) if owners.get(p, rank) == rank]
            ortho = dict(zip(mine, orthogonalize([updates[i] for i in mine], group["ns_steps"], group["use_svd"],
                                                 DTYPES[group["ns_dtype"]])))
            for i, (p, u) in enumerate(zip(params, updates)):
                if i in ortho:
                    if index in keep:
                        sampled.append((ortho[i], u))
                    p.add_(ortho[i], alpha=-group["lr"] * update_scale(p.size(0), p.size(1), group["scaling"]))
                if owners:
                    sends.append(torch.distributed.broadcast(p, src=owners[p], async_op=True))
                index += 1
        for work in sends:
            work.wait()
        if not collect_metrics:
            return {}
        stats = torch.zeros(3, dtype=torch.float64)   # sums over the sampled matrices, then their count
        for o, u in sampled:
            stats += torch.stack([ortho_error(o, u).double().cpu(), effective_rank_fraction(o).double().cpu(),
                                  torch.ones((), dtype=torch.float64)])
        if owners:       # the sampled matrices are spread over their owners
            torch.distributed.all_reduce(stats)
        if stats[2] == 0:
            return {}
        return {"optim/ortho_error": (stats[0] / stats[2]).float(), "optim/effective_rank": (stats[1] / stats[2]).float()}

    def _owners(self) -> dict[torch.Tensor, int]:
        """With shard on under torch.distributed: the rank that orthogonalises each matrix, by greedy balance
        of the Newton-Schulz cost (rows x cols x min(rows, cols)), largest first; identical on every rank."""
        if not self.shard or not initialised():
            return {}
        if self._owner_map is not None:
            return self._owner_map
        params = [p for group in self.param_groups for p in group["params"]]
        load = [0] * torch.distributed.get_world_size()
        owners = {}
        for i in sorted(range(len(params)), key=lambda i: (-_ns_cost(params[i]), i)):
            owners[params[i]] = load.index(min(load))
            load[owners[params[i]]] += _ns_cost(params[i])
        self._owner_map = owners
        return owners

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]
