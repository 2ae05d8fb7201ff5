"""ACT halting (C1): a per-token halting logit from the TRM latent z after every outer step.

Training target (per token): "step t's argmax already equals the label" (techniques.md 1, decision: the
reference's per-sequence target is almost never true for text and teaches the head never to halt). Loss:
BCE, weighted by the trainer's act_loss_weight (0 before act.warmup_steps). At evaluation a token uses the
first step whose halting probability exceeds halt_thresh, else the last step.

The EMA of each step's token accuracy (ema_teacher) is model state: a persistent buffer `ema_acc`
(t_max,) with its update count `ema_updates`, so it is saved and restored with the state dict.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# TRM reference initialisation (weight 0, bias -5): halting probability ~0.007, so nothing halts before the
# head has learned when predictions are right.
HALT_INIT_BIAS = -5.0


class HaltingHead(nn.Module):
    def __init__(self, d_model: int, t_max: int, ema_teacher: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_model))       # 1-D: routed to AdamW
        self.bias = nn.Parameter(torch.full((1,), HALT_INIT_BIAS))
        self.ema_teacher = ema_teacher
        self.register_buffer("ema_acc", torch.zeros(t_max))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, T, d) -> halting logits (B, T)."""
        return z @ self.weight + self.bias

    @torch.no_grad()
    def update_ema(self, step_accuracy: torch.Tensor) -> None:
        """Fold this batch's per-step token accuracy (t_max,) into the EMA; the first batch sets it."""
        beta = (self.ema_updates > 0).to(self.ema_acc.dtype) * self.ema_teacher   # no host sync
        self.ema_acc.copy_(beta * self.ema_acc + (1 - beta) * step_accuracy)
        self.ema_updates += 1


def halting_loss(halt_logits: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor,
                 n_valid: torch.Tensor) -> torch.Tensor:
    """BCE between halting logits and the "already correct" target, summed over valid tokens / n_valid (the
    caller's token count: this batch's, or under data parallelism the global count / world size)."""
    per_token = F.binary_cross_entropy_with_logits(halt_logits, correct.to(halt_logits.dtype), reduction="none")
    return (per_token * valid).sum() / n_valid
