"""Phase 2 merge preview: interpolate two sets of weights of the same model (G1 merge compatibility).

SLERP treats each tensor as one vector and interpolates along the great circle between the two
parents (magnitudes interpolated linearly), falling back to linear interpolation when the two are
nearly parallel. Merging is only defined between weights of the same spec (same shapes).
"""
from __future__ import annotations

import torch

from forge.errors import ForgeError


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    va, vb = a.flatten().double(), b.flatten().double()
    na, nb = va.norm(), vb.norm()
    if na < eps or nb < eps:
        return torch.lerp(a.double(), b.double(), t).to(a.dtype)
    ua, ub = va / na, vb / nb
    cos = torch.clamp(ua @ ub, -1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:  # nearly parallel: slerp -> lerp, and avoids 0/0
        return torch.lerp(a.double(), b.double(), t).to(a.dtype)
    so = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) / so) * ua + (torch.sin(t * omega) / so) * ub
    return (direction * ((1 - t) * na + t * nb)).view_as(a).to(a.dtype)


def merge_state_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], method: str,
                      t: float) -> dict[str, torch.Tensor]:
    if a.keys() != b.keys():
        raise ForgeError(f"cannot merge: parameter sets differ ({sorted(a.keys() ^ b.keys())[:5]})")
    out = {}
    for name, ta in a.items():
        tb = b[name]
        if ta.shape != tb.shape:
            raise ForgeError(f"cannot merge {name}: shapes {tuple(ta.shape)} and {tuple(tb.shape)} differ")
        if not ta.is_floating_point():
            out[name] = ta.clone()
        elif method == "slerp":
            out[name] = slerp(ta, tb, t)
        else:
            out[name] = torch.lerp(ta, tb.to(ta.dtype), t)
    return out
