"""The composite objective, from the terms of one forward (LossTerms), on the batch it is defined on (Batch).

    loss = next_token * sum_t w_t CE_t + sequence_coherence * coherence + diversity * diversity
           - gate.entropy_reg * H(gate) + act_loss_weight * BCE_act - attention_entropy * H(attention)

Token terms (CE_t, the accuracies, BCE_act) are sums over valid tokens divided by the batch's token count;
coherence and diversity are sequence-level terms on the pooled rows of the batch.

sequence coherence  In-batch InfoNCE: the mean-pooled first half of sequence i must pick out the pooled
                    second half of the same sequence among the batch's second halves,
                    L = CE(softmax(cos(a_i, b_j) / temperature), j = i). A model that keeps a sequence's
                    topic through the sequence makes this small. 0 for a batch of one.
diversity penalty   Mean pairwise cosine similarity of the mean-pooled sequence representations of the
                    batch (i != j): high when every sequence collapses onto the same representation.

The same pairwise-cosine measure over per-token representations is logged as embedding_diversity.

The model's forward composes the loss on its own rows (LOCAL). Under data parallelism a training step's batch
is the global batch of every rank: forge.train.objective composes the same terms on a Batch whose `count`
and `rows` span the ranks. The model itself holds no collective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from forge.spec.model import ModelSpec
from forge.spec.objective import ObjectiveSpec

Gather = Optional[Callable[[torch.Tensor], torch.Tensor]]


class Batch:
    """The batch a loss is defined on. LOCAL: the rows of the forward. Otherwise `ranks` processes' rows:
    `sum` sums a statistic over the ranks (not differentiable), `rows` concatenates every rank's rows in the
    global batch's order (differentiable). A plain class: DDP passes it through its forward untouched."""

    def __init__(self, ranks: int = 1, sum: Gather = None, rows: Gather = None):
        self.ranks, self.sum, self.rows = ranks, sum, rows

    def count(self, n: torch.Tensor) -> torch.Tensor:
        """The divisor of a token mean: the count of valid targets, over every rank / ranks (DDP averages
        the ranks' gradients: exactly the gradient of the global mean, whatever each rank's count)."""
        return (n if self.sum is None else self.sum(n) / self.ranks).clamp_min(1)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a statistic each rank holds (equal shares of the batch)."""
        return t if self.sum is None else self.sum(t) / self.ranks


LOCAL = Batch()


@dataclass
class LossTerms:
    """What the composite objective needs from one forward, on that forward's rows (sums, not means)."""
    x: torch.Tensor                       # (B, T, d) the backbone encoding: the sequence-level terms
    n_valid: torch.Tensor                 # count of valid targets (not IGNORE_INDEX)
    ce_sums: list[torch.Tensor]           # per outer step: CE summed over valid tokens (differentiable)
    correct: list[torch.Tensor]           # per outer step: count of valid tokens whose argmax is the target
    act_sums: list[torch.Tensor]          # per outer step with a halting head: BCE summed (differentiable)
    chosen_ce_sum: torch.Tensor           # CE summed over the step each token's output comes from (detached)
    gate_entropy: Optional[torch.Tensor]  # H(gate), a mean over this batch; None without memory
    attn_entropy: Optional[torch.Tensor]  # H(attention), a mean; None unless objective.attention_entropy > 0


def step_weights(spec: ModelSpec) -> list[float]:
    """The deep-supervision weight of each outer step; without TRM the single decode has weight 1."""
    return list(spec.trm.step_weights) if spec.trm.enabled else [1.0]


def composite_loss(terms: LossTerms, spec: ModelSpec, objective: ObjectiveSpec, act_loss_weight: float,
                   batch: Batch = LOCAL) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss on `batch` and its terms as metrics (loss/*, accuracy/step_t; detached)."""
    n = batch.count(terms.n_valid)
    ce = [s / n for s in terms.ce_sums]
    coherence = coherence_loss(terms.x, objective.coherence_temperature, batch.rows)
    diversity = diversity_penalty(terms.x, batch.rows)
    loss = (objective.next_token * sum(w * c for w, c in zip(step_weights(spec), ce))
            + objective.sequence_coherence * coherence + objective.diversity * diversity)
    metrics = {"loss/coherence": coherence.detach(), "loss/diversity": diversity.detach()}
    if terms.gate_entropy is not None:
        loss = loss - spec.gate.entropy_reg * terms.gate_entropy
    if terms.act_sums:   # added even at weight 0 (warmup): every parameter then has a gradient, as DDP wants
        act_loss = torch.stack([s / n for s in terms.act_sums]).mean()
        metrics["loss/act"] = act_loss.detach()
        loss = loss + act_loss_weight * act_loss
    if terms.attn_entropy is not None:
        metrics["loss/attn_entropy"] = terms.attn_entropy.detach()
        loss = loss - objective.attention_entropy * terms.attn_entropy
    metrics["loss/total"] = loss.detach()
    metrics["loss/ce"] = terms.chosen_ce_sum / n
    for t, (c, correct) in enumerate(zip(ce, terms.correct)):
        metrics[f"loss/step_{t}"], metrics[f"accuracy/step_{t}"] = c.detach(), correct / n
    return loss, metrics


def embedding_diversity(x: torch.Tensor, batch: Batch = LOCAL) -> torch.Tensor:
    """1 - the mean pairwise cosine of the per-token representations of the batch (B, T, d)."""
    return 1 - mean_pairwise_cosine(x.detach().flatten(0, 1), batch.sum)


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
