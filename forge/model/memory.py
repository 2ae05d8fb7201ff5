"""Titans long-term memory (LMM): a linear associative memory learned at test time, chunk by chunk.

q, k, v are projections of the (normalised) input to d_mem; q and k are L2-normalised so the update below
is a stable gradient step for any step size theta in (0, 1). The memory M (d_mem x d_mem) maps keys to
values; per chunk c of C tokens, with every gradient taken at the chunk-start memory (Titans 3.2):

    grad_c = (2 / C) * sum_t theta_t (M k_t - v_t) k_t^T      gradient of (1/C) sum_t theta_t ||M k_t - v_t||^2
    S_c    = momentum * S_{c-1} - grad_c                       surprise with momentum
    M_c    = decay * M_{c-1} + S_c                             forgetting

theta_t = sigmoid(w . u_t + b) is the learned, per-token step size. The reads of chunk c, M_{c-1} q_t, use
the memory as of the end of the previous chunk, so a position never sees its own chunk: causal. The state
starts from the learned M_0 (W1 W2 when factorized) for every sequence: stateless, deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forge.model.norm import RMSNorm
from forge.spec.model import MemorySpec


def memory_scan(memory0: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
                decay: float, momentum: float, chunk_size: int):
    """Run the memory over a sequence. memory0 (d, d) or (B, d, d); q, k, v (B, T, d); theta (B, T).

    Returns (reads (B, T, d), final memory (B, d, d), per-update observations, each (n_chunks,), batch-averaged
    and detached: "update_norm" ||S_c||_F and "retention" ||M_{c-1} (decay I - step sum theta k k^T)||_F /
    ||M_{c-1}||_F, the share of the old memory that survives the update: logged as memory/effective_decay)."""
    B, T, d = k.shape
    memory = memory0.expand(B, d, d)
    surprise = torch.zeros_like(memory)
    reads, update_norms, retentions = [], [], []
    for start in range(0, T, chunk_size):
        qc, kc, vc = q[:, start:start + chunk_size], k[:, start:start + chunk_size], v[:, start:start + chunk_size]
        tc = theta[:, start:start + chunk_size, None]
        reads.append(qc @ memory.transpose(1, 2))                        # M q, memory of the previous chunk
        new_memory, surprise, recalled = memory_update(memory, surprise, kc, vc, tc, decay, momentum)
        step = 2.0 / kc.shape[1]
        with torch.no_grad():
            # old content that survives: M (decay I - step sum_t theta_t k_t k_t^T), i.e. forgetting plus the
            # erasure along this chunk's keys, relative to ||M||; decay alone when nothing is written
            kept = decay * memory - step * (tc * recalled).transpose(1, 2) @ kc
            retention = kept.flatten(1).norm(dim=1) / memory.flatten(1).norm(dim=1).clamp_min(1e-30)
            retentions.append(retention.mean())
            update_norms.append(surprise.flatten(1).norm(dim=1).mean())
        memory = new_memory
    observed = {"update_norm": torch.stack(update_norms), "retention": torch.stack(retentions)}
    return torch.cat(reads, dim=1), memory, observed


def memory_update(memory: torch.Tensor, surprise: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  theta: torch.Tensor, decay: float, momentum: float):
    """One chunk's write: (M_c, S_c, M_{c-1} k) from M_{c-1}, S_{c-1} (B, d, d) and the chunk's k, v (B, C, d),
    theta (B, C, 1); every gradient at the chunk-start memory."""
    recalled = k @ memory.transpose(1, 2)                                # M k, (B, C, d)
    grad = (2.0 / k.shape[1]) * (theta * (recalled - v)).transpose(1, 2) @ k   # (B, d, d)
    surprise = momentum * surprise - grad
    return decay * memory + surprise, surprise, recalled


class NeuralMemory(nn.Module):
    def __init__(self, d_model: int, spec: MemorySpec, norm_eps: float):
        super().__init__()
        d_mem = spec.d_mem
        self.decay, self.momentum, self.chunk_size = spec.decay, spec.momentum, spec.chunk_size
        self.norm = RMSNorm(d_model, norm_eps)
        self.q_proj = nn.Linear(d_model, d_mem, bias=False)
        self.k_proj = nn.Linear(d_model, d_mem, bias=False)
        self.v_proj = nn.Linear(d_model, d_mem, bias=False)
        self.o_proj = nn.Linear(d_mem, d_model, bias=False)
        if spec.factorized:   # M_0 = W1 W2, rank-limited: 2 * d_mem * rank parameters instead of d_mem^2
            self.init_left = nn.Parameter(torch.empty(d_mem, spec.rank))
            self.init_right = nn.Parameter(torch.empty(spec.rank, d_mem))
        else:
            self.init_memory = nn.Parameter(torch.empty(d_mem, d_mem))
        # step size theta_t = sigmoid(w . u_t + b): 1-D parameters (AdamW), 0.5 at initialisation
        self.step_size_weight = nn.Parameter(torch.zeros(d_model))
        self.step_size_bias = nn.Parameter(torch.zeros(1))

    def initial_memory(self) -> torch.Tensor:
        if hasattr(self, "init_memory"):
            return self.init_memory
        return self.init_left @ self.init_right

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token q, k (L2-normalised), v (B, T, d_mem) and step size theta (B, T) of the input h."""
        u = self.norm(h)
        q = F.normalize(self.q_proj(u), dim=-1)
        k = F.normalize(self.k_proj(u), dim=-1)
        theta = torch.sigmoid(u @ self.step_size_weight + self.step_size_bias)
        return q, k, self.v_proj(u), theta

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """h (B, T, d_model) -> memory path m (B, T, d_model) and memory/* metrics."""
        q, k, v, theta = self.project(h)
        reads, _, observed = memory_scan(self.initial_memory(), q, k, v, theta,
                                         self.decay, self.momentum, self.chunk_size)
        metrics = {"memory/update_norm": observed["update_norm"].mean(),
                   "memory/effective_decay": observed["retention"].mean(),
                   "memory/step_size": theta.detach().mean()}
        return self.o_proj(reads), metrics
