"""Incremental (cached) causal decoding: each new token costs one pass over the cached context instead of a
whole forward over the prefix.

Every output of the model at position t depends only on positions <= t (all attention is causal; chunk c of
the memory reads M_{c-1}), so the prefix's state can be kept:
  attention  K and V of every earlier position, per attention *call*: the backbone blocks and each of the
             t_max * (micro_steps + 1) applications of the TRM refiner (every application is its own layer of
             the unrolled network, with its own keys)
  memory     M and S after the completed chunks, plus the k, v, theta of the chunk being filled

ACT halting at inference: a token's output is the logits of its first confident step (as forward(halt=True)).
Every step is still computed for every token, because later tokens attend to this token's states at deeper
steps; under caching halting chooses the output but saves no compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from forge.model.attention import Attention
from forge.model.backbone import Block
from forge.model.memory import memory_update
from forge.model.rope import RopeTables, apply_rope


@dataclass
class DecodeOutput:
    logits: torch.Tensor        # (B, n, V) of the new positions: the halting step's, or the last step's
    used_steps: torch.Tensor    # (B, n) outer steps each new token used (1..t_max)


@dataclass
class _MemoryState:
    memory: torch.Tensor                 # M after the completed chunks (B, d, d)
    surprise: torch.Tensor               # S after the completed chunks
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # k, v, theta

    @property
    def pending_len(self) -> int:
        return sum(k.shape[1] for k, _, _ in self.pending)


class IncrementalDecoder:
    """Feed a batch of sequences piece by piece: step(prompt) first (the prefill), then one token at a time.
    The logits equal those of model(whole sequence) at the same positions (tested to 1e-4)."""

    def __init__(self, model, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.length = 0
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slot = 0
        self._memory: _MemoryState | None = None
        if model.spec.memory.enabled:
            d_mem = model.spec.memory.d_mem
            m0 = model.memory.initial_memory().detach()
            self._memory = _MemoryState(m0.expand(batch_size, d_mem, d_mem).clone(),
                                        m0.new_zeros(batch_size, d_mem, d_mem))

    @torch.no_grad()
    def step(self, idx: torch.Tensor, halt: bool = True) -> DecodeOutput:
        """idx (B, n): the next n tokens of every sequence. halt=False: full depth (the last step's logits)."""
        model = self.model
        B, n = idx.shape
        start, end = self.length, self.length + n
        cos, sin = model.rope(end, idx.device)
        rope = (cos[start:], sin[start:])
        mask = model.blocks[0].attn.pattern.mask(end, idx.device, start=start)   # one pattern for every call
        self._slot = 0

        h0 = model.tok_emb(idx)
        y = h0
        for block in model.blocks:
            y = self._block(block, y, rope, mask)
        if self._memory is None:
            x = model.backbone_norm(y)
        else:
            x = model.gate(y, self._read_and_write_memory(h0, start))[0]

        last = model.n_steps - 1
        used = torch.full((B, n), last, dtype=torch.long, device=idx.device)
        halted = torch.zeros(B, n, dtype=torch.bool, device=idx.device)
        out = None
        for t, (y_t, z_t) in enumerate(self._outer_steps(x, rope, mask)):
            logits = model.lm_head(y_t)
            if z_t is None or not halt:
                stop = torch.full_like(halted, t == last)
            else:
                stop = (torch.sigmoid(model.trm.act(z_t)) > model.spec.act.halt_thresh) | (t == last)
            newly = stop & ~halted
            used = torch.where(newly, t, used)
            halted |= newly
            out = logits if out is None else torch.where(newly[..., None], logits, out)
        self.length = end
        return DecodeOutput(out, used + 1)

    # ------------------------------------------------------------------------------------------ pieces
    def _outer_steps(self, x, rope, mask):
        """(y_t, z_t) per outer step, as TRM.steps (no detach needed: no gradients here)."""
        trm = self.model.trm
        if trm is None:
            yield x, None
            return
        y, z = x, torch.zeros_like(x)
        for _ in range(trm.t_max):
            for _ in range(trm.micro_steps):
                z = self._refine(x + y + z, rope, mask)
            y = self._refine(y + z, rope, mask)
            yield y, z

    def _refine(self, u, rope, mask):
        net = self.model.trm.net
        for block in net.blocks:
            u = self._block(block, u, rope, mask)
        return net.norm(u)

    def _block(self, block: Block, x, rope, mask):
        x = x + self._attend(block.attn, block.attn_norm(x), rope, mask)
        return x + block.ffn(block.ffn_norm(x))

    def _attend(self, attn: Attention, x: torch.Tensor, rope: RopeTables, mask: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape

        def heads(proj):     # (B, n, d) -> (B, H, n, hd)
            return proj(x).view(B, n, attn.n_heads, attn.head_dim).transpose(1, 2)

        q, k, v = apply_rope(heads(attn.q_proj), rope), apply_rope(heads(attn.k_proj), rope), heads(attn.v_proj)
        slot, self._slot = self._slot, self._slot + 1
        if slot in self._kv:
            k_old, v_old = self._kv[slot]
            k, v = torch.cat([k_old, k], dim=-2), torch.cat([v_old, v], dim=-2)
        self._kv[slot] = (k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.o_proj(out.transpose(1, 2).reshape(B, n, -1))

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
        return memory.o_proj(torch.cat(reads, dim=1))
