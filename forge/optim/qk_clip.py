"""QK-clip (MuonClip, Kimi K2): cap each attention head's max logit at tau by rescaling W_Q / W_K (D3, E1).

During the forward pass every attention module records max_logit[h] = S_h, the largest q.k / sqrt(d)
over the pairs it attended to. After the optimizer step, for each head with S_h > tau:

    gamma = tau / S_h;   W_Q[h] <- sqrt(gamma) W_Q[h];   W_K[h] <- sqrt(gamma) W_K[h]

Logits are bilinear in (W_Q, W_K) and RoPE is a rotation, so that head's logits scale by exactly
gamma and its max becomes tau. With a protected rotary key (mlarope_shared_k_protected) W_K is never
touched and W_Q takes the full gamma. Per-layer mode uses the layer's max over heads for all its heads.
Heads at or below tau, W_V and W_O are untouched. QK-norm would undo this; there is none.

The protocol an attention module follows (forge/model/attention.py): nn.Linear q_proj, k_proj, v_proj,
o_proj with rows h*head_dim:(h+1)*head_dim of q/k belonging to head h; ints n_heads, head_dim; a bool
track_max_logit; and, after a forward with tracking on, max_logit: tensor (n_heads,) (None once consumed).
"""
from __future__ import annotations

import torch
from torch import nn

from forge.distributed import initialised
from forge.spec.optim import QKClipSpec

ROUNDING_TOLERANCE = 1e-5  # relative; far below any meaningful overshoot, far above fp32 rounding
PROTOCOL = ("q_proj", "k_proj", "v_proj", "o_proj", "n_heads", "head_dim", "track_max_logit")


def clippable_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of `model` that QK-clip can rescale: those following PROTOCOL (backbone and TRM refiner
    attention alike; forge.model.attention_modules lists the model's own Attention modules)."""
    return [m for m in model.modules() if all(hasattr(m, name) for name in PROTOCOL)]


def set_max_logit_tracking(model: nn.Module, enabled: bool) -> int:
    """Turn max-logit recording on/off in every attention module (on iff QK-clip is enabled: the
    record costs a pass over the attended scores). Returns the number of modules."""
    modules = clippable_modules(model)
    for m in modules:
        m.track_max_logit = enabled
    return len(modules)


class QKClip:
    """QK-clip as a training run wires it, built once from [optim.qk_clip] with the model
    (forge.train.components): max-logit tracking on iff QK-clip is enabled, and after_step after every
    optimizer step."""

    def __init__(self, spec: QKClipSpec, model: nn.Module):
        self.spec, self.model = spec, model
        set_max_logit_tracking(model, spec.enabled)
        self.n_heads = max(1, sum(m.n_heads for m in clippable_modules(model)))   # optim/qk_clip_fraction

    def after_step(self, applied: bool) -> int:
        """Heads clipped after an optimizer step; 0 after a step the optimizer undid (non-finite), whose
        max-logit records stay for the next step."""
        return qk_clip(self.model, self.spec) if applied else 0


@torch.no_grad()
def qk_clip(model: nn.Module, spec: QKClipSpec) -> int:
    """Rescale the W_Q/W_K rows of every head whose recorded max logit exceeds spec.tau; consume the
    records (max_logit <- None; a module without a record since the last call is left alone). Returns
    the number of heads clipped (logged as optim/qk_clip_heads).

    Under torch.distributed the maxima are all-reduced (MAX) first, so every rank clips identically.
    """
    if not spec.enabled:
        return 0
    modules = clippable_modules(model)
    if not modules:
        raise RuntimeError("QK-clip is enabled but the model has no attention module with "
                           f"{', '.join(PROTOCOL)}")
    untracked = [type(m).__name__ for m in modules if not m.track_max_logit]
    if untracked:
        raise RuntimeError(f"QK-clip is enabled but {len(untracked)} attention module(s) ({untracked[0]}, ...) do "
                           "not record their max logit: call set_max_logit_tracking(model, True) once after "
                           "building the model")
    modules = [m for m in modules if m.max_logit is not None]  # None: no forward since the last clip
    if not modules:
        return 0
    maxima = torch.stack([m.max_logit.detach().float() for m in modules])  # (n_modules, n_heads)
    if initialised():
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
    clipped = 0
    for m, head_max in zip(modules, maxima):
        if not spec.per_head:
            head_max = head_max.max().expand_as(head_max)
        # A max within float rounding of tau counts as at tau, so re-clipping a clipped head is an exact
        # no-op; a non-finite max is left to the optimizer's non-finite guard.
        over = torch.isfinite(head_max) & (head_max > spec.tau * (1.0 + ROUNDING_TOLERANCE))
        if over.any():
            gamma = spec.tau / head_max[over]
            if spec.mlarope_shared_k_protected:
                _scale_heads(m, m.q_proj, over, gamma)
            else:
                _scale_heads(m, m.q_proj, over, gamma.sqrt())
                _scale_heads(m, m.k_proj, over, gamma.sqrt())
            clipped += int(over.sum())
        m.max_logit = None
    return clipped


def _scale_heads(attn: nn.Module, proj: nn.Linear, heads: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply the output rows of the selected heads (and their bias, if any) by factor[head]."""
    if proj.weight.size(0) != attn.n_heads * attn.head_dim:
        raise ValueError(f"{type(attn).__name__}: projection has {proj.weight.size(0)} output rows, QK-clip needs "
                         f"n_heads * head_dim = {attn.n_heads * attn.head_dim} (one block of rows per head)")
    for tensor in (proj.weight, proj.bias):
        if tensor is None:
            continue
        per_head = tensor.view(attn.n_heads, -1)  # rows of head h are contiguous, so one row of this view per head
        per_head[heads] = per_head[heads] * factor.to(tensor.dtype).unsqueeze(1)
