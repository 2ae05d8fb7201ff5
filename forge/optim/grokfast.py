"""Grokfast (Lee et al. 2024): amplify the slow component of the gradient (D1 when lam is too large).

    g_ema <- alpha g_ema + (1 - alpha) g        (the EMA starts at the first gradient)
    g     <- g + lam g_ema

Applied in place to p.grad, exactly once per optimizer step: after gradient accumulation and after the
data-parallel all-reduce, so the EMA sees the gradient of the whole batch and stays identical on every
rank. (Not per micro-batch; not from backward hooks, which fire before the reduce.)
"""
from __future__ import annotations

from typing import Any

import torch


class GrokfastFilter:
    """EMA gradient filter over a fixed, ordered list of parameters."""

    def __init__(self, params: list[torch.nn.Parameter], alpha: float, lam: float):
        self.params = params
        self.alpha = alpha
        self.lam = lam
        self.ema: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def apply_(self) -> None:
        """Update the EMA from the current gradients and add lam * EMA to them, in place."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        started = [i for i in live if self.ema[i] is not None]
        for i in live:
            if self.ema[i] is None:  # first gradient of this parameter: the EMA starts at it
                self.ema[i] = self.params[i].grad.detach().clone()
        if started:
            torch._foreach_lerp_([self.ema[i] for i in started], [self.params[i].grad for i in started],
                                 1.0 - self.alpha)
        if live and self.lam != 0.0:
            torch._foreach_add_([self.params[i].grad for i in live], [self.ema[i] for i in live], alpha=self.lam)

    @torch.no_grad()
    def ema_norm(self) -> torch.Tensor:
        """L2 norm of the whole EMA (all parameters together); 0 before the first step."""
        emas = [e for e in self.ema if e is not None]
        if not emas:
            return torch.zeros(())
        return torch.nn.utils.get_total_norm(emas)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": [None if e is None else e.clone() for e in self.ema]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema = state["ema"]
        if len(ema) != len(self.params):
            raise ValueError(f"Grokfast state has {len(ema)} entries, the optimizer has {len(self.params)} parameters")
        self.ema = [None if e is None else e.to(device=p.device, dtype=p.dtype).clone()
                    for e, p in zip(ema, self.params)]
