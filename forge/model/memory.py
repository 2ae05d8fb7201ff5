"""Titans long-term memory (LMM): an associative memory learned at test time, chunk by chunk.

q, k, v are projections of the (normalised) input u to d_mem; q and k are L2-normalised. The memory M maps
keys to values; per chunk c of C tokens, with every gradient taken at the chunk-start memory (Titans 3.2):

    grad_c = grad_W (1/C) sum_t theta_t ||M(k_t) - v_t||^2     for every weight W of M
    S_c    = eta_c * S_{c-1} - grad_c                           surprise with momentum
    W_c    = alpha_c * W_{c-1} + S_c                            forgetting (alpha = 1 - the paper's alpha_t)

theta_t = sigmoid(w . u_t + b) is the learned, per-token step size. The MLP memory's grad_c is clipped to
spec.max_grad_norm G per sequence (grad_c * min(1, G / ||grad_c||) over all its weights): the chunk loss's
curvature grows with M's weights (the other layers' weights and activations multiply each gradient), and once it
passes 2 (1 + eta), the limit of gradient descent with momentum at step 1, every update enlarges the weights and
with them the curvature (d_mem 256: 20 at chunk 3, 567 at chunk 5, 6e10 at chunk 7, then NaN). The clip makes
the growth at most linear per chunk: ||S_c|| <= c G, ||W_c|| <= ||W_0|| + c (c + 1) / 2 G. The linear memory
needs none: its curvature is 2 sum theta k k^T / C <= 2 for unit keys. The reads of chunk c, M_{c-1}(q_t), use
the memory as of the end of the previous chunk, so a position never sees its own chunk: causal. The state
starts from the learned initial weights for every sequence: stateless, deterministic. The outer training
differentiates through every inner update (no detach).

Variants (spec [model.memory]):
  variant = "linear"   M(x) = M x, one d_mem x d_mem matrix (M_0 = W1 W2 when factorized); the gradient is
                       2 (M k - v) k^T, one matmul per chunk.
  variant = "mlp"      Titans' deep memory: M(x) = x + W_L gelu(... gelu(W_1 x)), depth L >= 2, hidden width
                       expansion * d_mem; the gradient is backpropagated through the MLP by explicit formulas
                       (tested equal to torch.autograd.grad), momentum and forgetting act on every weight.
  gates = "fixed"      eta = spec.momentum, alpha = spec.decay.
  gates = "data_dependent"  eta_c = sigmoid(w_eta . mean_c(u) + b_eta), alpha_c likewise, per chunk and
                       sequence (as titans-pytorch); initialised at spec.momentum and spec.decay.
  conv_kernel = K > 0  a depthwise causal 1-D convolution over time after the q, k, v projections (each
                       channel mixes its last K positions), initialised to the identity.
  qkv_activation = "silu"  SiLU on q, k, v after the convolution (before q and k are L2-normalised).
  input_layer = n      the memory reads the residual stream after n backbone blocks (0: token embeddings).

Design differences to the paper / titans-pytorch that remain:
  - Gates are per chunk (titans-pytorch), not per token (paper eq. 13-14): the momentum and forgetting of a
    chunk's update come from the mean of its inputs' logits; a per-token scan would cost C sequential steps.
  - One memory head over d_mem (titans-pytorch splits it into heads); no persistent memory tokens; no
    learned max step size (theta in (0, 1)).
  - The MLP memory's bound is a hard clip of the chunk gradient's norm over all weights (titans-pytorch's
    max_grad_norm is a tanh soft clamp per weight matrix); the paper has none (max_grad_norm = 0).
  - The MLP memory is x + MLP(x) without the LayerNorm titans-pytorch's ResidualNorm puts on the MLP output
    (the norm would be one more test-time-learned weight); bias-free layers, GELU between them.
  - The MLP's learned initial weights start at N(0, 1 / fan_in) (titans-pytorch: Xavier uniform), not at the
    model's init_std: with weights of ~0.02 the inner gradient (a product of the other layers) would vanish.
  - The convolution has no bias and starts as the identity, so a model without it and with it agree at init.
  - The MAG combination is forge's gate (forge/model/gate.py), not the paper's norm(y) * sigmoid(norm(m)).

Metrics (one value per forward, the mean over the chunk updates and the batch):
  memory/update_norm     ||S_c|| over all weights of M.
  memory/effective_decay the share of the old memory that survives an update: ||alpha_c W - grad_c^own|| /
                         ||W|| over all weights, where grad_c^own is the gradient term of M's own recall
                         (the error M(k) - v with v replaced by the residual input, i.e. the erasure along this
                         chunk's keys): alpha_c alone when nothing is written. For the linear memory this is
                         ||M (alpha I - step sum theta k k^T)|| / ||M||.
  memory/step_size       mean theta.
  memory/momentum, memory/forget_gate   mean eta_c and alpha_c (data-dependent gates only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from forge.model.norm import RMSNorm
from forge.spec.model import MemorySpec

Gate = Union[float, torch.Tensor]     # a fixed factor, or one per sequence (B, 1, 1)


class LinearMemory:
    """M(x) = M x with weights [M (B, d, d)]."""

    @staticmethod
    def read(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x @ weights[0].transpose(1, 2)

    @staticmethod
    def recall(weights, x):
        """(M(x), the part of M(x) that is M's own content, the cache backward needs)."""
        out = x @ weights[0].transpose(1, 2)
        return out, out, None

    @staticmethod
    def backward(weights, x, cache, g: torch.Tensor) -> list[torch.Tensor]:
        """Gradients of sum_t g_t . M(x_t) with respect to every weight."""
        return [g.transpose(1, 2) @ x]


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d gelu(z) / dz for the exact (erf) GELU."""
    return 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2)))) + z * torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))


class MLPMemory:
    """M(x) = x + z_L, z_i = a_{i-1} W_i, a_i = gelu(z_i), a_0 = x; weights [W_1 (B, d, h), ..., W_L (B, h, d)]."""

    @staticmethod
    def read(weights, x):
        return MLPMemory.recall(weights, x)[0]

    @staticmethod
    def recall(weights, x):
        acts, pre = [x], []
        a = x
        for i, w in enumerate(weights):
            z = a @ w
            if i < len(weights) - 1:
                pre.append(z)
                a = F.gelu(z)
                acts.append(a)
            else:
                a = z
        return x + a, a, (acts, pre)

    @staticmethod
    def backward(weights, x, cache, g):
        acts, pre = cache
        grads = [None] * len(weights)
        delta = g
        for i in range(len(weights) - 1, -1, -1):
            grads[i] = acts[i].transpose(1, 2) @ delta
            if i:
                delta = (delta @ weights[i].transpose(1, 2)) * _gelu_grad(pre[i - 1])
        return grads


MEMORY_MODELS = {"linear": LinearMemory, "mlp": MLPMemory}


def chunk_write(model, weights: list[torch.Tensor], surprise: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                theta: torch.Tensor, decay: Gate, momentum: Gate, max_grad_norm: Optional[float] = None,
                observe: bool = True):
    """One chunk's write from the chunk-start weights and surprise (each (B, ...)), the chunk's k, v (B, C, d)
    and theta (B, C, 1): (new weights, new surprise, observations or None). max_grad_norm: the chunk's gradient
    (over all weights of M, per sequence) is scaled to at most this norm (None: unclipped). Observations
    (detached, batch means): "update_norm" ||S_c|| and "retention" (see the module docstring)."""
    step = 2.0 / k.shape[1]
    recalled, own, cache = model.recall(weights, k)
    grads = [step * g for g in model.backward(weights, k, cache, theta * (recalled - v))]
    if max_grad_norm is not None:
        # the gradient of the clipped loss min(1, G / ||grad||) * loss (the factor taken as a constant)
        scale = (max_grad_norm / _norm(grads).clamp_min(1e-30)).clamp(max=1.0)
        grads = [scale.to(g.dtype).view(-1, 1, 1) * g for g in grads]
    surprise = [momentum * s - g for s, g in zip(surprise, grads)]
    new_weights = [decay * w + s for w, s in zip(weights, surprise)]
    observed = None
    if observe:
        with torch.no_grad():
            erasure = model.backward(weights, k, cache, theta * own)
            kept = _norm([decay * w - step * e for w, e in zip(weights, erasure)])
            observed = {"update_norm": _norm(surprise).mean(),
                        "retention": (kept / _norm(weights).clamp_min(1e-30)).mean()}
    return new_weights, surprise, observed


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-sequence L2 norm over a list of (B, ...) tensors: (B,), summed in fp32 (bf16 under autocast)."""
    return torch.stack([t.flatten(1).float().square().sum(1) for t in tensors]).sum(0).sqrt()


def scan(model, weights0: list[torch.Tensor], q, k, v, theta, decay, momentum, chunk_size: int,
         max_grad_norm: Optional[float] = None):
    """Run the memory over a sequence: weights0 unbatched or (B, ...); q, k, v (B, T, d); theta (B, T); decay and
    momentum floats or (B, n_chunks). Returns (reads (B, T, d), final weights, observations (n_chunks,) each)."""
    B, T = theta.shape
    weights = [w.expand(B, *w.shape[-2:]) for w in weights0]
    surprise = [torch.zeros_like(w) for w in weights]
    reads, observed = [], []
    for c, start in enumerate(range(0, T, chunk_size)):
        sl = slice(start, start + chunk_size)
        reads.append(model.read(weights, q[:, sl]))             # M(q): the memory of the previous chunk
        weights, surprise, obs = chunk_write(model, weights, surprise, k[:, sl], v[:, sl], theta[:, sl, None],
                                             _gate(decay, c), _gate(momentum, c), max_grad_norm)
        observed.append(obs)
    return torch.cat(reads, dim=1), weights, {key: torch.stack([o[key] for o in observed]) for key in observed[0]}


def _gate(value: Gate, c: int) -> Gate:
    return value if isinstance(value, float) else value[:, c, None, None]


def memory_scan(memory0, q, k, v, theta, decay: float, momentum: float, chunk_size: int,
                max_grad_norm: Optional[float] = None):
    """The linear memory over a sequence (memory0 (d, d) or (B, d, d)): (reads, final M, observations)."""
    reads, weights, observed = scan(LinearMemory, [memory0], q, k, v, theta, decay, momentum, chunk_size,
                                    max_grad_norm)
    return reads, weights[0], observed


@dataclass
class MemoryState:
    """A batch's memory while decoding: the weights and surprise after the completed chunks, the inputs of the
    chunk being filled, and the last conv_kernel - 1 projections (the convolution's causal context)."""
    weights: list[torch.Tensor]
    surprise: list[torch.Tensor]
    conv_tail: Optional[torch.Tensor]
    pending: list[tuple] = field(default_factory=list)    # per piece: k, v, theta (B, n, 1), gate logits or None

    @property
    def pending_len(self) -> int:
        return sum(piece[0].shape[1] for piece in self.pending)


class NeuralMemory(nn.Module):
    def __init__(self, d_model: int, spec: MemorySpec, norm_eps: float):
        super().__init__()
        d_mem = self.d_mem = spec.d_mem
        self.spec = spec
        self.decay, self.momentum, self.chunk_size = spec.decay, spec.momentum, spec.chunk_size
        self.model = MEMORY_MODELS[spec.variant]
        # the linear memory is stable unbounded (spec.max_grad_norm); 0 = unbounded
        self.max_grad_norm = spec.max_grad_norm if spec.variant == "mlp" and spec.max_grad_norm > 0 else None
        self.norm = RMSNorm(d_model, norm_eps)
        self.q_proj = nn.Linear(d_model, d_mem, bias=False)
        self.k_proj = nn.Linear(d_model, d_mem, bias=False)
        self.v_proj = nn.Linear(d_model, d_mem, bias=False)
        self.o_proj = nn.Linear(d_mem, d_model, bias=False)
        if spec.variant == "mlp":       # learned initial weights W_1 (d, h), ..., W_L (h, d)
            dims = [d_mem] + [spec.expansion * d_mem] * (spec.depth - 1) + [d_mem]
            self.init_weights = nn.ParameterList(nn.Parameter(torch.empty(a, b)) for a, b in zip(dims, dims[1:]))
        elif spec.factorized:   # M_0 = W1 W2, rank-limited: 2 * d_mem * rank parameters instead of d_mem^2
            self.init_left = nn.Parameter(torch.empty(d_mem, spec.rank))
            self.init_right = nn.Parameter(torch.empty(spec.rank, d_mem))
        else:
            self.init_memory = nn.Parameter(torch.empty(d_mem, d_mem))
        # step size theta_t = sigmoid(w . u_t + b): 1-D parameters (AdamW), 0.5 at initialisation
        self.step_size_weight = nn.Parameter(torch.zeros(d_model))
        self.step_size_bias = nn.Parameter(torch.zeros(1))
        if spec.gates == "data_dependent":   # eta_c, alpha_c = sigmoid(w . mean_c(u) + b), at spec's values
            self.momentum_weight = nn.Parameter(torch.zeros(d_model))
            self.momentum_bias = nn.Parameter(torch.full((1,), _logit(spec.momentum)))
            self.decay_weight = nn.Parameter(torch.zeros(d_model))
            self.decay_bias = nn.Parameter(torch.full((1,), _logit(spec.decay)))
        if spec.conv_kernel:   # depthwise causal conv over q|k|v channels; 1-D (AdamW), the identity at init
            taps = torch.zeros(3 * d_mem, spec.conv_kernel)
            taps[:, -1] = 1.0
            self.conv_weight = nn.Parameter(taps.flatten())
        self.reset_memory_init()

    def reset_memory_init(self) -> None:
        """The MLP memory's initial weights ~ N(0, 1 / fan_in) (CognateModel re-applies this after its
        init_std pass over every matrix): at init_std the inner gradients would vanish."""
        if self.spec.variant == "mlp" and not self.init_weights[0].is_meta:
            with torch.no_grad():
                for w in self.init_weights:
                    nn.init.normal_(w, std=w.shape[0] ** -0.5)

    def initial_weights(self) -> list[torch.Tensor]:
        if self.spec.variant == "mlp":
            return list(self.init_weights)
        if hasattr(self, "init_memory"):
            return [self.init_memory]
        return [self.init_left @ self.init_right]

    def initial_memory(self) -> torch.Tensor:
        """The linear memory's M_0 (d_mem, d_mem)."""
        return self.initial_weights()[0]

    def project(self, h: torch.Tensor, conv_tail: Optional[torch.Tensor] = None):
        """Per-token q, k (L2-normalised), v (B, T, d_mem), step size theta (B, T), gate logits (B, T, 2)
        (momentum, forgetting; None with fixed gates) and the convolution's context for the next positions
        (None without convolution). conv_tail: the previous positions' projections (zeros at the start)."""
        u = self.norm(h)
        q, k, v = self.q_proj(u), self.k_proj(u), self.v_proj(u)
        K = self.spec.conv_kernel
        if K:
            qkv = torch.cat([q, k, v], dim=-1)
            if conv_tail is None:
                conv_tail = qkv.new_zeros(qkv.shape[0], K - 1, qkv.shape[-1])
            padded = torch.cat([conv_tail, qkv], dim=1)
            conv_tail = padded[:, padded.shape[1] - (K - 1):]
            taps = self.conv_weight.view(qkv.shape[-1], 1, K)
            qkv = F.conv1d(padded.transpose(1, 2), taps, groups=qkv.shape[-1]).transpose(1, 2)
            q, k, v = qkv.split(self.d_mem, dim=-1)
        if self.spec.qkv_activation == "silu":
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        theta = torch.sigmoid(u @ self.step_size_weight + self.step_size_bias)
        gate_logits = None
        if self.spec.gates == "data_dependent":
            gate_logits = torch.stack([u @ self.momentum_weight + self.momentum_bias,
                                       u @ self.decay_weight + self.decay_bias], dim=-1)
        return q, k, v, theta, gate_logits, conv_tail

    def _chunk_gates(self, gate_logits: Optional[torch.Tensor], chunk_size: int):
        """(decay, momentum) per chunk: the spec's floats, or (B, n_chunks) from the chunks' mean logits."""
        if gate_logits is None:
            return self.decay, self.momentum
        B, T, _ = gate_logits.shape
        n = -(-T // chunk_size)
        padded = F.pad(gate_logits, (0, 0, 0, n * chunk_size - T))
        counts = torch.full((n,), float(chunk_size), device=gate_logits.device)
        counts[-1] = T - (n - 1) * chunk_size
        gates = torch.sigmoid(padded.view(B, n, chunk_size, 2).sum(2) / counts[None, :, None])
        return gates[..., 1], gates[..., 0]

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """h (B, T, d_model) -> memory path m (B, T, d_model) and memory/* metrics."""
        q, k, v, theta, gate_logits, _ = self.project(h)
        decay, momentum = self._chunk_gates(gate_logits, self.chunk_size)
        reads, _, observed = scan(self.model, self.initial_weights(), q, k, v, theta, decay, momentum,
                                  self.chunk_size, self.max_grad_norm)
        metrics = {"memory/update_norm": observed["update_norm"].mean(),
                   "memory/effective_decay": observed["retention"].mean(),
                   "memory/step_size": theta.detach().mean()}
        if gate_logits is not None:
            metrics["memory/momentum"], metrics["memory/forget_gate"] = momentum.detach().mean(), decay.detach().mean()
        return self.o_proj(reads), metrics

    # ------------------------------------------------------------------------------------------ incremental
    def init_state(self, batch: int) -> MemoryState:
        weights = [w.expand(batch, *w.shape).clone() for w in self.initial_weights()]
        return MemoryState(weights, [torch.zeros_like(w) for w in weights], None)

    def step(self, state: MemoryState, h: torch.Tensor) -> torch.Tensor:
        """The memory path of the next positions h (B, n, d_model) of the sequences in state (updated in place):
        each reads the memory as of the end of the previous chunk; a chunk that fills up is written (the same
        math as forward: equal outputs to float rounding)."""
        q, k, v, theta, gate_logits, state.conv_tail = self.project(h, state.conv_tail)
        chunk, reads, i, n = self.chunk_size, [], 0, h.shape[1]
        while i < n:
            take = min(n - i, chunk - state.pending_len)     # up to the end of the current chunk
            sl = slice(i, i + take)
            reads.append(self.model.read(state.weights, q[:, sl]))
            state.pending.append((k[:, sl], v[:, sl], theta[:, sl, None],
                                  None if gate_logits is None else gate_logits[:, sl]))
            if state.pending_len == chunk:
                kc, vc, tc = (torch.cat(parts, dim=1) for parts in list(zip(*state.pending))[:3])
                gc = None if gate_logits is None else torch.cat([p[3] for p in state.pending], dim=1)
                decay, momentum = self._chunk_gates(gc, chunk)
                state.weights, state.surprise, _ = chunk_write(self.model, state.weights, state.surprise, kc, vc,
                                                               tc, _gate(decay, 0), _gate(momentum, 0),
                                                               self.max_grad_norm, observe=False)
                state.pending = []
            i += take
        return self.o_proj(reads[0] if len(reads) == 1 else torch.cat(reads, dim=1))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))
