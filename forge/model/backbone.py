"""The transformer pieces of the backbone and of the TRM refiner: SwiGLU feed-forward and the pre-norm block
x + attn(norm(x)), then x + ffn(norm(x))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forge.model.attention import Attention
from forge.model.norm import RMSNorm
from forge.model.rope import RopeTables
from forge.model.window import AttentionPattern


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, pattern: AttentionPattern, norm_eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_heads, pattern)
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = SwiGLU(d_model, ffn_hidden)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.ffn(self.ffn_norm(x))
