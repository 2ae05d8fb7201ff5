"""TRM recursion (Tiny Recursive Model) on top of the backbone encoding x.

One small shared network f (causal blocks, then RMSNorm so the states keep unit scale however often f is
applied) refines a latent z and an answer y. Inputs are combined by addition, as in the reference:

    y_0 = x, z_0 = 0                 (trm.learned_init: y_0, z_0 = two learned vectors, as the reference)
    outer step t: micro_steps times  z <- f(x + y + z)     (latent refinement, sees the input)
                  once               y <- f(y + z)         (answer update, does not see x)

Each outer step's y is decoded by the caller (deep supervision). With detach_between_steps the carry
(y, z) is detached before every step after the first, so step t's loss trains step t only (x still gets
gradient from every step). With trm.grad_cycles = "last" the first micro_steps - 1 latent refinements of
every outer step run under no_grad (same values, no backward through them), as in the TRM reference.

Frozen halted tokens (act.freeze_halted, evaluation without gradient; the caller passes a FrozenTokens and
updates its `running` mask after every outer step). Refiner applications are numbered c = 0..micro_steps
within an outer step (micro_steps latent refinements, then the answer update). At outer step t:
  - if every token runs, f runs as usual on the whole (B, T) batch, and every token's keys and values of
    application c, layer l are kept;
  - otherwise f runs only on the running tokens' rows: their queries, keys, values, attention output,
    feed-forward and norms. Their fresh keys/values replace the kept ones; a halted token's keys/values at
    (c, l) stay those of the last outer step it ran, i.e. its halting step. Running tokens attend, under the
    pattern's mask, to that mixture. Halted tokens' y and z stay as at their halting step.
A token's state therefore depends on earlier positions only (a halting decision is itself causal): the
computation stays causal. Outputs of running tokens differ from the full computation, in which halted tokens
keep being refined. `applied` counts the token-applications of f that ran (act/compute_share). The forward
falls back to the full computation while an attention module records scores over every pair (QK-clip's max
logit, attention stats or captures, the entropy regulariser); compute_share then counts every token of every
step run.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from forge.model.act import HaltingHead
from forge.model.attention import Attention
from forge.model.backbone import Block
from forge.model.norm import RMSNorm
from forge.model.rope import RopeTables, apply_rope
from forge.model.window import AttentionPattern
from forge.spec.model import ACTSpec, TRMSpec


def run_checkpointed(module: nn.Module, *args):
    """module(*args) without keeping its activations when gradients are on: they are recomputed in backward.
    The recomputation repeats the attention modules' side effects, which are idempotent (max_logit is a running
    max, stats are overwritten with equal values); nothing in the model draws random numbers."""
    if not torch.is_grad_enabled():
        return module(*args)
    return checkpoint(module, *args, use_reentrant=False)


class FrozenTokens:
    """The running tokens of a halting evaluation and the keys/values kept for the halted ones (module doc)."""

    def __init__(self, batch: int, seq_len: int, device):
        self.running = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        self.kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}   # (c, layer) -> K, V (B, T, H, hd)
        self.applied = 0          # token-applications of f run (each of the 1 + micro_steps per outer step)
        self._rows: Optional[Rows] = None

    def rows(self, pattern: AttentionPattern, rope: RopeTables) -> "Rows":
        """The running rows of the current outer step (recomputed when `running` changed)."""
        if self._rows is None or self._rows.running is not self.running:
            self._rows = Rows(self.running, pattern, rope)
        return self._rows


class Rows:
    """Running tokens of one outer step, laid out once for every application and layer of the step:
      flat      their flat indices into (B * T) rows, sorted by sequence then position (the packed rows)
      slot_src  per-sequence padded query layout (B * n_max slots): the packed row each slot reads; a
                sequence's slots after its last running token repeat that token (a sequence without one: its
                neighbour's), whose position and mask row keep the padding rows finite; they are dropped
      padded    the slot of each packed row (to read the attention output back)
      blocks    up to QUERY_BLOCKS blocks of slots, each attended against the key range its queries can see,
                (first slot, end slot, first key, end key, additive mask (B, 1, slots, keys)): causal, so
                attention skips the keys after each block as the full computation's causal kernel does, and for
                a sliding window the keys before it too; the mask is additive (0 / -inf), the form the
                attention kernel would otherwise convert a boolean mask to on every call
      rope      RoPE tables of the packed rows (n, 1, hd)"""

    QUERY_BLOCKS = 4
    MIN_BLOCK = 128

    def __init__(self, running: torch.Tensor, pattern: AttentionPattern, rope: RopeTables):
        # Kept to few tensor ops: at tiny width each small op costs ~10-50 us, and the saving to be had at 20%
        # halted is ~5 ms an outer step (BENCHMARKS.md, "ACT compute saving").
        B, T = running.shape
        self.running = running
        flat = running.view(-1).nonzero().squeeze(1)
        self.n = len(flat)
        self.all = self.n == B * T
        if self.all:
            return
        device = running.device
        self.flat, p = flat, flat % T
        counts = running.sum(1)
        ends = counts.cumsum(0)                            # one past each sequence's last packed row
        self.n_max = n_max = int(counts.max())
        slots = torch.arange(n_max, device=device)
        self.slot_src = torch.minimum(slots + (ends - counts)[:, None], (ends - 1)[:, None]).clamp_min(0).view(-1)
        self.padded = (slots < counts[:, None]).view(-1).nonzero().squeeze(1)
        pos = p.index_select(0, self.slot_src)             # non-decreasing along a sequence's slots
        rows_mask = pattern.additive_mask(T, device).index_select(0, pos).view(B, 1, n_max, T)
        size = max(self.MIN_BLOCK, -(-n_max // self.QUERY_BLOCKS))
        firsts = list(range(0, n_max, size))
        ends_ = [min(a + size, n_max) for a in firsts]
        if len(firsts) == 1:                               # one block: every key
            keys = [0, T]
        else:                                              # the positions at each block's first and last slot
            edges = pos.view(B, n_max).index_select(1, torch.tensor(firsts + [e - 1 for e in ends_], device=device))
            lo, hi = edges[:, :len(firsts)].amin(0), edges[:, len(firsts):].amax(0)
            keys = torch.cat([pattern.first_visible_key(lo), hi + 1]).tolist()
        self.blocks = [(a, e, k0, k1, rows_mask[:, :, a:e, k0:k1])
                       for a, e, k0, k1 in zip(firsts, ends_, keys[:len(firsts)], keys[len(firsts):])]
        self.rope = tuple(table.index_select(0, p).view(self.n, 1, -1) for table in rope)

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (n, d) running rows."""
        return full if self.all else full.reshape(-1, full.shape[-1]).index_select(0, self.flat)

    def scatter(self, full: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`full` (B, T, d) with the running rows replaced (a new tensor): halted rows keep their values."""
        if self.all:
            return rows
        return full.reshape(-1, full.shape[-1]).index_copy(0, self.flat, rows).view(full.shape)


def attend_rows(attn: Attention, h: torch.Tensor, rope: RopeTables, rows: Rows,
                kept: Optional[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, tuple]:
    """Attention output of the running rows h (n, d) (all rows: h is (B, T, d)), against the running tokens'
    fresh keys/values and the kept ones of halted tokens. Returns the output and the updated keys, values
    (B, T, H, hd), token-major so that rows are replaced with one index_copy_."""
    H, hd = attn.n_heads, attn.head_dim
    if rows.all:
        B, T, _ = h.shape

        def heads(proj):
            return proj(h).view(B, T, H, hd).transpose(1, 2)

        q, k, v = apply_rope(heads(attn.q_proj), rope), apply_rope(heads(attn.k_proj), rope), heads(attn.v_proj)
        layout = attn.pattern.layout(q, k, v)
        out = layout.merge([F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=p.mask, is_causal=p.mask is None)
                            for p in layout.pieces])
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1)), (k.transpose(1, 2).contiguous(), v.transpose(1, 2))
    K, V = kept
    B, T = K.shape[:2]
    K.view(B * T, H, hd).index_copy_(0, rows.flat, apply_rope(attn.k_proj(h).view(-1, H, hd), rows.rope))
    V.view(B * T, H, hd).index_copy_(0, rows.flat, attn.v_proj(h).view(-1, H, hd))
    q = apply_rope(attn.q_proj(h).view(-1, H, hd), rows.rope)
    q_pad = q.index_select(0, rows.slot_src).view(B, rows.n_max, H, hd).transpose(1, 2)
    K_, V_ = K.transpose(1, 2), V.transpose(1, 2)
    # the output of each block is laid out as its queries: (B, slots, H, hd) in memory
    out = [F.scaled_dot_product_attention(q_pad[:, :, a:e], K_[:, :, k0:k1], V_[:, :, k0:k1],
                                          attn_mask=mask.to(q.dtype)).transpose(1, 2)
           for a, e, k0, k1, mask in rows.blocks]
    out = out[0] if len(out) == 1 else torch.cat(out, dim=1)                         # (B, n_max, H, hd)
    return attn.o_proj(out.reshape(B * rows.n_max, H * hd).index_select(0, rows.padded)), (K, V)


class Refiner(nn.Module):
    """The shared network f."""

    def __init__(self, d_model: int, n_heads: int, spec: TRMSpec, pattern: AttentionPattern, norm_eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, spec.ffn_hidden, pattern, norm_eps)
                                    for _ in range(spec.n_layers))
        self.norm = RMSNorm(d_model, norm_eps)

    def forward(self, u: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        for block in self.blocks:
            u = block(u, rope)
        return self.norm(u)

    def forward_rows(self, u: torch.Tensor, rope: RopeTables, frozen: FrozenTokens, c: int) -> torch.Tensor:
        """f on the running rows u (n, d) ((B, T, d) when all run), application c of the outer step."""
        rows = frozen.rows(self.blocks[0].attn.pattern, rope)
        for layer, block in enumerate(self.blocks):
            out, frozen.kept[c, layer] = attend_rows(block.attn, block.attn_norm(u), rope, rows,
                                                     frozen.kept.get((c, layer)))
            u = u + out
            u = u + block.ffn(block.ffn_norm(u))
        frozen.applied += rows.n
        return self.norm(u)


class TRM(nn.Module):
    def __init__(self, d_model: int, n_heads: int, spec: TRMSpec, act: ACTSpec, pattern: AttentionPattern,
                 norm_eps: float):
        super().__init__()
        self.t_max, self.micro_steps, self.detach = spec.t_max, spec.micro_steps, spec.detach_between_steps
        self.grad_last_only = spec.grad_cycles == "last"
        self.net = Refiner(d_model, n_heads, spec, pattern, norm_eps)
        self.act = HaltingHead(d_model, spec.t_max, act.ema_teacher, act.ema_gain_tol)
        if spec.learned_init:            # 1-D: routed to AdamW; unit scale like the RMSNorm-ed states
            self.y_init = nn.Parameter(torch.randn(d_model))
            self.z_init = nn.Parameter(torch.randn(d_model))
        else:
            self.y_init = self.z_init = None
        self.track_state_grads = False   # logging steps only: hooks on y_t, z_t record their gradient norms
        self.checkpoint_refiner = False  # gradient checkpointing of every application of f (OOM mitigation)
        self._state_grads: dict[str, list[torch.Tensor]] = {"y": [], "z": []}

    def _record(self, name: str, state: torch.Tensor) -> None:
        if self.track_state_grads and state.requires_grad:
            state.register_hook(lambda g: self._state_grads[name].append(g.detach().norm()))

    def pop_state_grad_norms(self) -> dict[str, torch.Tensor]:
        """grad/norm_y, grad/norm_z: mean gradient norm of the loss w.r.t. each outer step's answer y_t and
        latent z_t since the last call (read after backward). C2: vanishing or exploding recursion."""
        out = {f"grad/norm_{k}": torch.stack(v).mean() for k, v in self._state_grads.items() if v}
        self._state_grads = {"y": [], "z": []}
        return out

    def refine(self, u: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        return run_checkpointed(self.net, u, rope) if self.checkpoint_refiner else self.net(u, rope)

    def initial_states(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.y_init is None:
            return x, torch.zeros_like(x)
        return self.y_init.to(x.dtype).expand_as(x), self.z_init.to(x.dtype).expand_as(x)

    def steps(self, x: torch.Tensor, rope: RopeTables,
              frozen: Optional[FrozenTokens] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (y_t, z_t) after each outer step; stop consuming to skip the remaining steps. With `frozen`
        (evaluation, no gradient) only its running tokens are refined (module doc)."""
        if frozen is not None:
            yield from self._frozen_steps(x, rope, frozen)
            return
        y, z = self.initial_states(x)
        for t in range(self.t_max):
            if t > 0 and self.detach:
                y, z = y.detach(), z.detach()
            for i in range(self.micro_steps):
                if self.grad_last_only and i < self.micro_steps - 1:
                    with torch.no_grad():
                        z = self.refine(x + y + z, rope)
                else:
                    z = self.refine(x + y + z, rope)
            y = self.refine(y + z, rope)
            self._record("y", y)
            self._record("z", z)
            yield y, z

    def _frozen_steps(self, x, rope, frozen: FrozenTokens):
        if torch.is_grad_enabled():
            raise RuntimeError("frozen halted tokens (act.freeze_halted) are an evaluation mode: run under "
                               "torch.no_grad()")
        y, z = self.initial_states(x)
        for t in range(self.t_max):
            rows = frozen.rows(self.net.blocks[0].attn.pattern, rope)
            xr, yr, zr = rows.gather(x), rows.gather(y), rows.gather(z)
            for i in range(self.micro_steps):
                zr = self.net.forward_rows(xr + yr + zr, rope, frozen, i)
            yr = self.net.forward_rows(yr + zr, rope, frozen, self.micro_steps)
            y, z = rows.scatter(y, yr), rows.scatter(z, zr)
            yield y, z
