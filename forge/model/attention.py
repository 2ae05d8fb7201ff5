"""Causal multi-head attention with RoPE, used by the backbone and by the TRM refiner alike.

The protocol QK-clip (forge/optim) relies on: nn.Linear q_proj, k_proj, v_proj, o_proj without bias, q/k
rows grouped head by head (rows h*head_dim:(h+1)*head_dim are head h); with `track_max_logit` on, each
forward records `max_logit` (n_heads,) = max over the batch and every attended (mask-allowed) pair of
q.k / sqrt(head_dim) on the post-RoPE q and k. It keeps the max over every call (the TRM refiner runs
several times per forward; gradient accumulation runs several forwards) until its consumer sets it back to
None (forge.optim.qk_clip after the optimizer step). It is a plain attribute, not a buffer, so DDP never
synchronises it.

Two more opt-in observations, off by default because they cost an explicit score matrix:
  collect_stats  (logging steps) `stats` = {"entropy", "sink_heads", "rope_norm"} from the batch's first
                 sequence (E2; rope_norm: mean norm of the rotary keys, which QK-clip must not collapse, E1)
  capture        (probes) every call appends those stats plus "probs" (H, T, T) to `captured` (heatmaps)
  entropy_grad   (attention-entropy regulariser on) softmax computed explicitly; each call appends its mean
                 per-query attention entropy (nats, with gradient) to `entropies`
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from forge.model.rope import RopeTables, apply_rope
from forge.model.window import AttentionPattern, Piece

# A key is an attention sink when the queries that can see it give it, on average, at least this share of
# their attention (E2). Only keys seen by at least half a window of queries are judged, so that the last
# few keys of a sequence, seen by one or two queries, do not count.
SINK_MASS = 0.5


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, pattern: AttentionPattern):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.pattern = pattern
        self.track_max_logit = False
        self.max_logit: torch.Tensor | None = None
        self.collect_stats = False
        self.stats: dict[str, torch.Tensor] | None = None
        self.capture = False
        self.captured: list[dict[str, torch.Tensor]] = []
        self.entropy_grad = False
        self.entropies: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        B, T, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:     # (B, T, d) -> (B, H, T, hd)
            return proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = apply_rope(heads(self.q_proj), rope), apply_rope(heads(self.k_proj), rope), heads(self.v_proj)
        layout = self.pattern.layout(q, k, v)
        if self.track_max_logit:
            self._record_max_logit(layout.pieces)
        if self.collect_stats or self.capture:
            stats = attention_stats(q[0], k[0], self.pattern.mask(T, x.device), self._min_seen(T))
            if self.capture:
                self.captured.append(stats)
            if self.collect_stats:
                self.stats = {k: v for k, v in stats.items() if k != "probs"}
        if self.entropy_grad:
            rows = [explicit_attention(p) for p in layout.pieces]
            out = layout.merge([o for o, _ in rows])
            self.entropies.append(layout.merge([e for _, e in rows]).mean())
        else:
            out = layout.merge([F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=p.mask,
                                                               is_causal=p.mask is None)
                                for p in layout.pieces])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    @torch.no_grad()
    def _record_max_logit(self, pieces: list[Piece]) -> None:
        per_piece = [masked_scores(p).transpose(0, 1).flatten(1).amax(1) for p in pieces]
        current = torch.stack(per_piece).amax(0)
        self.max_logit = current if self.max_logit is None else torch.maximum(self.max_logit, current)

    def _min_seen(self, seq_len: int) -> int:
        span = seq_len if self.pattern.kind == "full" else min(self.pattern.window, seq_len)
        return max(1, span // 2)


def masked_scores(piece: Piece) -> torch.Tensor:
    """q.k / sqrt(hd), -inf where the mask forbids."""
    scores = piece.q @ piece.k.transpose(-1, -2) / math.sqrt(piece.q.shape[-1])
    return scores.masked_fill(~piece.allowed(), float("-inf"))


def explicit_attention(piece: Piece) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(masked scores) @ v and the per-query entropy -sum p log p (..., Lq, 1)."""
    log_probs = masked_scores(piece).log_softmax(-1)
    probs = log_probs.exp()
    # masked pairs: p = 0 and log p = -inf; zero the log so that neither the value nor its gradient is NaN
    entropy = -(probs * log_probs.masked_fill(~piece.allowed(), 0.0)).sum(-1, keepdim=True)
    return probs @ piece.v, entropy


@torch.no_grad()
def attention_stats(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, min_seen: int) -> dict[str, torch.Tensor]:
    """Attention probabilities (H, T, T), their entropy, the attention sinks and the mean rotary-key norm of one
    sequence, q and k (H, T, hd) after RoPE, mask (T, T): dense, O(H T^2)."""
    probs = masked_scores(Piece(q, k, k, mask)).softmax(-1)                     # (H, T, T)
    entropy = -torch.special.xlogy(probs, probs).sum(-1).mean()
    seen = mask.sum(0)                                                          # queries that see key j
    received = probs.sum(1) / seen.clamp_min(1)                                 # mean share key j gets
    received = received.masked_fill(seen < min_seen, 0.0)
    sink_heads = (received.amax(-1) >= SINK_MASS).sum()
    return {"entropy": entropy, "sink_heads": sink_heads.float(), "rope_norm": k.norm(dim=-1).mean(), "probs": probs}


def attention_modules(model: nn.Module) -> list[Attention]:
    """Every attention module of the model (backbone and TRM refiner), in registration order."""
    return [m for m in model.modules() if isinstance(m, Attention)]
