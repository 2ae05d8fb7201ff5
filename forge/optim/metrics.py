"""Diagnostics of the orthogonalised update, computed from real tensors at logging steps only (F1).

Both need an extra matmul or an SVD per matrix, so the optimizer evaluates them on a few sampled
matrices, and only on steps where the trainer asks for metrics.
"""
from __future__ import annotations

import torch

SAMPLED_MATRICES = 4      # Muon matrices evaluated per logging step (evenly spaced over the group)
RANK_THRESHOLD = 0.01     # a singular value counts towards the effective rank above 1% of the largest


def ortho_error(update: torch.Tensor) -> torch.Tensor:
    """||O O^T - I||_F on the wide orientation of O (0 for an exact polar factor of a full-rank matrix).

    D2 monitor: a Newton-Schulz iteration that diverges or stalls shows up here first.
    """
    o = update.float()
    if o.size(0) > o.size(1):
        o = o.T
    eye = torch.eye(o.size(0), dtype=o.dtype, device=o.device)
    return torch.linalg.matrix_norm(o @ o.T - eye)


def effective_rank_fraction(update: torch.Tensor) -> torch.Tensor:
    """Fraction of singular values above RANK_THRESHOLD x the largest: 1 = the update uses every direction."""
    s = torch.linalg.svdvals(update.float())
    return (s > RANK_THRESHOLD * s.max()).float().mean()


def sample_indices(n: int, k: int = SAMPLED_MATRICES) -> list[int]:
    """k indices spread evenly over range(n) (all of them when n <= k), deterministic across steps."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
