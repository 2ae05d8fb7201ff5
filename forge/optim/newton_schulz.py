"""Orthogonalisation of a Muon update: quintic Newton-Schulz (fast, approximate) or exact SVD (D2 fallback).

Both return (approximately) the polar factor U V^T of G = U S V^T, i.e. G with every non-zero singular
value replaced by 1. Newton-Schulz gets there with matmuls only:

    X <- G / ||G||_F                          (all singular values now in [0, 1])
    repeat k times:  A = X X^T;  X <- a X + (b A + c A^2) X

which applies p(s) = a s + b s^3 + c s^5 to every singular value s. Keller Jordan's coefficients
(a, b, c) = (3.4445, -4.7750, 2.0315) make p steep at 0 (slope 3.4445) so small singular values grow
fast; the price is that they do not converge to exactly 1 but oscillate in a band (~[0.68, 1.21] after
five steps for s / ||G||_F >= 0.003). That band is what the tests check.
"""
from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Guards G = 0 (the update is then exactly 0, never NaN: DeepSpeed#8533, dion#24). A floor instead of
# Keller's "+ 1e-7" keeps NS(cG) = NS(G) exact for the small gradient norms of late, clipped training.
NORM_FLOOR = torch.finfo(torch.float32).tiny

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def newton_schulz(grad: torch.Tensor, steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate polar factor of a 2-D tensor, or of each matrix of a (N, rows, cols) stack, by `steps`
    quintic Newton-Schulz iterations.

    Normalises in fp32 before casting to `dtype` (a bf16 cast of an unnormalised gradient can overflow
    or flush to zero); returns a tensor of grad's shape and dtype.
    """
    if grad.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz needs a 2-D matrix (or a stack of them), got shape {tuple(grad.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = grad.float() if grad.ndim == 3 else grad.float()[None]
    tall = x.size(1) > x.size(2)
    if tall:  # iterate on the wide orientation: A = X X^T is then the smaller (min-dim) square
        x = x.mT
    x = (x / x.norm(dim=(1, 2), keepdim=True).clamp_min(NORM_FLOOR)).to(dtype)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)                    # a X + (b A + c A^2) X
    if tall:
        x = x.mT
    return (x if grad.ndim == 3 else x[0]).to(grad.dtype)


def newton_schulz_many(grads: list[torch.Tensor], steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """newton_schulz of each matrix, same-shape matrices stacked into one batched iteration (fewer, larger
    matmuls: measured 0.53x the one-by-one time of phase1's 78 matrices in fp32, 0.42x in bf16;
    BENCHMARKS.md, "The bf16 step's overheads")."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(grads):
        by_shape.setdefault(tuple(g.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(grads)
    for indices in by_shape.values():
        stacked = newton_schulz(torch.stack([grads[i] for i in indices]), steps, dtype)
        for i, o in zip(indices, stacked.unbind(0)):
            out[i] = o
    return out


def orthogonalize_svd(grad: torch.Tensor) -> torch.Tensor:
    """Exact polar factor U V^T in fp32 (slow; the D2 fallback when Newton-Schulz misbehaves).

    Directions whose singular value is numerically zero (below the matrix_rank tolerance) get 0,
    not an arbitrary unit vector: a rank-deficient or zero gradient must not create an update.
    """
    if grad.ndim != 2:
        raise ValueError(f"SVD orthogonalisation needs a 2-D matrix, got shape {tuple(grad.shape)}")
    u, s, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    tol = s.max() * max(grad.shape) * torch.finfo(torch.float32).eps
    keep = (s > tol).to(u.dtype)
    return ((u * keep) @ vh).to(grad.dtype)


def orthogonalize(grads: list[torch.Tensor], steps: int, use_svd: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    """The orthogonalised updates the spec asks for: exact SVD per matrix when use_svd, else Newton-Schulz
    (same-shape matrices batched)."""
    return [orthogonalize_svd(g) for g in grads] if use_svd else newton_schulz_many(grads, steps, dtype)
