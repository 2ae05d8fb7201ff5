"""The two sequence-level terms of the composite objective, on the backbone encoding x (B, T, d).

sequence coherence  In-batch InfoNCE: the mean-pooled first half of sequence i must pick out the pooled
                    second half of the same sequence among the batch's second halves,
                    L = CE(softmax(cos(a_i, b_j) / temperature), j = i). A model that keeps a sequence's
                    topic through the sequence makes this small. 0 for a batch of one.
diversity penalty   Mean pairwise cosine similarity of the mean-pooled sequence representations of the
                    batch (i != j): high when every sequence collapses onto the same representation.

The same pairwise-cosine measure over per-token representations is logged as embedding_diversity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pairwise_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over pairs i != j of the rows of (N, d), in O(N d):
    sum_{i != j} u_i . u_j = |sum_i u_i|^2 - N for unit vectors u."""
    n = vectors.shape[0]
    if n < 2:
        return vectors.new_zeros(())
    total = F.normalize(vectors, dim=-1).sum(0)
    return (total @ total - n) / (n * (n - 1))


def coherence_loss(x: torch.Tensor, temperature: float) -> torch.Tensor:
    half = x.shape[1] // 2
    if half == 0:
        return x.new_zeros(())
    first = F.normalize(x[:, :half].mean(1), dim=-1)
    second = F.normalize(x[:, half:].mean(1), dim=-1)
    logits = first @ second.T / temperature
    return F.cross_entropy(logits, torch.arange(x.shape[0], device=x.device))


def diversity_penalty(x: torch.Tensor) -> torch.Tensor:
    return mean_pairwise_cosine(x.mean(1))
