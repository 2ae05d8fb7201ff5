"""The whole Phase 1 model, built from the spec: causality, determinism, gradient flow, detach, ACT halting,
the composite loss and its metrics, and the parameter budget (B1). Each test is one line of lessons.md."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SPECS
from forge.checklist.runner import run_checklist
from forge.errors import SpecError
from forge.model import IGNORE_INDEX, attention_modules, build_model, count_parameters
from forge.model.norm import RMSNorm
from forge.model.objective import LOCAL
from forge.spec.load import load_spec
from forge.train.objective import training_loss

# A small variant of the tiny spec: the same code paths, milliseconds per forward.
SMALL = ["model.vocab_size=64", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=48",
         "model.memory.d_mem=16", "model.memory.rank=4", "model.memory.chunk_size=8", "model.gate.hidden=16",
         "model.trm.ffn_hidden=48", "model.attention.sw_window=8"]
V = 64


def small_spec(*overrides: str):
    return load_spec(SPECS / "tiny.toml", SMALL + list(overrides)).spec


def small_model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    spec = small_spec(*overrides)
    return build_model(spec.model, spec.objective)


def batch(B: int = 2, T: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(out))
    return calls


# ------------------------------------------------------------------------------------------ causality

@pytest.mark.parametrize("attention", ["type=full", "type=sliding_window", "sw_window=16",
                                       "type=sliding_window_with_global", "type=sliding_window_with_global;16"])
def test_every_trm_step_is_causal_for_every_attention_type(attention):
    """Perturbing tokens after t leaves every outer step's logits at positions <= t unchanged (< 1e-5).
    Window 8 at T=64 runs the blocked layout, window 16 the dense band; memory chunks are 8 tokens."""
    kind, _, window = attention.partition(";")
    overrides = [f"model.attention.{kind}"] + ([f"model.attention.sw_window={window}"] if window else [])
    model = small_model(*overrides).eval()
    idx, _ = batch()
    with torch.no_grad():
        before = model.step_logits(idx)
        for t in (20, 39):                               # inside a memory chunk, and at a chunk's end
            changed = idx.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(64 - t - 1) % (V - 1)) % V
            after = model.step_logits(changed)
            assert len(after) == 3
            for step, (b, a) in enumerate(zip(before, after)):
                assert (a[:, : t + 1] - b[:, : t + 1]).abs().max() < 1e-5, f"step {step} leaks the future"
                assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-4


def test_same_batch_twice_in_eval_gives_identical_logits():
    """Stateless: a training step in between (which moves the ACT EMA) changes nothing in the outputs."""
    model = small_model()
    idx, targets = batch()
    model.eval()
    first = model(idx).logits
    model.train()
    model(idx[:1, :32], targets[:1, :32])
    model.eval()
    assert torch.equal(model(idx).logits, first)


# ------------------------------------------------------------------------------------------ gradients

def test_gradient_reaches_every_parameter_that_should_learn():
    """Embedding, every block, memory (the shipped Titans memory: the MLP's initial weights, the step size, the
    data-dependent gates and the convolution), gate, TRM refiner and ACT head."""
    model = small_model("objective.attention_entropy=0.01").train()
    idx, targets = batch(B=3, T=32)
    out = model(idx, targets, act_loss_weight=1.0)
    out.loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
    memory = model.memory
    assert all(w.grad.abs().sum() > 0 for w in memory.init_weights) and memory.conv_weight.grad.abs().sum() > 0
    assert memory.decay_weight.grad.abs().sum() > 0 and model.trm.act.weight.grad.abs().sum() > 0


def test_state_gradient_norms_are_recorded_on_request_only():
    model = small_model().train()
    idx, targets = batch(B=2, T=32)
    model(idx, targets).loss.backward()
    assert model.trm.pop_state_grad_norms() == {}          # off by default: no hooks, no cost
    model.trm.track_state_grads = True
    model(idx, targets).loss.backward()
    norms = model.trm.pop_state_grad_norms()
    assert set(norms) == {"grad/norm_y", "grad/norm_z"} and all(v > 0 for v in norms.values())
    assert model.trm.pop_state_grad_norms() == {}          # consumed
    # the last step's answer gets gradient from its own CE only: zero its weight and y's norm falls
    model.zero_grad()
    no_last = small_model("model.trm.step_weights=[1.0, 1.0, 0.0]").train()
    no_last.load_state_dict(model.state_dict())
    no_last.trm.track_state_grads = True
    no_last(idx, targets).loss.backward()
    assert no_last.trm.pop_state_grad_norms()["grad/norm_y"] < norms["grad/norm_y"]


@pytest.mark.parametrize("detach", [True, False])
def test_detach_cuts_the_gradient_between_outer_steps(detach):
    """With detach on, the loss of step 1 sends no gradient into step 0's outputs; with it off, it does."""
    model = small_model(f"model.trm.detach_between_steps={str(detach).lower()}",
                        "model.trm.step_weights=[0.0, 1.0, 0.0]",
                        "objective.sequence_coherence=0.0", "objective.diversity=0.0").train()
    outputs = count_calls(model.trm.net)
    idx, targets = batch(T=32)
    loss = model(idx, targets).loss
    per_step = 1 + model.spec.trm.micro_steps
    assert len(outputs) == 3 * per_step
    grads = torch.autograd.grad(loss, outputs[:per_step], allow_unused=True)
    reached = sum(0.0 if g is None else g.abs().sum().item() for g in grads)
    assert (reached == 0.0) if detach else (reached > 0.0)


# ------------------------------------------------------------------------------------------ ACT

def with_halting_head(model, weight_scale: float, bias: float, seed: int = 1):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.trm.act.weight.copy_(torch.randn(model.trm.act.weight.shape, generator=g) * weight_scale)
        model.trm.act.bias.fill_(bias)
    return model


def test_halting_thresholds_set_the_average_steps():
    reference = with_halting_head(small_model(), weight_scale=1.0, bias=0.0)
    idx, targets = batch()
    averages = []
    for thresh in (1.0, 0.7, 0.5, 0.3, 0.0):
        model = small_model(f"model.act.halt_thresh={thresh}")
        model.load_state_dict(reference.state_dict())
        with torch.no_grad():
            averages.append(model.eval()(idx, targets, halt=True).metrics["act/avg_steps"].item())
    assert averages[0] == 3.0 and averages[-1] == 1.0
    assert all(1.0 <= a <= 3.0 for a in averages)
    assert averages == sorted(averages, reverse=True) and averages[1] > averages[3]


# Without act.freeze_halted every token is refined at every step that runs (the full computation, as the
# decoder without skip_halted); the frozen computation has its own tests (test_model_act.py).
FULL_DEPTH = "model.act.freeze_halted=false"


@pytest.mark.parametrize("bias,calls,step", [(20.0, 3, 0), (-20.0, 9, 2)])
def test_halted_steps_are_really_skipped(bias, calls, step):
    model = with_halting_head(small_model(FULL_DEPTH), weight_scale=0.0, bias=bias).eval()
    counted = count_calls(model.trm.net)
    idx, _ = batch()
    with torch.no_grad():
        out = model(idx, halt=True)
        assert len(counted) == calls                     # (1 + micro_steps) calls per outer step that ran
        assert out.metrics["act/avg_steps"].item() == step + 1
        assert torch.equal(out.logits, model.step_logits(idx)[step])


def test_each_token_uses_the_first_step_whose_halt_probability_exceeds_the_threshold():
    model = with_halting_head(small_model(FULL_DEPTH), weight_scale=1.0, bias=0.0).eval()
    halt_logits = count_calls(model.trm.act)
    idx, targets = batch()
    with torch.no_grad():
        out = model(idx, targets, halt=True, return_logits=True)
        probs = torch.stack([torch.sigmoid(h) for h in halt_logits])          # (steps, B, T)
        steps = model.step_logits(idx)
    over = probs > model.spec.act.halt_thresh
    over[-1] = True
    chosen = over.float().argmax(0)                                            # first step over the threshold
    assert 0 < chosen.float().mean() < 2                                       # a real mix of steps
    want = torch.stack(steps[: len(halt_logits)])[chosen, torch.arange(2)[:, None], torch.arange(64)]
    assert torch.equal(out.logits, want)
    assert out.metrics["act/avg_steps"].item() == pytest.approx((chosen + 1).float().mean().item())
    ce = F.cross_entropy(want.flatten(0, 1), targets.flatten())
    assert out.metrics["loss/ce"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_act_target_is_per_token_correctness_of_each_step():
    model = with_halting_head(small_model(), weight_scale=1.0, bias=0.0).eval()
    halt_logits = count_calls(model.trm.act)
    idx, _ = batch()
    with torch.no_grad():
        steps = model.step_logits(idx)
        targets = steps[1].argmax(-1)                     # step 1 is right everywhere, others mostly not
        halt_logits.clear()
        out = model(idx, targets)
    want = torch.stack([F.binary_cross_entropy_with_logits(h, (s.argmax(-1) == targets).float())
                        for h, s in zip(halt_logits, steps)]).mean()
    assert out.metrics["loss/act"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out.metrics["accuracy/step_1"].item() == 1.0


def training_forward(model, idx, targets):
    """A training forward as the trainer makes it: the loss on the batch, then the ACT accuracy EMA."""
    out = model(idx, targets)
    training_loss(model, out, 0.0, LOCAL)
    return out


def test_accuracy_ema_is_persistent_model_state():
    model = small_model().train()
    idx, targets = batch()
    first = training_forward(model, idx, targets).metrics
    acc0 = torch.stack([first[f"accuracy/step_{t}"] for t in range(3)])
    assert torch.equal(model.trm.act.ema_acc, acc0)               # the first batch sets the EMA
    second = training_forward(model, idx[:, :32], targets[:, :32]).metrics
    acc1 = torch.stack([second[f"accuracy/step_{t}"] for t in range(3)])
    torch.testing.assert_close(model.trm.act.ema_acc, 0.98 * acc0 + 0.02 * acc1)
    state = model.state_dict()
    assert "trm.act.ema_acc" in state and "trm.act.ema_updates" in state
    restored = small_model(seed=5)
    restored.load_state_dict(state)
    assert torch.equal(restored.trm.act.ema_acc, model.trm.act.ema_acc)
    model.eval()
    model(idx, targets)
    assert torch.equal(restored.trm.act.ema_acc, model.trm.act.ema_acc)  # evaluation never moves it


def test_safetensors_round_trip_is_bit_identical_with_the_tied_head(tmp_path):
    """Lessons: a checkpoint save crashed on the tied embedding. One tensor serves as embedding and head."""
    from safetensors.torch import load_model, save_model

    model = small_model().train()
    idx, targets = batch()
    training_forward(model, idx, targets)                         # moves the ACT EMA buffers
    save_model(model, str(tmp_path / "model.safetensors"))
    restored = small_model(seed=3)
    assert load_model(restored, str(tmp_path / "model.safetensors")) == (set(), [])
    model.eval(), restored.eval()
    assert torch.equal(restored(idx).logits, model(idx).logits)
    assert torch.equal(restored.trm.act.ema_acc, model.trm.act.ema_acc)


# ------------------------------------------------------------------------------------------ objective

def test_loss_is_the_documented_composite_of_its_logged_terms():
    spec = small_spec("objective.attention_entropy=0.05")
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective).train()
    idx, targets = batch(B=4)
    out = model(idx, targets, act_loss_weight=0.3)
    m, obj = out.metrics, spec.objective
    want = (obj.next_token * sum(w * m[f"loss/step_{t}"] for t, w in enumerate(spec.model.trm.step_weights))
            + obj.sequence_coherence * m["loss/coherence"] + obj.diversity * m["loss/diversity"]
            - spec.model.gate.entropy_reg * m["gate/entropy"] + 0.3 * m["loss/act"]
            - obj.attention_entropy * m["loss/attn_entropy"])
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert m["loss/total"].item() == out.loss.item()
    assert m["loss/ce"].item() == m["loss/step_2"].item()          # without halting: the last step
    assert m["loss/coherence"] > 0 and m["loss/step_0"] != m["loss/step_2"]


def test_ignored_positions_carry_no_loss():
    model = small_model().eval()
    idx, targets = batch()
    masked = targets.clone()
    masked[:, 40:] = IGNORE_INDEX
    with torch.no_grad():
        out = model(idx, masked, return_logits=True)
    want = F.cross_entropy(out.logits[:, :40].flatten(0, 1), targets[:, :40].flatten())
    assert out.metrics["loss/ce"].item() == pytest.approx(want.item(), rel=1e-5)


def test_output_contract_and_metrics():
    model = small_model().train()
    idx, targets = batch()
    bare = model(idx)
    assert bare.loss is None and bare.ce_per_step == [] and bare.logits.shape == (2, 64, V)
    out = model(idx, targets)
    assert out.logits is None and len(out.ce_per_step) == 3
    assert not any(c.requires_grad for c in out.ce_per_step)
    expected = {"loss/total", "loss/ce", "loss/step_0", "loss/step_1", "loss/step_2", "loss/coherence",
                "loss/diversity", "loss/act", "act/avg_steps", "act/halt_prob_step0", "act/ema_acc_step0",
                "act/ema_acc_step2", "gate/entropy", "gate/y_usage", "gate/m_usage", "memory/update_norm",
                "memory/effective_decay", "embedding_diversity"}
    assert expected <= set(out.metrics)
    assert not any(k.startswith("attn/") for k in out.metrics)      # off unless asked for
    model.log_attention_stats = True
    for attn in attention_modules(model):
        attn.track_max_logit = True
    out = model(idx, targets)
    assert {"attn/entropy", "attn/sink_count", "attn/logit_max"} <= set(out.metrics)
    for name, value in out.metrics.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), name
    assert 0 < out.metrics["gate/y_usage"] < 1 and 0 < out.metrics["embedding_diversity"] <= 2
    modules = attention_modules(model)
    assert len(modules) == model.spec.n_layers + model.spec.trm.n_layers
    assert all(a.max_logit.shape == (a.n_heads,) for a in modules)
    assert out.metrics["attn/logit_max"] == max(a.max_logit.max() for a in modules)


@pytest.mark.parametrize("disabled", ["model.trm.enabled=false", "model.memory.enabled=false"])
def test_baselines_without_trm_or_memory(disabled):
    model = small_model(disabled).eval()
    idx, targets = batch()
    with torch.no_grad():
        out = model(idx, targets)
        before = model(idx).logits
        changed = idx.clone()
        changed[:, 30:] = (changed[:, 30:] + 1) % V
        after = model(changed).logits
    assert (after[:, :30] - before[:, :30]).abs().max() < 1e-5
    if "trm" in disabled:
        assert len(out.ce_per_step) == 1 and not any(k.startswith("act/") for k in out.metrics)
    else:
        assert len(out.ce_per_step) == 3 and not any(k.startswith(("gate/", "memory/")) for k in out.metrics)


def test_carried_state_is_refused_with_a_located_error():
    with pytest.raises(SpecError, match="stateless_mode"):
        load_spec(SPECS / "tiny.toml", ["model.trm.stateless_mode=false"])


# ------------------------------------------------------------------------------------------ budget

def test_phase1_budget_counted_on_the_real_model():
    spec = load_spec(SPECS / "phase1.toml").spec
    model = build_model(spec.model, spec.objective, device="meta")
    assert all(p.is_meta for p in model.parameters())
    counts = count_parameters(model)
    assert abs(counts["total"] - 25_000_000) <= 1_000_000
    assert counts["total"] == sum(p.numel() for p in model.parameters())            # tied head counted once
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["embedding"] == spec.model.vocab_size * spec.model.d_model
    assert all(counts[k] > 0 for k in counts)


def test_tiny_spec_stays_small_and_budget_checks_report_the_table():
    tiny = load_spec(SPECS / "tiny.toml").spec
    assert count_parameters(build_model(tiny.model, tiny.objective, device="meta"))["total"] < 1_000_000
    for name in ("phase1.toml", "tiny.toml"):
        (item,) = run_checklist(load_spec(SPECS / name), only=["B1-param-budget"]).items
        assert item.status == "pass", item.detail
        assert item.data["total"] == int(item.measured.split()[0].replace(",", ""))
        assert "backbone_attention" in item.detail and set(item.data) >= {"embedding", "memory", "gate", "trm"}


def test_budget_check_fails_when_the_model_outgrows_it():
    resolved = load_spec(SPECS / "phase1.toml", ["model.ffn_hidden=1024"])
    (item,) = run_checklist(resolved, only=["B1-param-budget"]).items
    assert item.status == "fail" and "over target" in item.detail


def test_parameters_follow_the_optimizer_routing_contract():
    """Only the tied embedding is an nn.Embedding; every other 2-D parameter is a Muon matrix; every 1-D one a
    norm gain, the ACT head, or the memory's step size, data-dependent gates and convolution taps; no Linear has
    a bias."""
    model = small_model()
    assert model.lm_head(torch.zeros(1, 1, 32)).shape[-1] == V and model.tok_emb.weight.shape == (V, 32)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)] == ["tok_emb"]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    one_d = {n for n, p in model.named_parameters() if p.dim() == 1}
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    memory = {f"memory.{name}_{kind}" for name in ("step_size", "momentum", "decay") for kind in ("weight", "bias")}
    assert one_d == norms | {"trm.act.weight", "trm.act.bias", "memory.conv_weight"} | memory
    assert all(p.dim() in (1, 2) for p in model.parameters())
