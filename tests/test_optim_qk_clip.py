"""QK-clip (techniques.md section 5; lessons: the public implementation stored tau and never read it).

Every test runs on two attention layers that follow the protocol: a small reference written here and
the real forge.model.attention.Attention (sliding window, RoPE)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import SPECS
from forge.optim import clippable_modules, qk_clip, set_max_logit_tracking
from forge.spec.optim import QKClipSpec

D_MODEL, N_HEADS, SEQ = 32, 4, 24
HEAD_DIM = D_MODEL // N_HEADS


def rotate(x: torch.Tensor) -> torch.Tensor:
    """RoPE over the whole head dim (GPT-NeoX layout), x (B, H, T, hd)."""
    t, hd = x.shape[-2], x.shape[-1]
    inv = 10000.0 ** (-torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(t).float(), inv).repeat(1, 2)
    half = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)
    return x * ang.cos() + half * ang.sin()


class ReferenceAttention(nn.Module):
    """Causal multi-head attention following the QK-clip protocol (full causal mask, RoPE)."""

    def __init__(self, d_model: int = D_MODEL, n_heads: int = N_HEADS):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False)
                                                              for _ in range(4))
        self.track_max_logit = False
        self.max_logit: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q), rotate(k)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        if self.track_max_logit:
            current = scores.detach().transpose(0, 1).flatten(1).amax(1)
            self.max_logit = current if self.max_logit is None else torch.maximum(self.max_logit, current)
        return self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


def real_attention() -> nn.Module:
    from forge.model.attention import Attention
    from forge.model.rope import rope_tables
    from forge.model.window import AttentionPattern

    layer = Attention(D_MODEL, N_HEADS, AttentionPattern("sliding_window", 8, 16, 64))
    tables = rope_tables(SEQ, HEAD_DIM, 10000.0)

    class Wrapped(nn.Module):  # the model passes the RoPE tables; here they are fixed
        def __init__(self):
            super().__init__()
            self.attn = layer

        def forward(self, x):
            return self.attn(x, tables)

    return Wrapped()


LAYERS = {"reference": ReferenceAttention, "real": real_attention}


@pytest.fixture(params=sorted(LAYERS))
def layer(request) -> nn.Module:
    torch.manual_seed(0)
    model = LAYERS[request.param]()
    with torch.no_grad():  # push head 1 far above the others
        attn = clippable_modules(model)[0]
        attn.q_proj.weight[HEAD_DIM:2 * HEAD_DIM] *= 30.0
        attn.k_proj.weight[HEAD_DIM:2 * HEAD_DIM] *= 30.0
    assert set_max_logit_tracking(model, True) == 1
    return model


X = torch.randn(2, SEQ, D_MODEL, generator=torch.Generator().manual_seed(1))


def measure(model: nn.Module) -> torch.Tensor:
    attn = clippable_modules(model)[0]
    attn.max_logit = None
    model(X)
    return attn.max_logit.clone()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    attn = clippable_modules(model)[0]
    return {n: getattr(attn, n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}


def heads(w: torch.Tensor, h: int) -> torch.Tensor:
    return w[h * HEAD_DIM:(h + 1) * HEAD_DIM]


def spec(tau: float, per_head: bool = True, protected: bool = False, enabled: bool = True) -> QKClipSpec:
    return QKClipSpec(enabled=enabled, tau=tau, per_head=per_head, mlarope_shared_k_protected=protected)


def tau_between(before: torch.Tensor) -> float:
    """A tau below the pushed head 1 and above every other head."""
    others = torch.cat([before[:1], before[2:]]).max().item()
    assert before[1] > 4 * others  # the push worked
    return 2 * others


def test_clip_brings_the_max_to_tau_and_leaves_the_rest_bit_identical(layer):
    before, w0 = measure(layer), weights(layer)
    tau = tau_between(before)
    measure(layer)
    assert qk_clip(layer, spec(tau)) == 1
    after, w1 = measure(layer), weights(layer)
    assert after[1].item() == pytest.approx(tau, rel=1e-4)
    for h in (0, 2, 3):
        assert after[h] == before[h]
        for name in ("q_proj", "k_proj"):
            assert torch.equal(heads(w1[name], h), heads(w0[name], h))
    assert torch.equal(w1["v_proj"], w0["v_proj"]) and torch.equal(w1["o_proj"], w0["o_proj"])
    gamma = tau / before[1]
    for name in ("q_proj", "k_proj"):  # sqrt(gamma) each side
        torch.testing.assert_close(heads(w1[name], 1), heads(w0[name], 1) * gamma.sqrt())


def test_clipping_twice_is_a_no_op(layer):
    tau = tau_between(measure(layer))
    measure(layer)
    assert qk_clip(layer, spec(tau)) == 1
    once = weights(layer)
    assert qk_clip(layer, spec(tau)) == 0          # records consumed: nothing new to clip
    measure(layer)
    assert qk_clip(layer, spec(tau)) == 0          # re-measured at tau: not above it
    assert all(torch.equal(once[n], w) for n, w in weights(layer).items())


@pytest.mark.parametrize("clip", [spec(1e30), spec(1e-3, enabled=False)], ids=["tau_huge", "disabled"])
def test_no_op_settings(layer, clip):
    w0 = weights(layer)
    measure(layer)
    assert qk_clip(layer, clip) == 0
    assert all(torch.equal(w0[n], w) for n, w in weights(layer).items())


def test_protected_rotary_k_is_untouched_and_q_takes_the_full_factor(layer):
    before, w0 = measure(layer), weights(layer)
    tau = tau_between(before)
    measure(layer)
    assert qk_clip(layer, spec(tau, protected=True)) == 1
    after, w1 = measure(layer), weights(layer)
    assert torch.equal(w1["k_proj"], w0["k_proj"])
    torch.testing.assert_close(heads(w1["q_proj"], 1), heads(w0["q_proj"], 1) * (tau / before[1]))
    assert after[1].item() == pytest.approx(tau, rel=1e-4)


def test_per_layer_mode_scales_every_head_by_the_layer_max(layer):
    before, w0 = measure(layer), weights(layer)
    tau = tau_between(before)
    measure(layer)
    assert qk_clip(layer, spec(tau, per_head=False)) == N_HEADS
    after = measure(layer)
    gamma = tau / before.max()
    assert after.max().item() == pytest.approx(tau, rel=1e-4)
    torch.testing.assert_close(after, before * gamma, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weights(layer)["k_proj"], w0["k_proj"] * gamma.sqrt())


def test_tracking_off_is_an_error_not_a_silent_no_op():
    model = ReferenceAttention()
    model(X)
    with pytest.raises(RuntimeError, match="set_max_logit_tracking"):
        qk_clip(model, spec(1.0))


def test_counts_heads_across_layers():
    torch.manual_seed(0)
    model = nn.Sequential(ReferenceAttention(), ReferenceAttention())
    set_max_logit_tracking(model, True)
    model(X)
    maxima = torch.cat([m.max_logit for m in clippable_modules(model)])
    tau = maxima.median().item()
    assert qk_clip(model, spec(tau)) == int((maxima > tau).sum()) > 0
    assert all(m.max_logit is None for m in clippable_modules(model))


def test_discovery_finds_every_attention_of_the_real_model():
    from forge.model import attention_modules as model_attention_modules, build_model
    from forge.spec.load import load_spec

    s = load_spec(SPECS / "tiny.toml").spec
    model = build_model(s.model, s.objective, device="meta")
    found = clippable_modules(model)
    assert len(found) == s.model.n_layers + s.model.trm.n_layers and found == model_attention_modules(model)


def _clip_on_rank(rank: int, world: int, store: str, out: str) -> None:
    """One data-parallel rank: same weights everywhere, different local maxima (different micro-batches)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = ReferenceAttention()
    set_max_logit_tracking(model, True)
    model.max_logit = torch.tensor([[1.0, 50.0, 1.0, 1.0], [1.0, 1.0, 1.0, 80.0]][rank])
    clipped = qk_clip(model, spec(10.0))
    torch.save({"clipped": clipped, "q": model.q_proj.weight.detach()}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_ranks_clip_identically_on_the_all_reduced_max(tmp_path):
    torch.multiprocessing.spawn(_clip_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    results = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    assert results[0]["clipped"] == results[1]["clipped"] == 2
    assert torch.equal(results[0]["q"], results[1]["q"])
    torch.manual_seed(0)
    q0 = ReferenceAttention().q_proj.weight.detach()
    torch.testing.assert_close(heads(results[0]["q"], 3), heads(q0, 3) * (10.0 / 80.0) ** 0.5)
    torch.testing.assert_close(heads(results[0]["q"], 1), heads(q0, 1) * (10.0 / 50.0) ** 0.5)
