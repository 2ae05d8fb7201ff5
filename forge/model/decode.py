"""Incremental (cached) causal decoding: each new token costs one pass over the cached context instead of a
whole forward over the prefix.

Every output of the model at position t depends only on positions <= t (all attention is causal; chunk c of
the memory reads M_{c-1}), so the prefix's state can be kept:
  attention  K and V of every earlier position, per attention *call*: the backbone blocks and each of the
             t_max * (micro_steps + 1) applications of the TRM refiner (every application is its own layer of
             the unrolled network, with its own keys)
  memory     its weights and surprise after the completed chunks, the inputs of the chunk being filled
             and the convolution's context (NeuralMemory.init_state / step)

A token costs ~11 block applications on the tiny model, each a handful of small matmuls: decoding is bound by
per-operation overhead, not FLOPs. So the decoder runs the same math with fewer operations:
  - each block's q, k, v projections are one matmul (their weights concatenated once), as are the FFN's gate
    and up projections; the residual adds ride in the output matmuls (addmm);
  - RMSNorm is one vector norm per row and a scale of the next matmul's output: norm(x) * g @ W^T =
    (x @ (g W^T sqrt(d))) * rsqrt(x . x + d eps), the gain and sqrt(d) folded into the weight once;
  - RoPE is one complex multiplication of q, k and v together (v by 1, exact): the q and k rows of every head
    are permuted once so that the pairs (i, i + head_dim / 2) that RoPE rotates together sit side by side
    (q . k is unchanged under a permutation applied to both, and the cached keys are kept in that order);
  - keys and values share one cache tensor per attention call, preallocated (one copy per token, no
    concatenation), and a single new token with a sliding window attends to the window's slice of the cache,
    without a mask; a single token's q, k, v are views of the projection, without transposes;
  - the MAG gate is a few matmuls (its gains folded, without the entropy only training uses); Python-float
    operands are tensors made once (a float operand costs a conversion per operation);
  - the LM head runs only where logits are used: the positions asked for (the last one when sampling), and
    per outer step only for the tokens that halt there (ACT halting) or at the last step (full depth); once
    every output is chosen, the halting head is not evaluated again.
The logits equal those of model(whole sequence) at the same positions to float rounding (tested to 1e-4).

ACT halting at inference: a token's output is the logits of its first confident step (as forward(halt=True)).
By default every step is still computed for every token, because later tokens attend to this token's states
at deeper steps: halting chooses the output, not the refiner's work, and the tokens equal the full model's.

skip_halted=True (an approximation of the full model, not its output): a token that halts at outer step t is
frozen there. Its queries and feed-forward are not run at the later steps t' > t, and wherever a later token
attends to it in refiner application s of step t' (s = 0 .. micro_steps, the same attention call of another
outer step), it reads the keys and values it had in application s of step t, its last computed ones. The new
token of a decoding step stops when it (every row of the batch) has halted: the steps after it are skipped and
their caches receive its frozen keys and values. In a prefill of several tokens every token is still
computed (rows of one sequence attend to each other), with the halted tokens' keys and values frozen as above,
so the prefill gives what the frozen model gives, without the saving.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forge.model.backbone import Block


@dataclass
class DecodeOutput:
    logits: torch.Tensor        # (B, n, V) of the new positions (the last only with last_only): halting step's or last
    used_steps: torch.Tensor    # (B, n) outer steps each new token used (1..t_max), likewise
    steps_run: int              # outer steps computed for the new tokens (t_max unless skip_halted stopped early)


@dataclass
class _BlockWeights:
    """One block's weights laid out for decoding (see the module docstring): transposed and contiguous (a
    (rows x d) @ (d x out) matmul of a few rows is the fast layout here), each RMSNorm's gain and sqrt(d)
    folded into the matmul after it."""
    qkv_t: torch.Tensor          # (d, 3d): q and k columns in RoPE-pair order per head, then v
    o_t: torch.Tensor            # (d, d)
    gate_up_t: torch.Tensor      # (d, 2 * hidden)
    down_t: torch.Tensor         # (hidden, d)
    d_eps: torch.Tensor          # d * eps, the RMSNorm epsilon on the sum of squares (a tensor: a Python float
                                 # operand costs a conversion per operation)


@dataclass
class _StepViews:
    """Per decoding step, shared by its attention calls (IncrementalDecoder._step_views)."""
    rope: torch.Tensor                # (3, 1, n, hd / 2) complex: q's and k's rotations at the new positions, 1 for v
    rotated: torch.Tensor             # (B, 3, H, n, hd / 2) complex: a call's rotated q, k, v (reused by every call)
    q: torch.Tensor                   # (B, H, n, hd): the rotated q, a real view of `rotated`
    writes: tuple[torch.Tensor, ...]  # per call: (B, 2, H, n, hd / 2) complex views of the cache at the new positions
    keys: tuple[torch.Tensor, ...]    # per call: (B, H, L, hd), the positions attended to
    values: tuple[torch.Tensor, ...]
    mask: torch.Tensor | None


@dataclass
class _GateWeights:
    """The MAG gate's weights for decoding: RMSNorm gains times sqrt(d), the up projection's y and m columns."""
    gain_y: torch.Tensor
    gain_m: torch.Tensor
    up_y_t: torch.Tensor          # (d, hidden)
    up_m_t: torch.Tensor          # (d, hidden)
    down_t: torch.Tensor          # (hidden, d)
    d_eps: torch.Tensor


def _gate_weights(gate) -> _GateWeights:
    d = gate.norm_y.weight.shape[0]
    up_y, up_m = gate.up.weight.split(d, dim=1)
    return _GateWeights(gate.norm_y.weight * d ** 0.5, gate.norm_m.weight * d ** 0.5, up_y.T.contiguous(),
                        up_m.T.contiguous(), gate.down.weight.T.contiguous(), _d_eps(gate.norm_y, gate.up.weight))


@dataclass
class _MemoryWeights:
    """NeuralMemory.project's weights for one token: q, k, v, the step size's and the gates' logits as one matmul
    (the RMSNorm gain and sqrt(d) folded in), the convolution's taps per position, the output projection."""
    proj_t: torch.Tensor          # (d, 3 d_mem + 1 [+ 2]): q | k | v | step size [| momentum | decay] logits
    bias: torch.Tensor            # (1 [+ 2],): the logits' biases
    taps: torch.Tensor | None     # (conv_kernel, 3 d_mem): tap j weighs the position conv_kernel - 1 - j back
    o_t: torch.Tensor             # (d_mem, d)
    d_eps: torch.Tensor


def _memory_weights(memory) -> _MemoryWeights:
    rows = [memory.q_proj.weight, memory.k_proj.weight, memory.v_proj.weight, memory.step_size_weight[None]]
    bias = [memory.step_size_bias]
    if memory.spec.gates == "data_dependent":      # project's gate_logits: (momentum, decay)
        rows += [memory.momentum_weight[None], memory.decay_weight[None]]
        bias += [memory.momentum_bias, memory.decay_bias]
    weight = torch.cat(rows)
    K = memory.spec.conv_kernel
    taps = memory.conv_weight.view(-1, K).T.contiguous() if K else None
    return _MemoryWeights(_fold(memory.norm.weight, weight), torch.cat(bias), taps, memory.o_proj.weight.T.contiguous(),
                          _d_eps(memory.norm, weight))


@dataclass
class _ModelWeights:
    """Every weight the decoder reads, laid out once per model state (_decode_weights)."""
    blocks: dict[int, _BlockWeights]      # by id() of each Block (backbone and refiner)
    head_t: torch.Tensor                  # the tied LM head, (d, V), head_norm's gain folded
    head_d_eps: torch.Tensor
    refiner_gain: torch.Tensor | None     # the refiner's closing RMSNorm: its gain times sqrt(d), and d eps
    refiner_d_eps: torch.Tensor | None
    halt_thresh: torch.Tensor | None
    gate: _GateWeights | None
    memory: _MemoryWeights | None


# model -> (its parameters' identity and versions, _ModelWeights): a sample during training or a run of samples
# lays out the weights once per model state, not per call (a few ms each: ~0.1 ms per token of a 64-token sample)
_LAID_OUT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _decode_weights(model) -> _ModelWeights:
    """The model's weights laid out for decoding, recomputed whenever a parameter changed (an optimizer step or a
    load bumps its version; a move to another device or dtype changes its storage)."""
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())
    cached = _LAID_OUT.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        head_t = _fold(model.head_norm.weight, model.tok_emb.weight)
        refiner = model.trm.net.norm if model.trm is not None else None
        memory = model.spec.memory.enabled
        weights = _ModelWeights(
            {id(b): _block_weights(b) for b in model.modules() if isinstance(b, Block)}, head_t,
            _d_eps(model.head_norm, head_t),
            None if refiner is None else refiner.weight * refiner.weight.shape[0] ** 0.5,
            None if refiner is None else _d_eps(refiner, head_t),
            None if refiner is None else head_t.new_tensor(model.spec.act.halt_thresh),
            _gate_weights(model.gate) if memory else None, _memory_weights(model.memory) if memory else None)
    _LAID_OUT[model] = key, weights
    return weights


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
                         _d_eps(block.attn_norm, qkv))


def _fold(gain: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """norm(x) * gain @ weight^T = (x @ (gain[:, None] * weight^T * sqrt(d))) * _inv_rms(x)."""
    return (gain[:, None] * weight.T * gain.shape[0] ** 0.5).contiguous()


def _d_eps(norm, like: torch.Tensor) -> torch.Tensor:
    return like.new_tensor(norm.weight.shape[0] * norm.eps)


def _inv_rms(x: torch.Tensor, d_eps: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N, 1): 1 / sqrt(x . x + d eps) = 1 / (sqrt(d) rms(x)); the sqrt(d) is in the folded weight."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.addcmul(d_eps, norm, norm).rsqrt_()


class IncrementalDecoder:
    """Feed a batch of sequences piece by piece: step(prompt) first (the prefill), then one token at a time.
    The logits equal those of model(whole sequence) at the same positions (tested to 1e-4); with
    skip_halted=True those of the frozen-halting approximation (module docstring)."""

    def __init__(self, model, batch_size: int, capacity: int = 256, skip_halted: bool = False):
        """capacity: positions the caches hold before they grow (doubling)."""
        self.model, self.batch_size, self.skip_halted = model, batch_size, skip_halted
        self.length = 0
        pattern = model.blocks[0].attn.pattern
        self._pattern = pattern
        # a single new query needs no mask when its keys are a contiguous slice: full, or a plain sliding window
        self._slice_window = {"full": None, "sliding_window": pattern.window}.get(pattern.kind, -1)
        self._heads, self._head_dim = model.blocks[0].attn.n_heads, model.blocks[0].attn.head_dim
        self._w = _decode_weights(model)
        trm = model.trm
        # attention calls: one per backbone block, one per refiner block and application
        self._per_step = 0 if trm is None else (trm.micro_steps + 1) * len(trm.net.blocks)
        self._n_calls = len(model.blocks) + (0 if trm is None else trm.t_max * self._per_step)
        self._frozen: torch.Tensor | None = None    # (B, n): new tokens halted at an earlier step (skip_halted)
        self._capacity = 0
        # RoPE's rotations of q, k and 1 for v, (3, 1, capacity, head_dim / 2) complex: q, k and v rotate as one
        # complex product, exact for v ((a + bi)(1 + 0i) = a + bi in floating point)
        self._rope: torch.Tensor | None = None
        # K and V of every attention call in one tensor (calls, B, 2, H, capacity, head_dim), so that a step slices
        # the positions of all calls at once; self._kv[call] is one call's (B, 2, H, capacity, head_dim)
        self._kv_all = model.tok_emb.weight.new_empty((self._n_calls, batch_size, 2, self._heads, 0, self._head_dim))
        self._kv: list[torch.Tensor] = []
        self._slot = 0
        self._views: _StepViews | None = None
        self._grow(capacity)
        self._memory = None
        if model.spec.memory.enabled:
            self._memory = model.memory.init_state(batch_size)

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity)
        device = self.model.tok_emb.weight.device
        cos, sin = self.model.rope(capacity, device)       # the model's own tables: the same angles
        half = self._head_dim // 2
        rotation = torch.complex(cos[:, :half], sin[:, :half])
        self._rope = torch.stack([rotation, rotation, torch.ones_like(rotation)])[:, None]
        grown = self._kv_all.new_empty((*self._kv_all.shape[:4], capacity, self._head_dim))
        grown[:, :, :, :, :self.length] = self._kv_all[:, :, :, :, :self.length]
        self._kv_all, self._kv = grown, list(grown.unbind(0))
        # the same cache as (calls, B, 2, H, capacity, head_dim / 2) complex: the rotated k and v are copied into it
        self._kv_complex = torch.view_as_complex(grown.unflatten(-1, (-1, 2)))
        self._capacity = capacity

    @torch.inference_mode()
    def step(self, idx: torch.Tensor, halt: bool = True, last_only: bool = False) -> DecodeOutput:
        """idx (B, n): the next n tokens of every sequence. halt=False: full depth (the last step's logits).
        last_only: logits (and used steps) of the last new position only (what sampling needs)."""
        model = self.model
        B, n = idx.shape
        start, end = self.length, self.length + n
        self._grow(end)
        self._slot, self._frozen = 0, None
        self._views = self._step_views(start, end, idx.device)

        y = memory_input = model.tok_emb(idx)
        for i, block in enumerate(model.blocks, 1):
            y = self._block(block, y)
            memory_input = y if i == model.spec.memory.input_layer else memory_input
        if self._memory is None:
            x = model.backbone_norm(y)
        else:
            x = self._gate(y, self._memory_path(memory_input))

        rows = slice(n - 1, n) if last_only else slice(None)
        m = 1 if last_only else n
        N, last = B * m, model.n_steps - 1
        decide = halt and model.trm is not None        # the halting head chooses each token's step
        skip = decide and self.skip_halted
        answer = decide and model.spec.act.head_input == "answer"
        out = chosen = used = halted = None  # logits (N, V), the state they come from (N, d), used step (N,),
        t = 0                                # output chosen (N,)
        for t, (y_t, z_t) in enumerate(self._outer_steps(x)):
            if not decide:
                if t == last:
                    chosen = y_t[:, rows].reshape(N, -1)
                continue
            if B * n == 1:                      # one new token: its halting decision as one host read
                if out is not None or (t < last and not bool(self._halts(y_t if answer else z_t))):
                    continue                    # chosen already (later steps run for the caches only), or not yet
                out, used = self._lm_head(y_t.view(1, -1)), idx.new_full((1,), t)
                if skip and t < last:
                    self._freeze_later_steps(t, start, end)
                    break
                continue
            state = y_t if answer else z_t         # what the halting head reads (act.head_input)
            stop = self._halts(state if skip else state[:, rows])
            if t == last:
                stop.fill_(True)
            if skip:                            # halted (B, n) so far: frozen from the next step on
                self._frozen = stop.view(B, n) if self._frozen is None else self._frozen | stop.view(B, n)
                stop = self._frozen[:, rows].reshape(N)
            newly = stop if halted is None else stop & ~halted
            # the state each token's logits come from, selected without a host read; one LM head at the end
            y_rows = y_t[:, rows].reshape(N, -1)
            chosen = y_rows if chosen is None else torch.where(newly[:, None], y_rows, chosen)
            used = torch.where(newly, t, -1) if used is None else torch.where(newly, t, used)
            halted = newly if halted is None else halted | newly
            if skip and t < last and bool(self._frozen.all()):
                self._freeze_later_steps(t, start, end)
                break
        if out is None:
            out = self._lm_head(chosen)
        if used is None:
            used = torch.full((N,), last, dtype=torch.long, device=idx.device)
        self.length = end
        return DecodeOutput(out.view(B, m, -1), used.view(B, m) + 1, t + 1)

    def _step_views(self, start: int, end: int, device) -> "_StepViews":
        """What every attention call of this step reads: its RoPE rotations, where its new keys/values go, the
        keys/values it attends to, and the mask (None for a single new token whose keys are one slice)."""
        if end - start == 1 and self._slice_window != -1:          # keys: a slice of the cache, no mask
            lo = 0 if self._slice_window is None else max(0, end - self._slice_window)
            mask = None
        else:
            lo, mask = 0, self._pattern.mask(end, device, start=start)
        rotated = self._kv_complex.new_empty((self.batch_size, 3, self._heads, end - start, self._head_dim // 2))
        window = self._kv_all[:, :, :, :, lo:end]         # every call at once: a few views per step, not per call
        return _StepViews(self._rope[:, :, start:end], rotated, torch.view_as_real(rotated[:, 0]).flatten(-2),
                          self._kv_complex[:, :, :, :, start:end].unbind(0), window[:, :, 0].unbind(0),
                          window[:, :, 1].unbind(0), mask)

    def _gate(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """model.gate's blended output (without its entropy): m' + g (y' - m'), y' and m' the RMS-normalised
        paths, g = sigmoid(down(silu(up([y'; m'])))) with up split into its y and m columns."""
        w = self._w.gate
        shape = y.shape
        y, m = y.reshape(-1, shape[-1]), m.reshape(-1, shape[-1])
        y = y * _inv_rms(y, w.d_eps) * w.gain_y
        m = m * _inv_rms(m, w.d_eps) * w.gain_m
        g = torch.sigmoid(torch.mm(F.silu(torch.addmm(torch.mm(y, w.up_y_t), m, w.up_m_t)), w.down_t))
        return torch.lerp(m, y, g).view(shape)

    def _memory_path(self, h: torch.Tensor) -> torch.Tensor:
        """The memory path of the new positions h (B, n, d): NeuralMemory.step, or for one token that does not
        complete a chunk the same math in a few operations (NeuralMemory.project's for one position: q, k, v and
        the logits in one matmul, the causal convolution as a weighted sum over the kept projections, one read).
        The chunk's write stays NeuralMemory.step's: the token that completes a chunk goes through it."""
        memory, state = self.model.memory, self._memory
        B, n, d = h.shape
        K, d_mem = memory.spec.conv_kernel, memory.d_mem
        if n > 1 or state.pending_len + 1 >= memory.chunk_size or (K and state.conv_tail is None):
            return memory.step(state, h)
        w = self._w.memory
        u = h.view(B, d)
        proj = torch.mm(u, w.proj_t).mul_(_inv_rms(u, w.d_eps))
        qkv, logits = proj[:, None, :3 * d_mem], proj[:, None, 3 * d_mem:].add_(w.bias)     # (B, 1, .)
        if K:                                  # the last K - 1 projections and this one, weighted by the taps
            window = torch.cat([state.conv_tail, qkv], dim=1)
            state.conv_tail = window[:, 1:]
            qkv = torch.mul(window, w.taps).sum(1, keepdim=True)
        if memory.spec.qkv_activation == "silu":
            qkv = F.silu(qkv)
        qk = F.normalize(qkv[..., :2 * d_mem].unflatten(-1, (2, d_mem)), dim=-1)
        theta = torch.sigmoid(logits[..., :1])
        state.pending.append((qk[:, :, 1], qkv[..., 2 * d_mem:], theta, logits[..., 1:] if logits.shape[-1] > 1 else None))
        read = memory.model.read(state.weights, qk[:, :, 0])                                   # (B, 1, d_mem)
        return torch.mm(read.view(B, d_mem), w.o_t).view(B, 1, d)

    def _halts(self, z: torch.Tensor) -> torch.Tensor:
        """(B, n, d) states the head reads -> (B * n,) halting decisions: sigmoid(act(z)) > act.halt_thresh."""
        act = self.model.trm.act
        return torch.sigmoid(torch.addmv(act.bias, z.reshape(-1, z.shape[-1]), act.weight)) > self._w.halt_thresh

    def _lm_head(self, y: torch.Tensor) -> torch.Tensor:
        """model.lm_head of rows y (N, d), with the transposed weight."""
        return torch.mm(y, self._w.head_t).mul_(_inv_rms(y, self._w.head_d_eps))

    def _freeze_later_steps(self, t: int, start: int, end: int) -> None:
        """Every new token halted by outer step t: the caches of the later steps' attention calls get, at the
        new positions, the keys and values of the same call in step t (skip_halted's frozen tokens)."""
        first = len(self.model.blocks) + t * self._per_step
        for slot in range(first + self._per_step, self._n_calls):
            self._kv[slot][:, :, :, start:end] = self._kv[first + (slot - first) % self._per_step][:, :, :, start:end]

    # ------------------------------------------------------------------------------------------ pieces
    def _outer_steps(self, x):
        """(y_t, z_t) per outer step, as TRM.steps (no detach needed: no gradients here)."""
        trm = self.model.trm
        if trm is None:
            yield x, None
            return
        y, z = trm.initial_states(x)
        for _ in range(trm.t_max):
            for _ in range(trm.micro_steps):
                z = self._refine(x + y + z)
            y = self._refine(y + z)
            yield y, z

    def _refine(self, u):
        net = self.model.trm.net
        for block in net.blocks:
            u = self._block(block, u)
        return u.mul_(_inv_rms(u.view(-1, u.shape[-1]), self._w.refiner_d_eps).view(*u.shape[:-1], 1)).mul_(
            self._w.refiner_gain)

    def _block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        """x (B, n, d) -> the block's output at the new positions; writes its K, V into this call's cache."""
        w, views = self._w.blocks[id(block)], self._views
        B, n, d = x.shape
        H, hd = self._heads, self._head_dim
        x = x.view(B * n, d)
        qkv = torch.mm(x, w.qkv_t).mul_(_inv_rms(x, w.d_eps))
        # (B, 3, H, n, hd / 2) complex: a view for one token, a strided view of the (B, n, 3, H, hd) layout else
        qkv = qkv.view(B, 3, H, 1, hd // 2, 2) if n == 1 else qkv.view(B, n, 3, H, hd // 2, 2).permute(0, 2, 3, 1, 4, 5)
        torch.mul(torch.view_as_complex(qkv), views.rope, out=views.rotated)      # q, k rotated (pair order), v
        slot, self._slot = self._slot, self._slot + 1
        new = views.rotated[:, 1:]
        if self._frozen is not None:           # skip_halted: halted tokens keep the keys of the previous step's call
            new = torch.where(self._frozen.view(B, 1, 1, n, 1), views.writes[slot - self._per_step], new)
        views.writes[slot].copy_(new)
        att = F.scaled_dot_product_attention(views.q, views.keys[slot], views.values[slot], attn_mask=views.mask)
        att = att.view(B, d) if n == 1 else att.transpose(1, 2).reshape(B * n, d)
        x = torch.addmm(x, att, w.o_t)                                                          # x + o_proj(att)
        gate, up = torch.mm(x, w.gate_up_t).mul_(_inv_rms(x, w.d_eps)).chunk(2, dim=-1)
        return torch.addmm(x, F.silu(gate).mul_(up), w.down_t).view(B, n, d)          # x + ffn(...)
