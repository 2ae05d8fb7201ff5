"""ACT halting (C1): a per-token halting logit after every outer step, read from the TRM latent z_t
(act.head_input = "latent") or from the answer state y_t ("answer", as the TRM reference's Q head).

Training target (per token): "step t's argmax already equals the label" (techniques.md 1, decision: the
reference's per-sequence target is almost never true for text and teaches the head never to halt). Loss:
BCE, weighted by the trainer's act_loss_weight (0 before act.warmup_steps). At evaluation a token uses the
first step whose halting probability exceeds halt_thresh, else the last step.

The EMA of each step's token accuracy (ema_teacher) is model state: a persistent buffer `ema_acc`
(t_max,) with its update count `ema_updates`, so it is saved and restored with the state dict.

EMA calibration (act.ema_gain_tol = tol set): the target of step t < t_max - 1 becomes

    correct_t  AND  gain_t < tol,     gain_t = max_{s > t} ema_acc[s] - ema_acc[t]

i.e. a token should halt at step t when it is already right and the later steps, on the EMA of recent
batches, add less than tol accuracy: where recursion helps, the head is taught to continue; where it does
not, halting early costs nothing and the head is taught to halt. The last step keeps "correct". Before the
first EMA update ema_acc is 0, so gain_t = 0 and the target is "correct".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# TRM reference initialisation (weight 0, bias -5): halting probability ~0.007, so nothing halts before the
# head has learned when predictions are right.
HALT_INIT_BIAS = -5.0


class HaltingHead(nn.Module):
    def __init__(self, d_model: int, t_max: int, ema_teacher: float, ema_gain_tol: Optional[float]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_model))       # 1-D: routed to AdamW
        self.bias = nn.Parameter(torch.full((1,), HALT_INIT_BIAS))
        self.ema_teacher, self.ema_gain_tol = ema_teacher, ema_gain_tol
        self.register_buffer("ema_acc", torch.zeros(t_max))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """state (B, T, d) -> halting logits (B, T)."""
        return state @ self.weight + self.bias

    @torch.no_grad()
    def update_ema(self, step_accuracy: torch.Tensor) -> None:
        """Fold this batch's per-step token accuracy (t_max,) into the EMA; the first batch sets it."""
        beta = (self.ema_updates > 0).to(self.ema_acc.dtype) * self.ema_teacher   # no host sync
        self.ema_acc.copy_(beta * self.ema_acc + (1 - beta) * step_accuracy)
        self.ema_updates += 1

    @torch.no_grad()
    def later_gain(self) -> torch.Tensor:
        """(t_max,): gain_t = max over later steps of ema_acc minus ema_acc[t]; 0 at the last step."""
        later_best = torch.cat([self.ema_acc.flip(0).cummax(0).values.flip(0)[1:], self.ema_acc[-1:]])
        return later_best - self.ema_acc

    def target(self, correct: torch.Tensor, t: int) -> torch.Tensor:
        """The halting target of outer step t (B, T) bool, from the step's per-token correctness."""
        if self.ema_gain_tol is None:
            return correct
        return correct & (self.later_gain()[t] < self.ema_gain_tol)


def halting_loss(halt_logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                 n_valid: torch.Tensor) -> torch.Tensor:
    """BCE between halting logits and the halting target (HaltingHead.target), summed over valid tokens /
    n_valid (the caller's token count: this batch's, or under data parallelism the global count / world size)."""
    per_token = F.binary_cross_entropy_with_logits(halt_logits, target.to(halt_logits.dtype), reduction="none")
    return (per_token * valid).sum() / n_valid
