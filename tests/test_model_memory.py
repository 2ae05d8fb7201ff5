"""Titans long-term memory and the MAG gate. Lessons: the public "LMM" was a fixed EMA of a projection (no
test-time learning), and its state leaked from one batch to the next."""
from __future__ import annotations

import math

import pytest
import torch

from forge.model.gate import MAGGate, binary_entropy
from forge.model.memory import NeuralMemory, memory_scan
from forge.spec.model import MemorySpec

B, T, D = 2, 12, 6


def inputs(seed: int = 0, T: int = T):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, D, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, T, D, generator=g)
    theta = torch.rand(B, T, generator=g)
    memory0 = torch.randn(D, D, generator=g) * 0.3
    return memory0, q, k, v, theta


def reference_scan(memory0, q, k, v, theta, decay, momentum, chunk):
    """Chunk by chunk with autograd: grad of (1/C) sum_t theta_t ||M k_t - v_t||^2 at the chunk-start M."""
    memory, surprise, reads = memory0.expand(B, D, D).clone(), torch.zeros(B, D, D), []
    for start in range(0, q.shape[1], chunk):
        sl = slice(start, start + chunk)
        reads.append(torch.einsum("bij,btj->bti", memory, q[:, sl]))
        m = memory.detach().requires_grad_(True)
        error = torch.einsum("bij,btj->bti", m, k[:, sl]) - v[:, sl]
        loss = (theta[:, sl] * error.pow(2).sum(-1)).sum() / k[:, sl].shape[1]
        (grad,) = torch.autograd.grad(loss, m)
        surprise = momentum * surprise - grad
        memory = decay * memory + surprise
    return torch.cat(reads, 1), memory


def test_one_chunk_update_equals_the_autograd_reference():
    memory0, q, k, v, theta = inputs()
    _, final, _ = memory_scan(memory0, q, k, v, theta, decay=0.99, momentum=0.9, chunk_size=T)
    _, want = reference_scan(memory0, q, k, v, theta, 0.99, 0.9, T)
    torch.testing.assert_close(final, want, atol=1e-5, rtol=1e-5)
    assert (final - 0.99 * memory0).abs().max() > 1e-2      # it did learn something


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_chunked_scan_equals_sequential_reference(chunk):
    """Chunk 1 is the fully sequential update; 5 leaves a partial last chunk."""
    memory0, q, k, v, theta = inputs(seed=1)
    reads, final, _ = memory_scan(memory0, q, k, v, theta, decay=0.99, momentum=0.9, chunk_size=chunk)
    want_reads, want_final = reference_scan(memory0, q, k, v, theta, 0.99, 0.9, chunk)
    torch.testing.assert_close(reads, want_reads, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, want_final, atol=1e-5, rtol=1e-5)


def test_zero_step_size_leaves_memory_unchanged_and_decay_alone_forgets():
    memory0, q, k, v, theta = inputs()
    reads, final, observed = memory_scan(memory0, q, k, v, torch.zeros_like(theta), 1.0, 0.9, 4)
    torch.testing.assert_close(final, memory0.expand(B, D, D), atol=0, rtol=0)
    torch.testing.assert_close(reads, torch.einsum("ij,btj->bti", memory0, q), atol=1e-6, rtol=0)
    # zero surprise: M_t = decay^t M_0 after t chunk updates; the measured retention is the decay
    _, final, observed = memory_scan(memory0, q, k, v, torch.zeros_like(theta), 0.9, 0.9, 4)
    torch.testing.assert_close(final, 0.9 ** 3 * memory0.expand(B, D, D), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(observed["retention"], torch.full((3,), 0.9), atol=1e-6, rtol=0)
    assert observed["update_norm"].abs().max() == 0


def test_reads_of_a_chunk_use_the_memory_before_that_chunk():
    """Causal: new keys, values and step sizes from position 4 on (chunk 1 of 4) leave the reads of chunks 0
    and 1 unchanged, since chunk 1 reads the memory as of the end of chunk 0; chunk 2 on sees them."""
    memory0, q, k, v, theta = inputs()
    chunk = 4
    before, _, _ = memory_scan(memory0, q, k, v, theta, 0.99, 0.9, chunk)
    k2, v2, theta2 = k.clone(), v.clone(), theta.clone()
    k2[:, 4:] = torch.nn.functional.normalize(torch.randn(B, T - 4, D), dim=-1)
    v2[:, 4:] += 1.0
    theta2[:, 4:] = 1.0
    after, _, _ = memory_scan(memory0, q, k2, v2, theta2, 0.99, 0.9, chunk)
    assert torch.equal(after[:, : 2 * chunk], before[:, : 2 * chunk])
    assert (after[:, 2 * chunk:] - before[:, 2 * chunk:]).abs().max() > 1e-3


def memory_module(factorized: bool = True) -> NeuralMemory:
    torch.manual_seed(0)
    spec = MemorySpec(d_mem=8, decay=0.99, momentum=0.9, factorized=factorized, rank=2, chunk_size=4)
    module = NeuralMemory(16, spec, 1e-5)
    for p in module.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    return module


@pytest.mark.parametrize("factorized", [True, False])
def test_memory_module_is_causal_stateless_and_learns_at_test_time(factorized):
    memory = memory_module(factorized)
    h = torch.randn(B, 16, 16)
    m1, metrics = memory(h)
    m2, _ = memory(h)
    assert torch.equal(m1, m2)                                # stateless: same input, same output
    h2 = h.clone()
    h2[:, 10:] = torch.randn(B, 6, 16)
    m3, _ = memory(h2)
    assert torch.equal(m3[:, :10], m1[:, :10])                # 8, 9 share chunk 2 (8..11) with the change
    assert (m3[:, 12:] - m1[:, 12:]).abs().max() > 1e-3       # later chunks learned the new tokens
    assert set(metrics) == {"memory/update_norm", "memory/effective_decay", "memory/step_size"}
    assert metrics["memory/update_norm"] > 0
    # test-time learning: the reads of later chunks differ from reading the initial memory alone
    with torch.no_grad():
        u = memory.norm(h)
        q = torch.nn.functional.normalize(memory.q_proj(u), dim=-1)
        static = memory.o_proj(q @ memory.initial_memory().T)
    assert torch.allclose(m1[:, :4], static[:, :4], atol=1e-6)
    assert (m1[:, 4:] - static[:, 4:]).abs().max() > 1e-3


def test_gate_blends_the_normalised_paths_and_reports_entropy():
    torch.manual_seed(0)
    gate = MAGGate(8, 16, 1e-5)
    y, m = torch.randn(2, 5, 8) * 3, torch.randn(2, 5, 8)
    out, g, entropy = gate(y, m)
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(out, g * gate.norm_y(y) + (1 - g) * gate.norm_m(m))
    torch.testing.assert_close(entropy, -(g * g.log() + (1 - g) * (1 - g).log()).mean())
    assert binary_entropy(torch.zeros(3)).item() == pytest.approx(math.log(2))
    saturated = torch.tensor([-200.0, 200.0], requires_grad=True)   # sigmoid rounds to exactly 0 and 1
    value = binary_entropy(saturated)
    value.backward()
    assert value.item() < 1e-30 and torch.isfinite(saturated.grad).all()
