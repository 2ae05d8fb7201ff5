"""The two sequence-level terms of the composite objective, on the backbone encoding x (B, T, d).

sequence coherence  In-batch InfoNCE: the mean-pooled first half of sequence i must pick out the pooled
                    second half of the same sequence among the batch's second halves,
                    L = CE(softmax(cos(a_i, b_j) / temperature), j = i). A model that keeps a sequence's
                    topic through the sequence makes this small. 0 for a batch of one.
diversity penalty   Mean pairwise cosine similarity of the mean-pooled sequence representations of the
                    batch (i != j): high when every sequence collapses onto the same representation.

The same pairwise-cosine measure over per-token representations is logged as embedding_diversity.

Under data parallelism both terms are batch-level: `gather` (forge.distributed.gather_rows) concatenates the
pooled rows of every rank, so each rank computes the loss of the whole global batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

Gather = Optional[Callable[[torch.Tensor], torch.Tensor]]


def _rows(t: torch.Tensor, gather: Gather) -> torch.Tensor:
    return t if gather is None else gather(t)


def mean_pairwise_cosine(vectors: torch.Tensor, reduce_sum: Gather = None) -> torch.Tensor:
    """Mean cosine similarity over pairs i != j of the rows of (N, d), in O(N d):
    sum_{i != j} u_i . u_j = |sum_i u_i|^2 - N for unit vectors u. With reduce_sum (a sum over ranks) the
    rows are those of every rank."""
    total = F.normalize(vectors, dim=-1).sum(0)
    n = vectors.shape[0]
    if reduce_sum is not None:
        packed = reduce_sum(torch.cat([total, total.new_tensor([float(n)])]))
        total, n_all = packed[:-1], packed[-1]
        return (total @ total - n_all) / (n_all * (n_all - 1)).clamp_min(1)   # one row in all: 0 / 1
    if n < 2:
        return vectors.new_zeros(())
    return (total @ total - n) / (n * (n - 1))

def coherence_loss(x: torch.Tensor, temperature: float, gather: Gather = None) -> torch.Tensor:
    half = x.shape[1] // 2
    if half == 0:
        return x.new_zeros(())
    first = F.normalize(_rows(x[:, :half].mean(1), gather), dim=-1)
    second = F.normalize(_rows(x[:, half:].mean(1), gather), dim=-1)
    logits = first @ second.T / temperature
    return F.cross_entropy(logits, torch.arange(first.shape[0], device=x.device))


def diversity_penalty(x: torch.Tensor, gather: Gather = None) -> torch.Tensor:
    return mean_pairwise_cosine(_rows(x.mean(1), gather))
