"""The fused, chunked LM head + cross-entropy (forge.model.loss) against F.linear + F.cross_entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from forge.model.loss import linear_cross_entropy

IGNORE = -100


def inputs(n: int = 50, d: int = 16, vocab: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, d, generator=gen).requires_grad_()
    weight = torch.randn(vocab, d, generator=gen).requires_grad_()
    targets = torch.randint(vocab, (n,), generator=gen)
    targets[::7] = IGNORE                                   # padding positions carry no loss
    return u, weight, targets


def plain(u, weight, targets):
    logits = F.linear(u, weight)
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    return ce.sum(), ce.detach(), logits.detach().argmax(-1)


@pytest.mark.parametrize("chunk", [1, 16, 50, 128])
def test_values_and_gradients_equal_the_plain_head(chunk):
    u, weight, targets = inputs()
    want = plain(u, weight, targets)
    (2.5 * want[0]).backward()                             # a non-unit upstream gradient
    want_grads = u.grad.clone(), weight.grad.clone()
    u.grad = weight.grad = None
    got = linear_cross_entropy(u, weight, targets, IGNORE, chunk)
    (2.5 * got[0]).backward()
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-6)
    assert torch.equal(got[2], want[2])
    assert not got[1].requires_grad and not got[2].requires_grad
    torch.testing.assert_close(u.grad, want_grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, want_grads[1], atol=1e-5, rtol=1e-5)


def test_without_gradients_only_the_losses_are_computed():
    u, weight, targets = inputs()
    with torch.no_grad():
        got = linear_cross_entropy(u, weight, targets, IGNORE, 16)
        want = plain(u, weight, targets)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-6)
    assert not got[0].requires_grad


def test_bf16_autocast_matches_the_plain_head_under_autocast():
    """Under CPU bf16 autocast the matmuls run in bf16 (as F.linear would), the softmax in fp32; the result stays
    within bf16 rounding of the plain path under the same autocast, and the gradients keep the inputs' dtype."""
    u, weight, targets = inputs(n=64, d=32, vocab=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(u, weight, targets)
        got = linear_cross_entropy(u, weight, targets, IGNORE, 16)
    torch.testing.assert_close(got[0], want[0].float(), rtol=2e-2, atol=0)
    got[0].backward()
    assert u.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert torch.isfinite(u.grad).all() and torch.isfinite(weight.grad).all()
