"""Rotary position embedding (RoPE) over the whole head dimension, GPT-NeoX layout (channel i pairs with
channel i + head_dim/2). The tables are computed once per forward and shared by every attention call."""
from __future__ import annotations

import torch

RopeTables = tuple[torch.Tensor, torch.Tensor]


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device | str | None = None) -> RopeTables:
    """cos and sin tables of shape (seq_len, head_dim) for positions 0..seq_len-1."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate x (..., T, head_dim) by position: x * cos + rotate_half(x) * sin."""
    cos, sin = tables
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
