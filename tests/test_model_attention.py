"""Attention patterns (B2, E2): causality of every type, the sliding window's reach, blocked == dense, and
the QK-clip protocol (D3). Lessons: the public implementation's "sliding window" was a symmetric band."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from forge.model.attention import Attention, attention_stats, masked_scores, piece_max_logit
from forge.model.rope import apply_rope, rope_tables
from forge.model.window import BLOCKED_MIN_BLOCKS, AttentionPattern, Piece

KINDS = ("full", "sliding_window", "sliding_window_with_global")
H, HD = 2, 8


def reference_mask(kind: str, T: int, window: int, every: int, n_global: int) -> torch.Tensor:
    """The pattern's definition written out pair by pair, independent of forge.model.window."""
    globals_ = set(list(range(0, T, every))[:n_global]) if kind == "sliding_window_with_global" else set()
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            mask[i, j] = kind == "full" or i - j < window or j in globals_ or i in globals_
    return mask


def reference_attention(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    return probs @ v, -torch.special.xlogy(probs, probs).sum(-1), scores


def qkv(T: int, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, HD, generator=g) for _ in range(3))


def attend(pattern: AttentionPattern, q, k, v, blocked):
    layout = pattern.layout(q, k, v, blocked=blocked)
    return layout, layout.merge([F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=p.mask,
                                                                is_causal=p.mask is None) for p in layout.pieces])


@pytest.mark.parametrize("kind", KINDS)
def test_pattern_mask_matches_its_definition(kind):
    pattern = AttentionPattern(kind, window=5, global_every=4, global_tokens=3)
    assert torch.equal(pattern.mask(23), reference_mask(kind, 23, 5, 4, 3))


@pytest.mark.parametrize("kind", ["sliding_window", "sliding_window_with_global"])
@pytest.mark.parametrize("T", [16, 100, 128])
def test_blocked_and_dense_layouts_equal_the_dense_reference(kind, T):
    """T=100 is not a multiple of the window (padding); global_tokens=4 caps the global positions."""
    w, every, n_global = 16, 16, 4
    pattern = AttentionPattern(kind, w, every, n_global)
    q, k, v = qkv(T)
    want, _, _ = reference_attention(q, k, v, reference_mask(kind, T, w, every, n_global))
    for blocked in (False, True):
        layout, got = attend(pattern, q, k, v, blocked)
        assert layout.blocked == (blocked and w < T)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["sliding_window", "sliding_window_with_global"])
def test_blocked_layout_is_linear_in_sequence_length(kind):
    """O(T * w): the score entries the blocked pieces hold grow linearly with T, far below T^2."""
    w = 16

    def score_entries(T):
        q, k, v = qkv(T, B=1)
        layout = AttentionPattern(kind, w, 16, 8).layout(q, k, v)
        assert layout.blocked                         # picked automatically for T / w >= BLOCKED_MIN_BLOCKS
        return sum(p.q.shape[-2] * p.k.shape[-2] * math.prod(p.q.shape[2:-2]) for p in layout.pieces)

    small, large = score_entries(BLOCKED_MIN_BLOCKS * w), score_entries(4 * BLOCKED_MIN_BLOCKS * w)
    assert large <= 4 * small + 1
    assert large < (4 * BLOCKED_MIN_BLOCKS * w) ** 2 / 8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blocked", [False, True])
def test_attention_is_causal(kind, blocked):
    """Perturbing keys/values after t leaves outputs at positions <= t unchanged."""
    T, t = 64, 29
    pattern = AttentionPattern(kind, 8, 16, 64)
    q, k, v = qkv(T)
    _, before = attend(pattern, q, k, v, blocked)
    k2, v2 = k.clone(), v.clone()
    k2[..., t + 1:, :] += 3.0
    v2[..., t + 1:, :] -= 3.0
    q2 = q.clone()
    q2[..., t + 1:, :] *= -1
    _, after = attend(pattern, q2, k2, v2, blocked)
    assert (after[..., : t + 1, :] - before[..., : t + 1, :]).abs().max() < 1e-6
    assert (after[..., t + 1:, :] - before[..., t + 1:, :]).abs().max() > 1e-3


@pytest.mark.parametrize("blocked", [False, True])
def test_sliding_window_does_not_reach_further_back_than_the_window(blocked):
    T, w, j = 64, 8, 20
    q, k, v = qkv(T)
    k2, v2 = k.clone(), v.clone()
    k2[..., j, :] += 5.0
    v2[..., j, :] += 5.0
    _, before = attend(AttentionPattern("sliding_window", w, 16, 64), q, k, v, blocked)
    _, after = attend(AttentionPattern("sliding_window", w, 16, 64), q, k2, v2, blocked)
    moved = (after - before).abs().amax(dim=(0, 1, 3)) > 1e-6
    assert moved.nonzero().flatten().tolist() == list(range(j, j + w))   # exactly i - w < j <= i


@pytest.mark.parametrize("blocked", [False, True])
def test_global_tokens_see_and_are_seen_across_the_window(blocked):
    T, w = 64, 8
    pattern = AttentionPattern("sliding_window_with_global", w, 16, 64)
    q, k, v = qkv(T)
    _, before = attend(pattern, q, k, v, blocked)

    def moved_by(j):
        k2, v2 = k.clone(), v.clone()
        k2[..., j, :] += 5.0
        v2[..., j, :] += 5.0
        _, after = attend(pattern, q, k2, v2, blocked)
        return ((after - before).abs().amax(dim=(0, 1, 3)) > 1e-6).nonzero().flatten().tolist()

    # global key 16 reaches every later query; plain key 20 only its window, and the later global queries
    assert moved_by(16) == list(range(16, T))
    assert moved_by(20) == list(range(20, 28)) + [32, 48]


def test_full_attention_and_window_at_least_t_are_plain_causal():
    q, k, v = qkv(20)
    want, _, _ = reference_attention(q, k, v, torch.ones(20, 20, dtype=torch.bool).tril())
    for pattern in (AttentionPattern("full", 4, 16, 64), AttentionPattern("sliding_window_with_global", 20, 4, 64)):
        layout, got = attend(pattern, q, k, v, None)
        assert layout.pieces[0].mask is None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ the nn.Module

def module(kind: str, d_model: int = 16, window: int = 8, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(d_model, H, AttentionPattern(kind, window, 16, 64))


@pytest.mark.parametrize("kind", KINDS)
def test_max_logit_follows_the_qk_clip_protocol(kind):
    """max_logit (n_heads,) = max over batch and attended pairs of post-RoPE q.k / sqrt(hd), recomputed here
    from q_proj/k_proj rows grouped head by head; it accumulates over calls until reset to None."""
    T, attn = 128, module(kind)
    x = torch.randn(2, T, 16)
    tables = rope_tables(T, attn.head_dim, 10000.0)
    assert attn.track_max_logit is False
    attn(x, tables)
    assert attn.max_logit is None
    attn.track_max_logit = True
    attn(x, tables)
    q = apply_rope((x @ attn.q_proj.weight.T).view(2, T, H, -1).transpose(1, 2), tables)
    k = apply_rope((x @ attn.k_proj.weight.T).view(2, T, H, -1).transpose(1, 2), tables)
    _, _, scores = reference_attention(q, k, k, reference_mask(kind, T, 8, 16, 64))
    torch.testing.assert_close(attn.max_logit, scores.transpose(0, 1).flatten(1).amax(1), atol=1e-5, rtol=0)
    assert "max_logit" not in dict(attn.named_buffers())
    first = attn.max_logit.clone()
    attn(x * 0.1, tables)                                # smaller logits: the running max stays
    assert torch.equal(attn.max_logit, first)


def recomputed_max_logit(piece: Piece) -> torch.Tensor:
    """Every allowed score of the piece, scaled, then the max per head: what piece_max_logit must equal."""
    return masked_scores(piece).transpose(0, 1).flatten(1).amax(1)


@pytest.mark.parametrize("kind, blocked", [("full", None), ("sliding_window", False), ("sliding_window", True),
                                           ("sliding_window_with_global", True)])
@pytest.mark.parametrize("chunk, block", [(16, 1), (16, 16 * 100 * H), (128, 1 << 20)])
def test_max_logit_record_equals_the_recomputed_one(kind, blocked, chunk, block):
    """The cheaper record (causal pieces in blocks of queries, a group of heads at a time; masks in place; the
    scale applied to the maxima) is the max over the whole masked score matrix, to 1e-5."""
    B, T = 3, 100                                        # T not a multiple of the chunk: a short last block
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, HD, generator=gen) * 3 for _ in range(3))
    layout = AttentionPattern(kind, 16, 8, 4).layout(q, k, v, blocked)
    for piece in layout.pieces:
        torch.testing.assert_close(piece_max_logit(piece, chunk, block), recomputed_max_logit(piece),
                                   atol=1e-5, rtol=0)


def test_max_logit_record_is_fp32_under_bf16_autocast():
    """Under autocast q and k arrive in bf16; the record scores them in fp32 (QK-clip compares it with tau)."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, H, 64, HD, generator=gen).to(torch.bfloat16) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = piece_max_logit(Piece(q, k, k, None), chunk=16)
    assert got.dtype == torch.float32
    want = recomputed_max_logit(Piece(q.float(), k.float(), k.float(), None))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_entropy_path_equals_the_fused_path(kind):
    T, attn = 128, module(kind)
    x = torch.randn(2, T, 16)
    tables = rope_tables(T, attn.head_dim, 10000.0)
    fused = attn(x, tables)
    attn.entropy_grad = True
    explicit = attn(x, tables)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)
    q = apply_rope((x @ attn.q_proj.weight.T).view(2, T, H, -1).transpose(1, 2), tables)
    k = apply_rope((x @ attn.k_proj.weight.T).view(2, T, H, -1).transpose(1, 2), tables)
    _, entropy, _ = reference_attention(q, k, k, reference_mask(kind, T, 8, 16, 64))
    (got,) = attn.entropies
    assert got.requires_grad
    torch.testing.assert_close(got, entropy.mean(), atol=1e-5, rtol=0)


def test_attention_stats_count_sinks_and_entropy():
    T, hd = 32, HD
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    q = torch.randn(H, T, hd) * 0.01                     # near-uniform attention: no sink, entropy ~ mean ln(i+1)
    stats = attention_stats(q, q.clone(), mask, min_seen=T // 2)
    uniform_entropy = torch.log(torch.arange(1, T + 1).float()).mean()
    assert stats["sink_heads"].item() == 0
    assert abs(stats["entropy"].item() - uniform_entropy.item()) < 0.01
    k = torch.zeros(H, T, hd)
    k[1, 0] = 50.0                                       # head 1: every query dumps on key 0
    q = torch.zeros(H, T, hd)
    q[1] = 1.0
    stats = attention_stats(q, k, mask, min_seen=T // 2)
    assert stats["sink_heads"].item() == 1
