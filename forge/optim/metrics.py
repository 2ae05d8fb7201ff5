"""Diagnostics of the orthogonalised update, computed from real tensors at logging steps only (F1).

Both need an extra matmul or an SVD per matrix, so the optimizer evaluates them on a few sampled
matrices, and only on steps where the trainer asks for metrics.
"""
from __future__ import annotations

import torch

SAMPLED_MATRICES = 4      # Muon matrices evaluated per logging step (evenly spaced over the group)
RANK_THRESHOLD = 0.01     # a singular value counts towards the effective rank above 1% of the largest


def ortho_error(update: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Mean |sigma_i(O) - 1| over the directions that carry signal: the top-r singular values of the
    orthogonalised update O, r = number of singular values of the input `source` above RANK_THRESHOLD
    x its largest (0 for an exact polar factor).

    Why not ||O O^T - I||_F: gradients are nearly low-rank, and no Newton-Schulz step can (or should)
    lift directions whose singular value is ~0, so the full Frobenius error reads ~1 for every k and
    says nothing. On the signal subspace, measured on the tiny and phase1 models' first gradients:
    k = 1: ~0.8, k = 3: ~0.3, k = 5: ~0.14 (the quintic coefficients keep singular values in
    [0.68, 1.21] by design), SVD: 0. D2 monitor: a Newton-Schulz that stalls or diverges shows here.
    """
    s_in = torch.linalg.svdvals(source.float())
    r = max(1, int((s_in > RANK_THRESHOLD * s_in[0]).sum()))
    return (torch.linalg.svdvals(update.float())[:r] - 1).abs().mean()


def effective_rank_fraction(update: torch.Tensor) -> torch.Tensor:
    """Fraction of singular values above RANK_THRESHOLD x the largest: 1 = the update uses every direction."""
    s = torch.linalg.svdvals(update.float())
    return (s > RANK_THRESHOLD * s.max()).float().mean()


def sample_indices(n: int, k: int = SAMPLED_MATRICES) -> list[int]:
    """k indices spread evenly over range(n) (all of them when n <= k), deterministic across steps."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
