"""Fused, chunked LM head + cross-entropy for the deep-supervision steps.

The tied head decodes every outer step: per step a (B*T, vocab) logits tensor (8192 wide: 134 MB at batch
8 x 512 in fp32), which the plain path writes, reads into log_softmax (another such tensor, kept for the
backward), zero-fills for the NLL gradient and reads again in the backward. Here the rows go through in
chunks of `chunk` tokens: each chunk's logits give its loss, its argmax, and at once the loss's gradient with
respect to the chunk's logits (softmax - one-hot), which is turned straight into the gradients of the head's
input and weight. Nothing vocabulary-wide outlives a chunk, and a chunk (8 MB at 256 rows) is reused from
the allocator's cache instead of being mapped and page-faulted afresh. The same three matmuls run as in the
plain path (logits, grad input, grad weight), all in the forward.

The model uses it on CPU only: on an H100 (phase1, batch 32 x 512, bf16, interleaved A/B,
benchmarks/bench_memory_levers.py) it lowers the peak from 11.7 to 9.0 GB but makes the step 1.55x longer
(0.225 against 0.145 s), where gradient checkpointing saves more memory for less time.

That is exact because the loss is a sum: d(g * sum_i ce_i) = g * d(sum_i ce_i), so the backward only scales
the stored gradients by the incoming scalar g. The function therefore returns the *sum* of the per-token
losses (differentiable) plus the detached per-token losses and argmax predictions the caller logs.
"""
from __future__ import annotations

import torch

from forge.model.autocast import autocast_off, compute_dtype

# Rows per chunk: (chunk x vocab) fp32 logits = 8 MB at vocab 8192, reused from the allocator's cache (glibc
# maps anything above 32 MB afresh). Measured on the 2-core CPU, 4096 rows x 512 -> 8192, forward + backward:
# 256 rows 0.87-0.90x the plain head's time, 512 rows 0.89-0.92x, 1024 rows 0.94-0.96x (BENCHMARKS.md).
CE_CHUNK = 256


def linear_cross_entropy(u: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         chunk: int = CE_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u (N, d) (the normalised states), weight (V, d) (the tied head), targets (N,) long, ignore_index for
    targets that carry no loss. Returns (sum of the per-token cross-entropies of logits = u weight^T, with
    gradient; the per-token cross-entropies (N,) detached, 0 where ignored; the argmax predictions (N,)).
    Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as F.linear + F.cross_entropy
    would."""
    if not torch.is_grad_enabled():     # evaluation: a Function's needs_input_grad ignores no_grad
        u, weight = u.detach(), weight.detach()
    device = u.device.type
    dtype = compute_dtype(device, u.dtype)
    with autocast_off(device):
        return _LinearCrossEntropy.apply(u, weight, targets, ignore_index, chunk, dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, weight, targets, ignore_index, chunk, dtype):
        n = u.shape[0]
        uc_all, w = u.detach().to(dtype), weight.detach().to(dtype)
        ce = torch.zeros(n, dtype=torch.float32, device=u.device)
        pred = torch.empty(n, dtype=torch.long, device=u.device)
        grad_u = torch.empty(n, u.shape[1], dtype=torch.float32, device=u.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=u.device) if ctx.needs_input_grad[1] else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            uc, tc = uc_all[start:end], targets[start:end]
            logits = (uc @ w.T).float()                                   # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            valid = tc != ignore_index
            safe = torch.where(valid, tc, 0)
            target_logit = logits.gather(1, safe[:, None]).squeeze(1)
            ce[start:end] = torch.where(valid, lse - target_logit, 0.0)
            pred[start:end] = logits.argmax(-1)
            if grad_u is None and grad_w is None:
                continue
            # d ce_i / d logits_i = softmax_i - onehot(target_i); rows without a target contribute nothing
            probs = logits.sub_(lse[:, None]).exp_()
            probs.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
            probs.mul_(valid[:, None])
            probs = probs.to(dtype)
            if grad_u is not None:
                grad_u[start:end] = probs @ w
            if grad_w is not None:
                if dtype == torch.float32:               # addmm's out= form: torch's FLOP counter sees it
                    torch.addmm(grad_w, probs.T, uc, out=grad_w)
                else:                                    # a bf16 product per chunk, summed in fp32
                    grad_w.add_(probs.T @ uc)
        ctx.save_for_backward(grad_u, grad_w)
        ctx.mark_non_differentiable(ce, pred)
        ctx.dtypes = (u.dtype, weight.dtype)
        return ce.sum(), ce, pred

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_pred):
        grad_u, grad_w = ctx.saved_tensors
        gu = None if grad_u is None else (grad_u * grad_total).to(ctx.dtypes[0])
        gw = None if grad_w is None else (grad_w * grad_total).to(ctx.dtypes[1])
        return gu, gw, None, None, None, None
