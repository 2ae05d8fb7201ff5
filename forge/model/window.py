"""Which keys each query may attend to (the attention *pattern*), and how to lay the work out so that
sliding-window attention costs O(T * w) instead of O(T^2).

Patterns (all causal, key j visible to query i only if j <= i):
  full                        every earlier position
  sliding_window              the last `window` positions, the query included: i - window < j <= i
  sliding_window_with_global  the window, plus global tokens: positions 0, every, 2*every, ... (the first
                              `global_tokens` of them). A global query sees every earlier position; every
                              later query sees every global key.

Layouts: a *dense* layout is one (T x T) masked attention. A *blocked* layout (techniques.md section 6) folds
the sequence into blocks of `window` queries; each block attends to its own block and the previous one
through a (window x 2*window) mask, plus the global keys; the few global queries run as a second, small
(n_global x T) problem whose rows overwrite theirs. Both compute exactly the same attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Measured here (2-core CPU, fwd+bwd, 8 heads of 64): blocked ties the dense band at T / window = 4 and is ~2x
# faster at 8 (T=1024, w=128: 91 vs 172 ms), ~3.5x at 16; below 8 the dense band is as fast and simpler.
BLOCKED_MIN_BLOCKS = 8


@dataclass(frozen=True)
class Piece:
    """One batched attention problem. q (..., Lq, hd), k and v (..., Lk, hd); mask: bool, broadcastable to
    (..., Lq, Lk), True = may attend; None = plain causal over Lq == Lk."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None

    def allowed(self) -> torch.Tensor:
        if self.mask is not None:
            return self.mask
        n = self.q.shape[-2]
        return torch.ones(n, n, dtype=torch.bool, device=self.q.device).tril()


@dataclass(frozen=True)
class Layout:
    """The pieces of one attention call and how to put their per-query rows back in sequence order."""

    pieces: list[Piece]
    seq_len: int
    blocked: bool
    global_positions: torch.Tensor | None = None

    def merge(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Per-piece rows (..., Lq, X) -> (B, H, T, X) in position order."""
        if not self.blocked:
            return rows[0]
        out = rows[0].flatten(-3, -2)[..., : self.seq_len, :]      # (B, H, nb, w, X) -> (B, H, T, X)
        if len(rows) > 1:                                          # global queries: their full-causal rows win
            out = out.index_copy(-2, self.global_positions, rows[1])
        return out


class AttentionPattern:
    def __init__(self, kind: str, window: int, global_every: int, global_tokens: int):
        if kind not in ("full", "sliding_window", "sliding_window_with_global"):
            raise ValueError(f"unknown attention type {kind!r}")
        self.kind, self.window = kind, window
        self.global_every, self.global_tokens = global_every, global_tokens
        self._additive: tuple | None = None     # (seq_len, device), additive_mask: the last one built

    def global_positions(self, seq_len: int, device=None) -> torch.Tensor:
        if self.kind != "sliding_window_with_global":
            return torch.empty(0, dtype=torch.long, device=device)
        return torch.arange(0, seq_len, self.global_every, device=device)[: self.global_tokens]

    def mask(self, seq_len: int, device=None, start: int = 0) -> torch.Tensor:
        """(T - start, T) bool: the pattern's definition, True where query i (rows start..T-1) may attend to
        key j; start > 0 gives the rows of the newest queries (incremental decoding)."""
        i = torch.arange(start, seq_len, device=device)[:, None]
        j = torch.arange(seq_len, device=device)[None, :]
        allowed = j <= i
        if self.kind != "full":
            near = j > i - self.window
            is_global = torch.zeros(seq_len, dtype=torch.bool, device=device)
            is_global[self.global_positions(seq_len, device)] = True
            allowed &= near | is_global[None, :] | is_global[start:, None]
        return allowed

    def additive_mask(self, seq_len: int, device=None) -> torch.Tensor:
        """mask(seq_len) as the attention kernel applies it, (T, T) float: 0 where allowed, -inf elsewhere (a
        boolean mask is converted to this on every call). The last one is kept: the frozen-halting layout
        (forge/model/trm.py) reads its rows at every outer step."""
        key = (seq_len, torch.device(device or "cpu"))
        if self._additive is None or self._additive[0] != key:
            allowed = self.mask(seq_len, device)
            self._additive = key, torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))
        return self._additive[1]

    def first_visible_key(self, positions: torch.Tensor) -> torch.Tensor:
        """The earliest key any of the queries at `positions` may attend to: its window's start for a plain
        sliding window, else 0 (every earlier position, or the global keys, stay visible)."""
        if self.kind != "sliding_window":
            return torch.zeros_like(positions)
        return (positions - self.window + 1).clamp_min(0)

    def layout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: bool | None = None) -> Layout:
        """Split (B, H, T, hd) q, k, v into pieces. blocked=None picks by T / window."""
        T = q.shape[-2]
        if self.kind == "full" or self.window >= T:          # the window covers everything: plain causal
            return Layout([Piece(q, k, v, None)], T, blocked=False)
        if blocked is None:
            blocked = T >= BLOCKED_MIN_BLOCKS * self.window
        if not blocked:
            return Layout([Piece(q, k, v, self.mask(T, q.device))], T, blocked=False)
        return self._blocked(q, k, v)

    def _blocked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Layout:
        w, T, device = self.window, q.shape[-2], q.device
        n_blocks = math.ceil(T / w)
        pad = n_blocks * w - T          # padded positions lie in every real query's future: always masked

        def fold(x):                    # (B, H, T, hd) -> (B, H, nb, w, hd)
            return F.pad(x, (0, 0, 0, pad)).unflatten(-2, (n_blocks, w))

        def with_previous(xb):          # keys of block b: [block b-1, block b] -> (B, H, nb, 2w, hd)
            return torch.cat([F.pad(xb[..., :-1, :, :], (0, 0, 0, 0, 1, 0)), xb], dim=-2)

        qb, kb, vb = fold(q), with_previous(fold(k)), with_previous(fold(v))
        i = torch.arange(n_blocks * w, device=device).view(n_blocks, w, 1)               # query position
        j = (torch.arange(n_blocks, device=device) * w - w).view(n_blocks, 1, 1) + \
            torch.arange(2 * w, device=device)                                          # key position
        mask = (j <= i) & (j > i - w) & (j >= 0)                                        # (nb, w, 2w)
        gpos = self.global_positions(T, device)
        if len(gpos) == 0:
            return Layout([Piece(qb, kb, vb, mask)], T, blocked=True)
        # global keys for every block; only those outside the window, so no key counts twice
        expand = (*qb.shape[:-2], len(gpos), q.shape[-1])
        kb = torch.cat([kb, k[..., gpos, :].unsqueeze(-3).expand(expand)], dim=-2)
        vb = torch.cat([vb, v[..., gpos, :].unsqueeze(-3).expand(expand)], dim=-2)
        mask = torch.cat([mask, gpos.view(1, 1, -1) <= i - w], dim=-1)
        global_rows = Piece(q[..., gpos, :], k, v, torch.arange(T, device=device)[None, :] <= gpos[:, None])
        return Layout([Piece(qb, kb, vb, mask), global_rows], T, blocked=True, global_positions=gpos)
