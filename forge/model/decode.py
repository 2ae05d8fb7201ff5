"""Incremental (cached) causal decoding: each new token costs one pass over the cached context instead of a
whole forward over the prefix.

Every output of the model at position t depends only on positions <= t (all attention is causal; chunk c of
the memory reads M_{c-1}), so the prefix's state can be kept:
  attention  K and V of every earlier position, per attention *call*: the backbone blocks and each of the
             t_max * (micro_steps + 1) applications of the TRM refiner (every application is its own layer of
             the unrolled network, with its own keys)
  memory     M and S after the completed chunks, plus the k, v, theta of the chunk being filled

A token costs ~11 block applications on the tiny model, each a handful of small matmuls: decoding is bound by
per-operation overhead, not FLOPs. So the decoder runs the same math with fewer operations:
  - each block's q, k, v projections are one matmul (their weights concatenated once), as are the FFN's gate
    and up projections; the residual adds ride in the output matmuls (addmm);
  - RoPE is one complex multiplication of q and k together: the q and k rows of every head are permuted once
    so that the pairs (i, i + head_dim / 2) that RoPE rotates together sit side by side (q . k is unchanged
    under a permutation applied to both, and the cached keys are kept in that order);
  - keys and values go into preallocated caches (no concatenation per token), and a single new token with a
    sliding window attends to the window's slice of the cache, without a mask;
  - the LM head runs only where logits are used: the positions asked for (the last one when sampling), and
    per outer step only for the tokens that halt there (ACT halting) or at the last step (full depth).
The logits equal those of model(whole sequence) at the same positions to float rounding (tested to 1e-4).

ACT halting at inference: a token's output is the logits of its first confident step (as forward(halt=True)).
Every step is still computed for every token, because later tokens attend to this token's states at deeper
steps; halting chooses the output (and skips the LM head of the steps after it), not the refiner's work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from forge.model.backbone import Block
from forge.model.memory import memory_update


@dataclass
class DecodeOutput:
    logits: torch.Tensor        # (B, n, V) of the new positions (the last only with last_only): halting step's or last
    used_steps: torch.Tensor    # (B, n) outer steps each new token used (1..t_max), likewise


@dataclass
class _MemoryState:
    memory: torch.Tensor                 # M after the completed chunks (B, d, d)
    surprise: torch.Tensor               # S after the completed chunks
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # k, v, theta

    @property
    def pending_len(self) -> int:
        return sum(k.shape[1] for k, _, _ in self.pending)


@dataclass
class _BlockWeights:
    """One block's weights laid out for decoding (see the module docstring): transposed and contiguous (a
    (rows x d) @ (d x out) matmul of a few rows is the fast layout here), each RMSNorm's gain folded into the
    matmul after it (norm(x) * g @ W^T = (x * s) @ (g W^T))."""
    qkv_t: torch.Tensor          # (d, 3d): q and k columns in RoPE-pair order per head, then v
    o_t: torch.Tensor            # (d, d)
    gate_up_t: torch.Tensor      # (d, 2 * hidden)
    down_t: torch.Tensor         # (hidden, d)
    eps: float


def _pair_order(n_heads: int, head_dim: int, device) -> torch.Tensor:
    """Row order that puts RoPE's pairs (i, i + head_dim/2) of every head side by side."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    return (torch.arange(n_heads)[:, None] * head_dim + within).flatten().to(device)


def _block_weights(block: Block) -> _BlockWeights:
    attn, ffn = block.attn, block.ffn
    order = _pair_order(attn.n_heads, attn.head_dim, attn.q_proj.weight.device)
    qkv = torch.cat([attn.q_proj.weight[order], attn.k_proj.weight[order], attn.v_proj.weight])
    gate_up = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])
    return _BlockWeights(_fold(block.attn_norm.weight, qkv), attn.o_proj.weight.T.contiguous(),
                         _fold(block.ffn_norm.weight, gate_up), ffn.down_proj.weight.T.contiguous(),
                         block.attn_norm.eps)


def _fold(gain: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(gain * x) @ weight^T = x @ (gain[:, None] * weight^T)."""
    return (gain[:, None] * weight.T).contiguous()


def _rms_scaled(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) without the gain (folded into the next matmul): for a few rows, one
    reduction and in-place scalar work are cheaper than F.rms_norm's composite."""
    return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class IncrementalDecoder:
    """Feed a batch of sequences piece by piece: step(prompt) first (the prefill), then one token at a time.
    The logits equal those of model(whole sequence) at the same positions (tested to 1e-4)."""

    def __init__(self, model, batch_size: int, capacity: int = 256):
        """capacity: positions the caches hold before they grow (doubling)."""
        self.model, self.batch_size = model, batch_size
        self.length = 0
        pattern = model.blocks[0].attn.pattern
        self._pattern = pattern
        # a single new query needs no mask when its keys are a contiguous slice: full, or a plain sliding window
        self._slice_window = {"full": None, "sliding_window": pattern.window}.get(pattern.kind, -1)
        self._heads, self._head_dim = model.blocks[0].attn.n_heads, model.blocks[0].attn.head_dim
        with torch.no_grad():
            self._weights = {id(b): _block_weights(b) for b in model.modules() if isinstance(b, Block)}
            self._head_t = _fold(model.head_norm.weight, model.tok_emb.weight)   # the tied LM head, (d, V)
        self._capacity = 0
        self._rope: torch.Tensor | None = None          # (capacity, head_dim / 2) complex
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []   # per attention call: K and V (B, H, capacity, hd)
        self._slot = 0
        self._grow(capacity)
        self._memory: _MemoryState | None = None
        if model.spec.memory.enabled:
            d_mem = model.spec.memory.d_mem
            m0 = model.memory.initial_memory().detach()
            self._memory = _MemoryState(m0.expand(batch_size, d_mem, d_mem).clone(),
                                        m0.new_zeros(batch_size, d_mem, d_mem))

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity)
        device = self.model.tok_emb.weight.device
        cos, sin = self.model.rope(capacity, device)       # the model's own tables: the same angles
        half = self._head_dim // 2
        self._rope = torch.complex(cos[:, :half], sin[:, :half])
        grown = []
        for k, v in self._kv:
            shape = (*k.shape[:2], capacity, k.shape[-1])
            k2, v2 = k.new_empty(shape), v.new_empty(shape)
            k2[:, :, :self.length], v2[:, :, :self.length] = k[:, :, :self.length], v[:, :, :self.length]
            grown.append((k2, v2))
        self._kv = grown
        self._capacity = capacity

    @torch.inference_mode()
    def step(self, idx: torch.Tensor, halt: bool = True, last_only: bool = False) -> DecodeOutput:
        """idx (B, n): the next n tokens of every sequence. halt=False: full depth (the last step's logits).
        last_only: logits (and used steps) of the last new position only (what sampling needs)."""
        model = self.model
        B, n = idx.shape
        start, end = self.length, self.length + n
        self._grow(end)
        self._slot = 0
        freqs = self._rope[start:end, None, None, :]                 # (n, 1, 1, hd/2), broadcast over q|k, heads
        if n == 1 and self._slice_window != -1:                     # keys: a slice of the cache, no mask
            lo = 0 if self._slice_window is None else max(0, end - self._slice_window)
            mask = None
        else:
            lo, mask = 0, self._pattern.mask(end, idx.device, start=start)

        h0 = model.tok_emb(idx)
        y = h0
        for block in model.blocks:
            y = self._block(block, y, freqs, lo, end, mask)
        if self._memory is None:
            x = model.backbone_norm(y)
        else:
            x = model.gate(y, self._read_and_write_memory(h0, start))[0]

        rows = slice(n - 1, n) if last_only else slice(None)
        m = 1 if last_only else n
        last = model.n_steps - 1
        used = torch.full((B, m), last, dtype=torch.long, device=idx.device)
        halted = torch.zeros(B, m, dtype=torch.bool, device=idx.device)
        out = None
        for t, (y_t, z_t) in enumerate(self._outer_steps(x, freqs, lo, end, mask)):
            y_t = y_t[:, rows].reshape(B * m, -1)
            if z_t is None or not halt:
                if t == last:
                    out = self._lm_head(y_t)
                continue
            state = y_t.view(B, m, -1) if model.spec.act.head_input == "answer" else z_t[:, rows]
            stop = (torch.sigmoid(model.trm.act(state)) > model.spec.act.halt_thresh) | (t == last)
            newly = stop & ~halted
            chosen = newly.flatten().nonzero().squeeze(1)          # only these tokens need step t's logits
            every = len(chosen) == B * m                          # every token halts here (or it is the last)
            if len(chosen):
                logits = self._lm_head(y_t if every else y_t[chosen])
                if out is None and every:
                    out = logits
                else:
                    out = logits.new_empty(B * m, logits.shape[-1]) if out is None else out
                    out.index_copy_(0, chosen, logits)
            used = torch.where(newly, t, used)
            halted |= newly
        self.length = end
        return DecodeOutput(out.view(B, m, -1), used + 1)

    def _lm_head(self, y: torch.Tensor) -> torch.Tensor:
        """model.lm_head of rows y (N, d), with the transposed weight."""
        return torch.mm(_rms_scaled(y, self.model.head_norm.eps), self._head_t)

    # ------------------------------------------------------------------------------------------ pieces
    def _outer_steps(self, x, freqs, lo, end, mask):
        """(y_t, z_t) per outer step, as TRM.steps (no detach needed: no gradients here)."""
        trm = self.model.trm
        if trm is None:
            yield x, None
            return
        y, z = trm.initial_states(x)
        for _ in range(trm.t_max):
            for _ in range(trm.micro_steps):
                z = self._refine(x + y + z, freqs, lo, end, mask)
            y = self._refine(y + z, freqs, lo, end, mask)
            yield y, z

    def _refine(self, u, freqs, lo, end, mask):
        net = self.model.trm.net
        for block in net.blocks:
            u = self._block(block, u, freqs, lo, end, mask)
        return _rms_scaled(u, net.norm.eps) * net.norm.weight

    def _block(self, block: Block, x: torch.Tensor, freqs, lo: int, end: int, mask) -> torch.Tensor:
        """x (B, n, d) -> the block's output at the new positions; appends its K, V to this call's cache."""
        w = self._weights[id(block)]
        B, n, d = x.shape
        H, hd = self._heads, self._head_dim
        x = x.view(B * n, d)
        qkv = torch.mm(_rms_scaled(x, w.eps), w.qkv_t).view(B, n, 3, H, hd)
        qk = torch.view_as_complex(qkv[:, :, :2].unflatten(-1, (hd // 2, 2)))   # (B, n, 2, H, hd/2)
        qk = torch.view_as_real(qk * freqs).flatten(-2)                           # rotated, pair order
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        slot, self._slot = self._slot, self._slot + 1
        if slot == len(self._kv):
            shape = (B, H, self._capacity, hd)
            self._kv.append((x.new_empty(shape), x.new_empty(shape)))
        k_cache, v_cache = self._kv[slot]
        k_cache.narrow(2, end - n, n).copy_(k)
        v_cache.narrow(2, end - n, n).copy_(v)
        att = F.scaled_dot_product_attention(q, k_cache.narrow(2, lo, end - lo), v_cache.narrow(2, lo, end - lo),
                                             attn_mask=mask)
        x = torch.addmm(x, att.transpose(1, 2).reshape(B * n, d), w.o_t)                    # x + o_proj(att)
        gate, up = torch.mm(_rms_scaled(x, w.eps), w.gate_up_t).chunk(2, dim=-1)
        return torch.addmm(x, F.silu(gate) * up, w.down_t).view(B, n, d)              # x + ffn(...)

    def _read_and_write_memory(self, h0: torch.Tensor, start: int) -> torch.Tensor:
        """Memory path of the new positions: each reads M as of the end of the previous chunk; a chunk that
        fills up is written (memory_update, the same math as memory_scan)."""
        memory, state = self.model.memory, self._memory
        q, k, v, theta = memory.project(h0)
        chunk, reads, i, n = memory.chunk_size, [], 0, h0.shape[1]
        while i < n:
            take = min(n - i, chunk - state.pending_len)     # up to the end of the current chunk
            reads.append(q[:, i:i + take] @ state.memory.transpose(1, 2))
            state.pending.append((k[:, i:i + take], v[:, i:i + take], theta[:, i:i + take, None]))
            if state.pending_len == chunk:
                kc, vc, tc = (torch.cat(parts, dim=1) for parts in zip(*state.pending))
                state.memory, state.surprise, _ = memory_update(state.memory, state.surprise, kc, vc, tc,
                                                                memory.decay, memory.momentum)
                state.pending = []
            i += take
        return memory.o_proj(reads[0] if len(reads) == 1 else torch.cat(reads, dim=1))
