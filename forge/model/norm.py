"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-channel gain (1-D, so the
optimizer routes it to AdamW)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, fused where the backend has a kernel; that kernel wants the weight
        # in x's dtype (a bf16 input under autocast, e.g. the memory path, would otherwise take the slow path)
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
