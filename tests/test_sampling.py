"""Generation: the cached (incremental) decoder reproduces the full forward for every model variant, sampling
is deterministic under a seed and respects max tokens, cached and uncached generation agree token for
token, and ACT halting at inference is reported per generated token."""
from __future__ import annotations

import pytest
import torch

from conftest import SPECS
from forge.model import build_model
from forge.model.decode import IncrementalDecoder
from forge.probes.sampling import generate, pick_next
from forge.spec.load import load_spec

SMALL = ["model.vocab_size=64", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=48",
         "model.memory.d_mem=16", "model.memory.rank=4", "model.memory.chunk_size=8", "model.gate.hidden=16",
         "model.trm.ffn_hidden=48", "model.attention.sw_window=8",
         # the decoder without skip_halted refines every token at every step: the forward without frozen
         # halted tokens (the shipped act.freeze_halted = true is skip_halted's semantics, tested below)
         "model.act.freeze_halted=false"]
V = 64
VARIANTS = {
    "phase1": [],
    "global_tokens": ["model.attention.type=sliding_window_with_global", "model.attention.global_every=4",
                      "model.attention.global_tokens=5"],
    "full_attention": ["model.attention.type=full"],
    "no_memory": ["model.memory.enabled=false"],
    "no_trm": ["model.trm.enabled=false"],
    "learned_init_answer_head": ["model.trm.learned_init=true", "model.act.head_input=answer"],
}


def small_model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    spec = load_spec(SPECS / "tiny.toml", SMALL + list(overrides)).spec
    model = build_model(spec.model, spec.objective).eval()
    if model.trm is not None:   # a halting head that halts some tokens early and others late
        with torch.no_grad():
            model.trm.act.weight.normal_(0, 2.0)
            model.trm.act.bias.fill_(0.0)
    return model


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("halt", [False, True])
def test_cached_decoder_reproduces_the_full_forward(variant, halt):
    model = small_model(*VARIANTS[variant])
    idx = tokens(2, 70)                            # > 8 windows: the forward runs the blocked layout
    with torch.no_grad():
        full = model(idx, halt=halt, return_logits=True)
    decoder = IncrementalDecoder(model, 2)
    pieces = [decoder.step(idx[:, :13], halt=halt)]           # prefill across a memory chunk boundary
    pieces += [decoder.step(idx[:, t:t + 1], halt=halt) for t in range(13, 70)]
    logits = torch.cat([p.logits for p in pieces], dim=1)
    used = torch.cat([p.used_steps for p in pieces], dim=1)
    torch.testing.assert_close(logits, full.logits, atol=1e-4, rtol=1e-4)
    if halt:
        assert torch.equal(used, full.used_steps)
    else:
        assert bool((used == model.n_steps).all())


def test_halting_varies_per_token_so_the_halting_test_means_something():
    model = small_model()
    with torch.no_grad():
        used = model(tokens(2, 70), halt=True).used_steps
    assert len(used.unique()) > 1


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.8, 5), (0.0, 0)])
def test_cached_and_uncached_generation_agree_token_for_token(temperature, top_k):
    model = small_model()
    prompts = tokens(3, 11)
    kw = dict(temperature=temperature, top_k=top_k, seed=7)
    cached = generate(model, prompts, 25, cached=True, **kw)
    uncached = generate(model, prompts, 25, cached=False, **kw)
    assert cached.tokens == uncached.tokens
    assert cached.avg_steps == pytest.approx(uncached.avg_steps)


def test_sampling_is_deterministic_under_a_seed_and_respects_max_tokens():
    model = small_model()
    prompts = tokens(2, 6)
    a = generate(model, prompts, 17, temperature=1.0, top_k=0, seed=3)
    b = generate(model, prompts, 17, temperature=1.0, top_k=0, seed=3)
    c = generate(model, prompts, 17, temperature=1.0, top_k=0, seed=4)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert [len(t) for t in a.tokens] == [17, 17]
    state = torch.get_rng_state()
    generate(model, prompts, 5, temperature=1.0, top_k=0, seed=3)
    assert torch.equal(state, torch.get_rng_state())      # a dedicated generator: the global RNG is untouched


def test_generation_stops_at_eos_per_row():
    model = small_model()
    prompts = tokens(2, 6)
    free = generate(model, prompts, 12, temperature=0.0, top_k=0, seed=0)
    eos = free.tokens[0][3]                     # pretend the 4th greedy token of row 0 is eos
    stopped = generate(model, prompts, 12, temperature=0.0, top_k=0, seed=0, eos_id=eos)
    assert stopped.tokens[0] == free.tokens[0][:free.tokens[0].index(eos)]
    assert eos not in stopped.tokens[1] and len(stopped.tokens[1]) <= 12


def test_halting_at_inference_reports_steps_and_full_depth_forces_t_max():
    model = small_model()
    prompts = tokens(2, 9)
    halted = generate(model, prompts, 10, temperature=0.0, top_k=0, seed=0, halt=True)
    full = generate(model, prompts, 10, temperature=0.0, top_k=0, seed=0, halt=False)
    assert full.avg_steps == model.n_steps
    assert 1 <= halted.avg_steps < model.n_steps
    # the reported average is the halting rule on the generated tokens (the forward's used_steps)
    seq = torch.cat([prompts, torch.tensor(halted.tokens)], dim=1)
    with torch.no_grad():
        used = model(seq[:, :-1], halt=True).used_steps[:, prompts.shape[1] - 1:]
    assert halted.avg_steps == pytest.approx(float(used.float().mean()))


def test_top_k_one_is_greedy_and_temperature_zero_is_argmax():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(pick_next(logits, 1.5, 1, g), logits.argmax(-1))
    assert torch.equal(pick_next(logits, 0.0, 0, g), logits.argmax(-1))
    draws = torch.stack([pick_next(logits, 1.0, 3, g) for _ in range(200)])
    top3 = logits.topk(3, dim=-1).indices
    assert bool((draws[..., None] == top3).any(-1).all())    # never outside the top 3


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_generation_equals_the_full_forward_token_for_token_in_every_variant(variant):
    """The decoder's shortcuts (fused projections, RoPE as one complex product on permuted channels, the
    window's slice of a preallocated cache instead of a mask, the LM head only where a token halts, one thread
    after the prefill) give the tokens of recomputing the whole prefix per token: several prompts at once,
    past the window (8) and memory chunks (8), with ACT halting, under the same seed."""
    model = small_model(*VARIANTS[variant])
    prompts = tokens(3, 11, seed=4)
    threads = torch.get_num_threads()
    for halt in (True, False):
        kw = dict(temperature=1.0, top_k=0, seed=5, halt=halt)
        fast = generate(model, prompts, 30, cached=True, **kw)
        slow = generate(model, prompts, 30, cached=False, **kw)
        assert fast.tokens == slow.tokens and fast.avg_steps == pytest.approx(slow.avg_steps)
    assert torch.get_num_threads() == threads            # the caller's thread count is restored


def test_the_decoder_caches_grow_without_changing_the_logits():
    model = small_model()
    idx = tokens(2, 40)
    with torch.no_grad():
        full = model(idx, halt=True, return_logits=True)
    decoder = IncrementalDecoder(model, 2, capacity=4)        # grows (doubling) 4 -> 8 -> ... -> 40
    first = decoder.step(idx[:, :6], halt=True)
    last = [decoder.step(idx[:, t:t + 1], halt=True, last_only=True) for t in range(6, 40)]
    torch.testing.assert_close(first.logits, full.logits[:, :6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([p.logits for p in last], 1), full.logits[:, 6:], atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.cat([p.used_steps for p in last], 1), full.used_steps[:, 6:])
    assert decoder.step(idx[:, :5], last_only=True).logits.shape == (2, 1, V)   # last_only: the last position


def test_skip_halted_is_the_model_when_no_token_halts_early():
    model = small_model()
    with torch.no_grad():
        model.trm.act.bias.fill_(-50.0)              # nothing halts before the last step
    idx = tokens(2, 30)
    with torch.no_grad():
        full = model(idx, halt=True, return_logits=True)
    decoder = IncrementalDecoder(model, 2, skip_halted=True)
    pieces = [decoder.step(idx[:, :9])] + [decoder.step(idx[:, t:t + 1]) for t in range(9, 30)]
    torch.testing.assert_close(torch.cat([p.logits for p in pieces], 1), full.logits, atol=1e-4, rtol=1e-4)
    assert all(p.steps_run == model.n_steps for p in pieces)


@pytest.mark.parametrize("variant", ["phase1", "full_attention", "no_memory"])
def test_skip_halted_token_by_token_equals_its_prefill_and_freezes_halted_tokens(variant):
    """Two implementations of the frozen-halting semantics agree: a prefill computes every token and keeps the
    halted tokens' keys/values from their halting step; token by token, the steps after a token halts are
    skipped and its caches filled from that step. Both differ from the full model where tokens halt early."""
    model = small_model(*VARIANTS[variant])
    with torch.no_grad():       # a refiner whose attention matters, so that frozen keys/values change outputs
        for block in model.trm.net.blocks:
            block.attn.v_proj.weight.mul_(8.0)
            block.attn.o_proj.weight.mul_(8.0)
    idx = tokens(2, 40, seed=3)
    prefill = IncrementalDecoder(model, 2, skip_halted=True).step(idx)
    stepped = IncrementalDecoder(model, 2, skip_halted=True)
    pieces = [stepped.step(idx[:, t:t + 1]) for t in range(40)]
    torch.testing.assert_close(torch.cat([p.logits for p in pieces], 1), prefill.logits, atol=1e-4, rtol=1e-4)
    used = torch.cat([p.used_steps for p in pieces], 1)
    assert torch.equal(used, prefill.used_steps)
    assert min(p.steps_run for p in pieces) < model.n_steps             # some tokens' later steps were skipped
    exact = IncrementalDecoder(model, 2).step(idx)
    assert (exact.logits - prefill.logits).abs().max() > 1e-2       # an approximation, not the model
    # a token that halted at step t keeps, in every later step's attention calls, the keys/values of step t
    b, pos = (used == 1).nonzero()[0].tolist()
    per_step, first = stepped._per_step, len(model.blocks)
    for call in range(per_step):
        halting = stepped._kv[first + call][b, :, :, pos]
        for t in range(1, model.n_steps):
            assert torch.equal(stepped._kv[first + t * per_step + call][b, :, :, pos], halting)


def test_generation_with_skip_halted_is_seeded_and_uses_fewer_steps():
    model = small_model()
    prompts = tokens(2, 9)
    kw = dict(temperature=1.0, top_k=0, seed=2, skip_halted=True)
    a, b = generate(model, prompts, 20, **kw), generate(model, prompts, 20, **kw)
    assert a.tokens == b.tokens and [len(t) for t in a.tokens] == [20, 20]
    assert 1 <= a.avg_steps < model.n_steps
    with pytest.raises(ValueError, match="cached"):
        generate(model, prompts, 2, temperature=1.0, top_k=0, seed=2, skip_halted=True, cached=False)


def test_pick_next_draws_what_torch_multinomial_draws():
    """pick_next writes out multinomial's one-sample draw (no host sync): the same tokens under the same seed
    as the decoder before it, on this torch."""
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(3))
    for temperature, top_k in [(0.8, 5), (1.0, 0)]:
        ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        scaled = logits / temperature
        if top_k:
            scaled = scaled.masked_fill(scaled < scaled.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
        for _ in range(50):
            expected = torch.multinomial(scaled.softmax(-1), 1, generator=theirs).squeeze(-1)
            assert torch.equal(pick_next(logits, temperature, top_k, ours), expected)


def test_the_decoder_follows_a_change_of_the_weights():
    """The decoder's weight layout is kept per model between samples; a parameter changed in place (an optimizer
    step, a load) must give the changed model's logits, not the layout of the old weights."""
    model = small_model()
    idx = tokens(2, 12)
    IncrementalDecoder(model, 2).step(idx, halt=False)              # lays out the current weights
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
        full = model(idx, return_logits=True)
    torch.testing.assert_close(IncrementalDecoder(model, 2).step(idx, halt=False).logits, full.logits,
                               atol=1e-4, rtol=1e-4)
