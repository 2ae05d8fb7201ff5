"""MAG gate (Titans memory-as-gating): blend the attention path y and the memory path m per token and
channel, out = g * y + (1 - g) * m with g = sigmoid(MLP([y; m])). Both paths are RMS-normalised first, so
the gate chooses between paths of equal scale rather than by their magnitude.

Two switches for the evaluation's probes (forge/train/evaluate.py): `attention_only(gate)` forces g = 1
(the memory path removed: what the memory contributes), `observe(gate)` accumulates how the gate
discriminates (GateStats)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from forge.model.norm import RMSNorm

DECIDED = (0.1, 0.9)   # a gate value outside this interval has chosen a path


class GateStats:
    """Running sums over every gate value g (tokens x channels) of the forwards it observes.

    token_spread    mean over channels of the std over tokens of g: how much the choice depends on the token
                    (a per-token mean over channels would cancel channels moving in opposite directions)
    channel_spread  std over channels of each channel's mean g: a static split between channels
    decided_share   share of gate values outside [0.1, 0.9]
    An undecided gate (g = 0.5 everywhere) reads 0, 0, 0."""

    def __init__(self):
        self.rows = 0
        self.sum: Optional[torch.Tensor] = None
        self.sum_sq: Optional[torch.Tensor] = None
        self.decided = 0
        self.values = 0

    def add(self, g: torch.Tensor) -> None:
        flat = g.detach().flatten(0, -2).double()          # (tokens, channels)
        if self.sum is None:
            self.sum, self.sum_sq = torch.zeros_like(flat[0]), torch.zeros_like(flat[0])
        self.rows += flat.shape[0]
        self.sum += flat.sum(0)
        self.sum_sq += (flat * flat).sum(0)
        self.decided += int(((flat < DECIDED[0]) | (flat > DECIDED[1])).sum())
        self.values += flat.numel()

    def summary(self) -> dict[str, float]:
        """The three spreads; {} when nothing was observed."""
        if not self.rows:
            return {}
        mean = self.sum / self.rows
        var = (self.sum_sq / self.rows - mean * mean).clamp_min(0.0)
        return {"token_spread": float(var.sqrt().mean()), "channel_spread": float(mean.std(unbiased=False)),
                "decided_share": self.decided / self.values}


class MAGGate(nn.Module):
    def __init__(self, d_model: int, hidden: int, norm_eps: float):
        super().__init__()
        self.norm_y = RMSNorm(d_model, norm_eps)
        self.norm_m = RMSNorm(d_model, norm_eps)
        self.up = nn.Linear(2 * d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.force_attention = False            # g = 1: the memory path removed (attention_only)
        self.stats: Optional[GateStats] = None  # accumulates g while set (observe)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (blended output, gate g in (0, 1) shaped like y, mean gate entropy in nats)."""
        y, m = self.norm_y(y), self.norm_m(m)
        if self.force_attention:                  # g = 1 exactly: the attention path alone, entropy 0
            g, out, entropy = torch.ones_like(y), y, y.new_zeros(())
        else:
            logits = self.down(F.silu(self.up(torch.cat([y, m], dim=-1))))
            g = torch.sigmoid(logits)
            out, entropy = g * y + (1 - g) * m, binary_entropy(logits)
        if self.stats is not None:
            self.stats.add(g)
        return out, g, entropy


@contextlib.contextmanager
def attention_only(gate: MAGGate) -> Iterator[None]:
    """Within the block the gate passes the attention path alone (g = 1): the model without its memory."""
    gate.force_attention = True
    try:
        yield
    finally:
        gate.force_attention = False


@contextlib.contextmanager
def observe(gate: MAGGate) -> Iterator[GateStats]:
    """Within the block every gate value g is accumulated into the GateStats yielded."""
    gate.stats = stats = GateStats()
    try:
        yield stats
    finally:
        gate.stats = None


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of g = sigmoid(logits) in nats: ln 2 when undecided, 0 when saturated.
    From the logits, -g log g - (1-g) log(1-g) = g softplus(-a) + (1-g) softplus(a): finite value and
    gradient even where g rounds to exactly 0 or 1 (the form in g gives inf * 0 = NaN there)."""
    g = torch.sigmoid(logits)
    return (g * F.softplus(-logits) + (1 - g) * F.softplus(logits)).mean()
