"""TRM recursion (Tiny Recursive Model) on top of the backbone encoding x.

One small shared network f (causal blocks, then RMSNorm so the states keep unit scale however often f is
applied) refines a latent z and an answer y. Inputs are combined by addition, as in the reference:

    y_0 = x, z_0 = 0
    outer step t: micro_steps times  z <- f(x + y + z)     (latent refinement, sees the input)
                  once               y <- f(y + z)         (answer update, does not see x)

Each outer step's y is decoded by the caller (deep supervision). With detach_between_steps the carry
(y, z) is detached before every step after the first, so step t's loss trains step t only (x still gets
gradient from every step).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from forge.model.act import HaltingHead
from forge.model.backbone import Block
from forge.model.norm import RMSNorm
from forge.model.rope import RopeTables
from forge.model.window import AttentionPattern
from forge.spec.model import ACTSpec, TRMSpec


def run_checkpointed(module: nn.Module, *args):
    """module(*args) without keeping its activations when gradients are on: they are recomputed in backward.
    The recomputation repeats the attention modules' side effects, which are idempotent (max_logit is a running
    max, stats are overwritten with equal values); nothing in the model draws random numbers."""
    if not torch.is_grad_enabled():
        return module(*args)
    return checkpoint(module, *args, use_reentrant=False)


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


class TRM(nn.Module):
    def __init__(self, d_model: int, n_heads: int, spec: TRMSpec, act: ACTSpec, pattern: AttentionPattern,
                 norm_eps: float):
        super().__init__()
        self.t_max, self.micro_steps, self.detach = spec.t_max, spec.micro_steps, spec.detach_between_steps
        self.net = Refiner(d_model, n_heads, spec, pattern, norm_eps)
        self.act = HaltingHead(d_model, spec.t_max, act.ema_teacher)
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

    def steps(self, x: torch.Tensor, rope: RopeTables) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (y_t, z_t) after each outer step; stop consuming to skip the remaining steps."""
        y, z = x, torch.zeros_like(x)
        for t in range(self.t_max):
            if t > 0 and self.detach:
                y, z = y.detach(), z.detach()
            for _ in range(self.micro_steps):
                z = self.refine(x + y + z, rope)
            y = self.refine(y + z, rope)
            self._record("y", y)
            self._record("z", z)
            yield y, z
