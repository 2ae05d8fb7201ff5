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

from forge.model.autocast import autocast_off
from forge.model.rope import RopeTables, apply_rope
from forge.model.window import AttentionPattern, Piece

# A key is an attention sink when the queries that can see it give it, on average, at least this share of
# their attention (E2). Only keys seen by at least half a window of queries are judged, so that the last
# few keys of a sequence, seen by one or two queries, do not count.
SINK_MASS = 0.5
# The causal max-logit record (piece_max_logit) scores blocks of MAX_LOGIT_CHUNK queries, a few heads at a
# time so that a block holds at most MAX_LOGIT_BLOCK scores (4 MB: stays in cache). Measured on the 2-core
# CPU at phase1 shapes (batch 8 x 8 heads, T = 512, hd = 64): 128 queries ~1.6x faster than one block of all
# heads, 64 or 256 queries no better (BENCHMARKS.md, "Then optimise").
MAX_LOGIT_CHUNK = 128
MAX_LOGIT_BLOCK = 1 << 20


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
        current = torch.stack([piece_max_logit(p) for p in pieces]).amax(0)
        self.max_logit = current if self.max_logit is None else torch.maximum(self.max_logit, current)

    def _min_seen(self, seq_len: int) -> int:
        span = seq_len if self.pattern.kind == "full" else min(self.pattern.window, seq_len)
        return max(1, span // 2)


@torch.no_grad()
def piece_max_logit(piece: Piece, chunk: int = MAX_LOGIT_CHUNK, block: int = MAX_LOGIT_BLOCK) -> torch.Tensor:
    """(n_heads,): max over the batch and every allowed pair of q.k / sqrt(hd), q and k (B, H, ..., L, hd).

    Exact, in fp32 whatever the autocast dtype (QK-clip compares it with tau), and cheaper than scoring the
    whole matrix: the 1/sqrt(hd) scale is applied to the (n_heads,) maxima, not to every score (dividing by
    a positive constant is monotone under rounding, so max(s) / c == max(s / c)); the mask is applied in place;
    and a plain causal piece is scored in blocks of `chunk` queries against only the keys they can see, so
    the (never attended) upper triangle is not computed (~(n + 1) / 2n of the FLOPs for n blocks), a few
    heads at a time on CPU so that each block of scores stays in cache."""
    with autocast_off(piece.q.device.type):
        q, k = piece.q.float(), piece.k.float()
        H = q.shape[1]
        if piece.mask is not None:
            scores = q @ k.transpose(-1, -2)
            scores.masked_fill_(~piece.mask, float("-inf"))
            return scores.amax(dim=[d for d in range(scores.dim()) if d != 1]) / math.sqrt(q.shape[-1])
        q3, k3 = q.flatten(0, 1), k.flatten(0, 1)              # (B*H, T, hd), head = row % H
        rows, T = q3.shape[:2]
        group = rows if q.is_cuda else max(1, block // (chunk * T * H)) * H
        best = torch.full((H,), float("-inf"), device=q.device)
        for r in range(0, rows, group):
            for start in range(0, T, chunk):
                end = min(start + chunk, T)
                scores = torch.bmm(q3[r:r + group, start:end], k3[r:r + group, :end].transpose(1, 2))
                scores[:, :, start:].masked_fill_(_future(end - start, q.device), float("-inf"))  # diagonal block
                best = torch.maximum(best, scores.unflatten(0, (-1, H)).amax(dim=(0, 2, 3)))
    return best / math.sqrt(q.shape[-1])


def _future(n: int, device) -> torch.Tensor:
    """(n, n) bool, True above the diagonal: the keys after each query within a diagonal block."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


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
