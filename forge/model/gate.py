"""MAG gate (Titans memory-as-gating): blend the attention path y and the memory path m per token and
channel, out = g * y + (1 - g) * m with g = sigmoid(MLP([y; m])). Both paths are RMS-normalised first, so
the gate chooses between paths of equal scale rather than by their magnitude."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forge.model.norm import RMSNorm


class MAGGate(nn.Module):
    def __init__(self, d_model: int, hidden: int, norm_eps: float):
        super().__init__()
        self.norm_y = RMSNorm(d_model, norm_eps)
        self.norm_m = RMSNorm(d_model, norm_eps)
        self.up = nn.Linear(2 * d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (blended output, gate g in (0, 1) shaped like y, mean gate entropy in nats)."""
        y, m = self.norm_y(y), self.norm_m(m)
        logits = self.down(F.silu(self.up(torch.cat([y, m], dim=-1))))
        g = torch.sigmoid(logits)
        return g * y + (1 - g) * m, g, binary_entropy(logits)


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of g = sigmoid(logits) in nats: ln 2 when undecided, 0 when saturated.
    From the logits, -g log g - (1-g) log(1-g) = g softplus(-a) + (1-g) softplus(a): finite value and
    gradient even where g rounds to exactly 0 or 1 (the form in g gives inf * 0 = NaN there)."""
    g = torch.sigmoid(logits)
    return (g * F.softplus(-logits) + (1 - g) * F.softplus(logits)).mean()
