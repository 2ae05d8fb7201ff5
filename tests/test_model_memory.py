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


# ------------------------------------------------------------------------------------------ Titans variants
from conftest import SPECS                                        # noqa: E402
from forge.model import build_model, count_parameters             # noqa: E402
from forge.model.decode import IncrementalDecoder                 # noqa: E402
from forge.model.memory import MLPMemory, chunk_write             # noqa: E402
from forge.spec.load import load_spec                             # noqa: E402

SMALL = ["model.vocab_size=64", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=48",
         "model.memory.d_mem=16", "model.memory.rank=4", "model.memory.chunk_size=8", "model.gate.hidden=16",
         "model.trm.ffn_hidden=48", "model.attention.sw_window=8"]
# Each variant spelled out in full (the shipped specs' memory is the Titans one: mlp_titans at depth 2)
LINEAR = ["model.memory.variant=linear", "model.memory.gates=fixed", "model.memory.conv_kernel=0",
          "model.memory.qkv_activation=identity", "model.memory.input_layer=0"]
TITANS = ["model.memory.gates=data_dependent", "model.memory.conv_kernel=4", "model.memory.qkv_activation=silu"]
MEMORY_VARIANTS = {
    "linear": LINEAR,
    "linear_titans": LINEAR + TITANS + ["model.memory.input_layer=1"],
    "mlp": LINEAR + ["model.memory.variant=mlp"],
    "mlp_titans": LINEAR + ["model.memory.variant=mlp", "model.memory.depth=3", "model.memory.input_layer=2"] + TITANS,
}


def variant_model(name: str, *overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    spec = load_spec(SPECS / "tiny.toml", SMALL + MEMORY_VARIANTS[name] + list(overrides)).spec
    model = build_model(spec.model, spec.objective)
    with torch.no_grad():   # gates and convolution away from their initial values, so that their paths matter
        for pname, p in model.memory.named_parameters():
            if pname.endswith("_weight") and p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def mlp_weights(B: int, dims, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, a, b, generator=g) * a ** -0.5 for a, b in zip(dims, dims[1:])]


@pytest.mark.parametrize("depth", [2, 3])
def test_mlp_update_equals_the_autograd_gradient_of_the_associative_loss(depth):
    """S_c = eta S - grad, W_c = alpha W + S for every weight; grad = autograd of (1/C) sum theta ||M(k) - v||^2."""
    C, d, h = 5, 6, 12
    dims = [d] + [h] * (depth - 1) + [d]
    weights, surprise = mlp_weights(B, dims, 0), mlp_weights(B, dims, 1)
    g = torch.Generator().manual_seed(2)
    k = torch.nn.functional.normalize(torch.randn(B, C, d, generator=g), dim=-1)
    v, theta = torch.randn(B, C, d, generator=g), torch.rand(B, C, 1, generator=g)
    decay, momentum = torch.rand(B, 1, 1, generator=g), torch.rand(B, 1, 1, generator=g)
    new_w, new_s, observed = chunk_write(MLPMemory, weights, surprise, k, v, theta, decay, momentum)

    leaves = [w.clone().requires_grad_(True) for w in weights]
    a = k
    for i, w in enumerate(leaves):
        a = a @ w if i == len(leaves) - 1 else torch.nn.functional.gelu(a @ w)
    loss = (theta[..., 0] * (k + a - v).pow(2).sum(-1)).sum() / C
    grads = torch.autograd.grad(loss, leaves)
    for w, s, nw, ns, gr in zip(weights, surprise, new_w, new_s, grads):
        torch.testing.assert_close(ns, momentum * s - gr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nw, decay * w + momentum * s - gr, atol=1e-5, rtol=1e-5)
    assert all(gr.abs().max() > 1e-3 for gr in grads)             # every layer learns
    assert observed["update_norm"] > 0 and 0 < observed["retention"] < 2


def test_mlp_with_zero_step_size_only_forgets():
    weights = mlp_weights(B, [6, 12, 6], 0)
    k = torch.nn.functional.normalize(torch.randn(B, 4, 6), dim=-1)
    new_w, _, observed = chunk_write(MLPMemory, weights, [torch.zeros_like(w) for w in weights], k,
                                     torch.randn(B, 4, 6), torch.zeros(B, 4, 1), 0.9, 0.5)
    for w, nw in zip(weights, new_w):
        torch.testing.assert_close(nw, 0.9 * w)
    torch.testing.assert_close(observed["retention"], torch.tensor(0.9))


@pytest.mark.parametrize("name", MEMORY_VARIANTS)
def test_every_memory_variant_is_causal_at_every_position(name):
    """Perturbing the input at p leaves every memory output before p exactly unchanged (0.0): the reads of a
    chunk use the previous chunk's memory, the convolution looks back only, the gates act at the chunk's end."""
    memory = variant_model(name).memory
    h = torch.randn(B, 24, 32)
    base, _ = memory(h)
    for p in (3, 8, 13, 23):
        h2 = h.clone()
        h2[:, p] += torch.randn(B, 32)
        out, _ = memory(h2)
        assert (out[:, :p] - base[:, :p]).abs().max().item() == 0.0
        if p < 16:
            assert (out[:, 16:] - base[:, 16:]).abs().max() > 1e-4   # later chunks see it


@pytest.mark.parametrize("name", MEMORY_VARIANTS)
def test_every_memory_variant_starts_fresh_per_sequence_and_is_deterministic(name):
    model = variant_model(name).eval()
    idx = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = model(idx).logits
        paired = model(torch.cat([other, idx])).logits               # the same sequence in another slot
        again = model(idx).logits                                    # a second batch after the first
    torch.testing.assert_close(paired[1:], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, alone)


@pytest.mark.parametrize("name", MEMORY_VARIANTS)
def test_the_gradient_reaches_every_memory_parameter(name):
    """The outer loss differentiates through the inner updates: every memory weight (initial MLP weights,
    gates, convolution, step size) gets a finite, non-zero gradient."""
    model = variant_model(name).train()
    idx = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    model(idx, torch.roll(idx, -1, 1)).loss.backward()
    for pname, p in model.memory.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, pname


@pytest.mark.parametrize("name", MEMORY_VARIANTS)
def test_the_cached_decoder_reproduces_the_full_forward_for_every_memory_variant(name):
    model = variant_model(name).eval()
    idx = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx, return_logits=True).logits
    decoder = IncrementalDecoder(model, 2)
    pieces = [decoder.step(idx[:, :11], halt=False)]                 # prefill across a chunk boundary
    pieces += [decoder.step(idx[:, t:t + 1], halt=False) for t in range(11, 37)]
    torch.testing.assert_close(torch.cat([p.logits for p in pieces], dim=1), full, atol=1e-4, rtol=1e-4)


def test_parameter_count_of_the_mlp_memory():
    linear = count_parameters(variant_model("linear"))["memory"]
    model = variant_model("mlp_titans")
    d, d_mem, h = 32, 16, 32                                         # expansion 2
    projections = 4 * d * d_mem
    want = projections + d_mem * h + h * h + h * d_mem + (d + 1) * 3 + 3 * d_mem * 4   # MLP, 3 gates, conv
    assert count_parameters(model)["memory"] == want
    assert linear == projections + 2 * d_mem * 4 + d + 1                # factorized rank 4, step size
    meta = build_model(model.spec, model.objective, device="meta")
    assert count_parameters(meta) == count_parameters(model)         # the budget check counts on meta


def test_titans_options_start_as_the_linear_memory_they_extend():
    """The convolution starts as the identity and the data-dependent gates at spec.momentum and spec.decay."""
    torch.manual_seed(0)
    plain = load_spec(SPECS / "tiny.toml", SMALL + LINEAR).spec
    torch.manual_seed(0)
    base = build_model(plain.model, plain.objective).memory
    spec = load_spec(SPECS / "tiny.toml", SMALL + LINEAR + ["model.memory.gates=data_dependent",
                                                            "model.memory.conv_kernel=3"]).spec
    torch.manual_seed(0)
    extended = build_model(spec.model, spec.objective).memory
    h = torch.randn(B, 20, 32)
    torch.testing.assert_close(extended(h)[0], base(h)[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["mlp_titans"])
def test_checkpoint_round_trip_of_a_titans_model(name, tmp_path):
    from safetensors.torch import load_model, save_model

    model = variant_model(name).eval()
    save_model(model, str(tmp_path / "model.safetensors"))
    restored = variant_model(name, seed=5).eval()
    assert load_model(restored, str(tmp_path / "model.safetensors")) == (set(), [])
    idx = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(restored(idx).logits, model(idx).logits)


def test_memory_spec_rejects_inconsistent_options():
    from forge.errors import ForgeError

    with pytest.raises(ForgeError, match="input_layer"):
        load_spec(SPECS / "tiny.toml", SMALL + ["model.memory.input_layer=9"])
    with pytest.raises(ForgeError, match="data_dependent"):
        load_spec(SPECS / "tiny.toml", SMALL + ["model.memory.gates=data_dependent", "model.memory.decay=1.0"])
    with pytest.raises(ForgeError, match="depth"):
        load_spec(SPECS / "tiny.toml", SMALL + ["model.memory.variant=mlp", "model.memory.depth=1"])


def test_memory_metrics_are_declared_and_computed_for_every_variant():
    from forge.metrics.catalogue import load_catalogue

    catalogue = load_catalogue()
    h = torch.randn(B, 24, 32)
    for name in MEMORY_VARIANTS:
        _, metrics = variant_model(name).memory(h)
        data_dependent = "model.memory.gates=data_dependent" in MEMORY_VARIANTS[name]
        extra = {"memory/momentum", "memory/forget_gate"} if data_dependent else set()
        assert set(metrics) == {"memory/update_norm", "memory/effective_decay", "memory/step_size"} | extra
        assert all(catalogue.entry(k) is not None and torch.isfinite(v) for k, v in metrics.items())
        assert 0 < metrics["memory/effective_decay"] < 1.5 and metrics["memory/update_norm"] > 0
        if data_dependent:
            assert 0 < metrics["memory/momentum"] < 1 and 0 < metrics["memory/forget_gate"] < 1


def test_analytic_flops_of_the_mlp_memory_match_torch_counter():
    import sys

    from conftest import REPO
    from forge.model.flops import model_flops_per_token

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_roofline import counted_flops_per_token

    linear = load_spec(SPECS / "tiny.toml", LINEAR).spec
    for T, chunks in ((64, 2), (80, 3)):            # whole chunks, and a partial last chunk (32, 32, 16)
        spec = load_spec(SPECS / "tiny.toml", LINEAR + ["model.memory.variant=mlp", "model.memory.depth=3"]).spec
        assert -(-T // spec.model.memory.chunk_size) == chunks
        torch.manual_seed(0)
        model = build_model(spec.model, spec.objective)
        analytic = model_flops_per_token(spec.model, T)
        counted = counted_flops_per_token(model, T, 1, spec.model.vocab_size, track_max_logit=False)
        assert counted == pytest.approx(analytic["total"] - analytic["attention"], rel=1e-3)
        assert analytic["memory"] > 1.5 * model_flops_per_token(linear.model, T)["memory"]


# ------------------------------------------------------------------------------------------ bounded inner update
def test_the_clip_scales_the_chunk_gradient_to_max_grad_norm_and_leaves_smaller_ones_alone():
    """With max_grad_norm G the gradient term of S_c is min(1, G / ||grad||) * grad per sequence (grad: autograd of
    the associative loss over all weights of M): exactly G where the gradient was larger, unchanged where not."""
    C, dims = 5, [6, 12, 6]
    weights, surprise = mlp_weights(B, dims, 0), mlp_weights(B, dims, 1)
    g = torch.Generator().manual_seed(2)
    k = torch.nn.functional.normalize(torch.randn(B, C, 6, generator=g), dim=-1)
    v, theta = torch.randn(B, C, 6, generator=g), torch.rand(B, C, 1, generator=g)
    theta[1] *= 0.1                                                # sequence 1: a 10x smaller gradient
    momentum = 0.9
    leaves = [w.clone().requires_grad_(True) for w in weights]
    loss = (theta[..., 0] * (MLPMemory.read(leaves, k) - v).pow(2).sum(-1)).sum() / C
    grads = torch.autograd.grad(loss, leaves)
    norms = torch.stack([gr.flatten(1).square().sum(1) for gr in grads]).sum(0).sqrt()
    G = float(norms.mean())
    assert norms[0] > G > norms[1]                                 # one sequence clipped, one not
    new_w, new_s, _ = chunk_write(MLPMemory, weights, surprise, k, v, theta, 0.99, momentum, max_grad_norm=G)
    _, unclipped, _ = chunk_write(MLPMemory, weights, surprise, k, v, theta, 0.99, momentum)
    scale = (G / norms).clamp(max=1.0).view(B, 1, 1)
    for s, ns, gr in zip(surprise, new_s, grads):
        torch.testing.assert_close(ns, momentum * s - scale * gr, atol=1e-5, rtol=1e-5)
    applied = torch.stack([(momentum * s - ns).flatten(1).square().sum(1) for s, ns in zip(surprise, new_s)])
    torch.testing.assert_close(applied.sum(0).sqrt()[0], torch.tensor(G), atol=1e-5, rtol=1e-5)
    for ns, us in zip(new_s, unclipped):
        torch.testing.assert_close(ns[1], us[1], atol=0, rtol=0)   # below the bound: the plain update
        assert (ns[0] - us[0]).abs().max() > 1e-3


TITANS_AT_PHASE1 = ["model.memory.variant=mlp", "model.memory.gates=data_dependent", "model.memory.conv_kernel=4",
                    "model.memory.qkv_activation=silu", "model.memory.input_layer=4"]


@pytest.fixture(scope="module")
def phase1_memory_inputs():
    """The Titans MLP memory at phase1 width (d_mem 256, chunk 64) of a freshly initialised phase1 model, and its
    input over 16 chunks of real text: the residual stream after 4 blocks for English prose from the built-in
    corpus (pydoc topics, as byte tokens), 2 sequences of 1024."""
    from pydoc_data.topics import topics

    spec = load_spec(SPECS / "phase1.toml", TITANS_AT_PHASE1).spec
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective).eval()
    text = "".join(topics[name] for name in sorted(topics)).encode()
    T = 16 * spec.model.memory.chunk_size
    idx = torch.tensor([list(text[:T]), list(text[50_000:50_000 + T])])
    captured = {}

    class Captured(Exception):
        pass

    def capture(module, args):                                     # the memory's input; skip the rest
        captured["h"] = args[0]
        raise Captured

    handle = model.memory.register_forward_pre_hook(capture)
    with torch.no_grad(), pytest.raises(Captured):
        model(idx)
    handle.remove()
    return model.memory, captured["h"]


def run_chunks(memory, h, max_grad_norm, precision):
    """Chunk by chunk (as scan): per chunk the applied gradient norm ||eta S_{c-1} - S_c||, ||S_c||, ||W_c||
    (each (B,)), and the reads M_{c-1}(q) of every chunk."""
    from forge.model.memory import _gate

    chunk = memory.chunk_size
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    norm = lambda ts: torch.stack([t.float().flatten(1).square().sum(1) for t in ts]).sum(0).sqrt()  # noqa: E731
    rows, reads = [], []
    with torch.no_grad(), autocast:
        q, k, v, theta, gate_logits, _ = memory.project(h)
        decay, momentum = memory._chunk_gates(gate_logits, chunk)
        weights = [w.expand(h.shape[0], *w.shape) for w in memory.initial_weights()]
        surprise = [torch.zeros_like(w) for w in weights]
        for c in range(h.shape[1] // chunk):
            sl = slice(c * chunk, (c + 1) * chunk)
            reads.append(memory.model.read(weights, q[:, sl]))
            eta = _gate(momentum, c)
            new_w, new_s, _ = chunk_write(memory.model, weights, surprise, k[:, sl], v[:, sl], theta[:, sl, None],
                                          _gate(decay, c), eta, max_grad_norm, observe=False)
            rows.append((norm([eta * s - ns for s, ns in zip(surprise, new_s)]), norm(new_s), norm(new_w)))
            weights, surprise = new_w, new_s
    return rows, torch.cat(reads, dim=1).float()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_mlp_memory_at_phase1_width_stays_bounded_over_16_chunks_of_real_text(phase1_memory_inputs, precision):
    """Without the bound this memory diverges (the chunk loss's curvature grows with the weights past what a step
    of 1 tolerates: NaN within 16 chunks); with max_grad_norm G every chunk's applied gradient is <= G, so after c
    chunks ||S_c|| <= c G and ||W_c|| <= ||W_0|| + c (c + 1) / 2 G, and every read ||M(q)|| <= ||q|| + ||W_1||
    ||W_2|| <= 1 + ||W||^2 / 2 (|gelu(z)| <= |z|, unit queries)."""
    memory, h = phase1_memory_inputs
    G = memory.spec.max_grad_norm
    assert memory.max_grad_norm == G > 0 and memory.d_mem == 256     # the spec default bounds the mlp memory
    tol = 1e-5 if precision == "fp32" else 2e-2                     # bf16 rounds S and W to 8 bits
    w0 = float(torch.stack([w.detach().square().sum() for w in memory.initial_weights()]).sum().sqrt())
    rows, reads = run_chunks(memory, h, G, precision)
    assert len(rows) == 16
    for c, (applied, s_norm, w_norm) in enumerate(rows, start=1):
        assert (applied <= G * (1 + tol)).all(), (c, applied)
        assert (s_norm <= c * G * (1 + tol)).all(), (c, s_norm)
        assert (w_norm <= (w0 + c * (c + 1) / 2 * G) * (1 + tol)).all(), (c, w_norm)
    assert (rows[0][0] >= G * (1 - tol)).all()                      # the bound is active from the first chunk
    w_bound = w0 + 16 * 17 / 2 * G
    assert torch.isfinite(reads).all() and reads.norm(dim=-1).max() <= 1 + w_bound ** 2 / 2
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), torch.no_grad():
        out, metrics = memory(h)
    assert torch.isfinite(out).all() and all(torch.isfinite(m) for m in metrics.values())

    unbounded, reads = run_chunks(memory, h, None, precision)        # the paper's update: diverges
    largest = [float(w_norm.max()) for _, _, w_norm in unbounded]    # NaN once it overflows
    assert not torch.isfinite(reads).all() or not all(w <= w_bound for w in largest), largest
