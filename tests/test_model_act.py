"""Recursion options (trm.grad_cycles, trm.learned_init), the ACT head input, the EMA-calibrated halting
target, and frozen halted tokens at evaluation (act.freeze_halted): causality, determinism, gradients,
round trip, and that the frozen computation is what forge/model/trm.py documents and saves refiner work."""
from __future__ import annotations

import pytest
import torch

from forge.errors import SpecError
from forge.model.trm import FrozenTokens
from forge.spec.load import load_spec
from conftest import SPECS
from test_model import V, batch, count_calls, small_model, with_halting_head

T = 64


def perturbed_after(idx: torch.Tensor, t: int) -> torch.Tensor:
    changed = idx.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(idx.shape[1] - t - 1) % (V - 1)) % V
    return changed


# ------------------------------------------------------------------------------------------ recursion options

OPTIONS = ["model.trm.grad_cycles=last", "model.trm.learned_init=true",
           "model.trm.learned_init=true;model.trm.micro_steps=1;model.trm.grad_cycles=last",
           "model.act.head_input=answer;model.act.ema_gain_tol=0.01"]


@pytest.mark.parametrize("option", OPTIONS)
def test_recursion_options_are_causal_and_deterministic(option):
    model = small_model(*option.split(";")).eval()
    idx, _ = batch()
    with torch.no_grad():
        before = model.step_logits(idx)
        assert all(torch.equal(a, b) for a, b in zip(model.step_logits(idx), before))
        after = model.step_logits(perturbed_after(idx, 30))
    for b, a in zip(before, after):
        assert (a[:, :31] - b[:, :31]).abs().max() < 1e-5 and (a[:, 31:] - b[:, 31:]).abs().max() > 1e-4


@pytest.mark.parametrize("option", OPTIONS)
def test_recursion_options_give_every_parameter_a_gradient(option):
    model = small_model(*option.split(";")).train()
    idx, targets = batch(B=3, T=32)
    model(idx, targets, act_loss_weight=1.0).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_grad_cycles_last_keeps_the_values_and_cuts_the_first_latent_refinements():
    """Same forward values as "all"; with micro_steps = 3 the first two latent refinements of every outer
    step carry no gradient, the third and the answer update do."""
    all_ = small_model("model.trm.micro_steps=3").train()
    last = small_model("model.trm.micro_steps=3", "model.trm.grad_cycles=last").train()
    last.load_state_dict(all_.state_dict())
    idx, targets = batch(T=32)
    outputs = {name: count_calls(m.trm.net) for name, m in (("all", all_), ("last", last))}
    loss_all, loss_last = all_(idx, targets).loss, last(idx, targets).loss
    assert torch.equal(loss_all, loss_last)
    per_step = 4
    assert [o.requires_grad for o in outputs["last"]] == [False, False, True, True] * 3
    assert all(o.requires_grad for o in outputs["all"])
    loss_last.backward()
    assert all(p.grad is not None for p in last.trm.net.parameters())
    assert len(outputs["last"]) == 3 * per_step


def test_learned_init_starts_the_recursion_from_the_learned_vectors():
    model = small_model("model.trm.learned_init=true").eval()
    idx, _ = batch()
    with torch.no_grad():
        before = model.step_logits(idx)
        model.trm.z_init.add_(1.0)
        moved = model.step_logits(idx)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(moved, before))
    state = model.state_dict()
    assert {"trm.y_init", "trm.z_init"} <= set(state)
    restored = small_model("model.trm.learned_init=true", seed=4).eval()
    restored.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(restored(idx).logits, model(idx).logits)
    assert "trm.y_init" not in small_model().state_dict()          # the default has no such parameters


def test_learned_init_without_a_gradient_path_is_refused():
    with pytest.raises(SpecError, match="z_init would never learn"):
        load_spec(SPECS / "tiny.toml", ["model.trm.learned_init=true", "model.trm.grad_cycles=last"])


# ------------------------------------------------------------------------------------------ ACT head and target

def test_answer_head_input_reads_each_steps_answer_state():
    model = with_halting_head(small_model("model.act.head_input=answer"), weight_scale=1.0, bias=0.0).eval()
    read = []
    model.trm.act.register_forward_hook(lambda m, args, out: read.append(args[0]))
    idx, targets = batch()
    with torch.no_grad():
        model(idx, targets)
        rope = model.rope(T, idx.device)
        states = list(model.trm.steps(model.encode(idx, rope)[0], rope))
    assert len(read) == 3 and all(torch.equal(r, y) for r, (y, _) in zip(read, states))
    assert not any(torch.equal(r, z) for r, (_, z) in zip(read, states))


def test_later_gain_is_the_best_later_ema_accuracy_minus_this_steps():
    head = small_model("model.act.ema_gain_tol=0.01").trm.act
    head.ema_acc.copy_(torch.tensor([0.30, 0.50, 0.40]))
    torch.testing.assert_close(head.later_gain(), torch.tensor([0.20, -0.10, 0.0]))
    correct = torch.tensor([[True, False, True]])
    assert head.target(correct, 0).tolist() == [[False, False, False]]      # step 2 adds 0.2 > tol
    assert head.target(correct, 1).tolist() == [[True, False, True]]
    assert head.target(correct, 2).tolist() == [[True, False, True]]        # the last step keeps "correct"


def _halts_after_training_the_head(ema_acc) -> float:
    """Train only the halting head on the calibrated target, with every step correct (targets = each
    token's step-0 argmax, which the later steps mostly repeat); return the share halting at step 0."""
    model = small_model("model.act.ema_gain_tol=0.01", "model.act.halt_thresh=0.5").eval()
    model.trm.act.ema_acc.copy_(torch.tensor(ema_acc))
    model.trm.act.ema_updates.fill_(10)
    idx, _ = batch()
    with torch.no_grad():
        targets = model.step_logits(idx)[0].argmax(-1)
    optimizer = torch.optim.SGD([model.trm.act.weight, model.trm.act.bias], lr=2.0)
    for _ in range(10):                     # eval mode: the EMA stays as set; only the ACT term has head gradient
        optimizer.zero_grad()
        model(idx, targets, act_loss_weight=1.0).loss.backward()
        optimizer.step()
    with torch.no_grad():
        return model(idx, targets, halt=True).metrics["act/halt_share_step0"].item()


def test_ema_calibration_halts_less_where_later_steps_help():
    helps = _halts_after_training_the_head([0.20, 0.30, 0.40])   # later steps add 0.2 accuracy
    no_help = _halts_after_training_the_head([0.40, 0.40, 0.40])
    assert helps < 0.1 and no_help > 0.9


# ------------------------------------------------------------------------------------------ frozen halted tokens

FREEZE = "model.act.freeze_halted=true"
ATTENTION = ["type=full", "type=sliding_window", "type=sliding_window;16", "type=sliding_window_with_global"]


def frozen_model(attention: str = "type=sliding_window", bias: float = -0.5, *more: str):
    kind, _, window = attention.partition(";")
    overrides = [FREEZE, f"model.attention.{kind}", "model.init_std=0.2", *more]
    overrides += [f"model.attention.sw_window={window}"] if window else []
    return with_halting_head(small_model(*overrides), weight_scale=0.3, bias=bias).eval()


def frozen_reference(model, idx: torch.Tensor) -> torch.Tensor:
    """The documented semantics computed another way: the ordinary full-batch refiner, with the keys and
    values of halted tokens (k_proj, v_proj outputs, before RoPE) replaced by those of their halting step.
    Attention is the only place where tokens meet, so the running tokens' outputs are the frozen ones."""
    trm, per_step = model.trm, 1 + model.trm.micro_steps
    halted = torch.zeros(idx.shape, dtype=torch.bool)
    kept, calls = {}, {}

    def keep_halted(module, args, out):
        n = calls[module] = calls.get(module, -1) + 1
        key = (module, n % per_step)
        if key in kept:
            out = torch.where(halted[..., None], kept[key], out)
        kept[key] = out
        return out

    projections = [b.attn.k_proj for b in trm.net.blocks] + [b.attn.v_proj for b in trm.net.blocks]
    hooks = [p.register_forward_hook(keep_halted) for p in projections]
    try:
        rope = model.rope(idx.shape[1], idx.device)
        out = None
        for t, (y, z) in enumerate(trm.steps(model.encode(idx, rope)[0], rope)):
            state = y if model.spec.act.head_input == "answer" else z
            stop = (torch.sigmoid(trm.act(state)) > model.spec.act.halt_thresh) | (t == trm.t_max - 1)
            newly = stop & ~halted
            logits = model.lm_head(y)
            out = logits if out is None else torch.where(newly[..., None], logits, out)
            halted = halted | newly
    finally:
        for h in hooks:
            h.remove()
    return out


@pytest.mark.parametrize("attention", ATTENTION)
def test_frozen_halting_computes_the_documented_semantics(attention):
    model = frozen_model(attention)
    idx, targets = batch()
    with torch.no_grad():
        out = model(idx, targets, halt=True, return_logits=True)
        want = frozen_reference(model, idx)
        full = model.step_logits(idx)
    share = out.metrics["act/halted_early_share"].item()
    assert 0.1 < share < 0.9                                     # a real mix of halted and running tokens
    assert (out.logits - want).abs().max() < 1e-5
    running = out.used_steps == 3
    assert (out.logits - full[2]).abs().amax(-1)[running].max() > 1e-3   # freezing changes running tokens


@pytest.mark.parametrize("attention", ATTENTION + ["type=sliding_window;8;latent"])
def test_frozen_halting_is_causal(attention):
    """The shipped halting head reads the answer state; ";latent": the head reading the latent z."""
    attention, latent_head = attention.removesuffix(";latent"), attention.endswith(";latent")
    model = frozen_model(attention, -0.5, *(["model.act.head_input=latent"] if latent_head else []))
    idx, _ = batch()
    with torch.no_grad():
        before = model(idx, halt=True)
        for t in (20, 39):
            after = model(perturbed_after(idx, t), halt=True)
            assert torch.equal(after.used_steps[:, : t + 1], before.used_steps[:, : t + 1])
            assert (after.logits[:, : t + 1] - before.logits[:, : t + 1]).abs().max() < 1e-6
            assert (after.logits[:, t + 1:] - before.logits[:, t + 1:]).abs().max() > 1e-4


def test_frozen_halting_is_deterministic_and_an_evaluation_mode():
    model = frozen_model()
    idx, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(idx, halt=True).logits, model(idx, halt=True).logits)
    with pytest.raises(RuntimeError, match="no_grad"):
        x = torch.zeros(2, T, model.spec.d_model)
        next(model.trm.steps(x, model.rope(T, x.device), FrozenTokens(2, T, x.device)))


def test_nothing_halted_gives_the_full_computation():
    model = frozen_model(bias=-20.0)
    idx, _ = batch()
    with torch.no_grad():
        out = model(idx, halt=True)
        assert (out.logits - model.step_logits(idx)[2]).abs().max() < 1e-5
    assert out.metrics["act/compute_share"].item() == 1.0 and out.metrics["act/halted_early_share"].item() == 0.0


def test_halted_tokens_stop_costing_feed_forward_and_query_work():
    """The refiner's feed-forward and query projection see only the running rows; compute_share counts them."""
    model = frozen_model()
    block = model.trm.net.blocks[0]
    rows = {"ffn": [], "q": []}
    block.ffn.register_forward_hook(lambda m, a, o: rows["ffn"].append(a[0].shape[:-1].numel()))
    block.attn.q_proj.register_forward_hook(lambda m, a, o: rows["q"].append(a[0].shape[:-1].numel()))
    idx, _ = batch()
    with torch.no_grad():
        out = model(idx, halt=True)
    used = out.used_steps
    running = [(used > t).sum().item() for t in range(3)]                 # tokens refined at step t
    want = [n for n in running for _ in range(1 + model.trm.micro_steps)]
    assert rows["ffn"] == want and rows["q"] == want and running[1] < running[0]
    assert out.metrics["act/compute_share"].item() == pytest.approx(sum(want) / (3 * 3 * used.numel()))
    assert out.metrics["act/halted_early_share"].item() == pytest.approx((used < 3).float().mean().item())


def test_without_freezing_the_share_counts_every_token_of_every_step_run():
    unfrozen = "model.act.freeze_halted=false"
    model = with_halting_head(small_model(unfrozen), weight_scale=0.0, bias=20.0).eval()   # all halt at step 0
    idx, _ = batch()
    with torch.no_grad():
        out = model(idx, halt=True)
        mixed = with_halting_head(small_model(unfrozen), weight_scale=1.0, bias=0.0).eval()(idx, halt=True)
    assert out.metrics["act/compute_share"].item() == pytest.approx(1 / 3)
    assert mixed.metrics["act/compute_share"].item() == 1.0 and mixed.metrics["act/halted_early_share"] > 0
    assert "act/compute_share" not in model(idx).metrics                  # only under halting


def _running_masks(B: int, T: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    uneven = torch.rand(B, T, generator=g) < torch.tensor([0.95, 0.3, 0.7])[:, None]   # per-sequence shares
    edge = torch.rand(B, T, generator=g) < 0.5
    edge[0], edge[1] = True, False                   # one sequence runs whole, one has halted whole
    return {"uneven": uneven, "whole-or-none": edge}


@pytest.mark.parametrize("kind", ["full", "sliding_window", "sliding_window_with_global"])
@pytest.mark.parametrize("case", ["uneven", "whole-or-none"])
def test_running_rows_attend_as_the_dense_masked_computation(kind, case):
    """The frozen path's attention layout (trm.Rows: padded query slots in blocks, each against the key range
    it can see, additive mask) gives, for every running row, the dense masked attention over the running
    tokens' fresh keys and the halted tokens' kept ones; the sequence is long enough for several blocks and a
    window (16) that cuts their first keys."""
    from forge.model.attention import Attention
    from forge.model.rope import apply_rope, rope_tables
    from forge.model.trm import Rows, attend_rows
    from forge.model.window import AttentionPattern
    B, L, d, H = 3, 300, 32, 2
    torch.manual_seed(0)
    attn = Attention(d, H, AttentionPattern(kind, 16, 8, 8))
    rope = rope_tables(L, d // H, 10000.0)
    running = _running_masks(B, L)[case]
    h = torch.randn(B, L, d)
    kept = torch.randn(B, L, H, d // H), torch.randn(B, L, H, d // H)
    rows = Rows(running, attn.pattern, rope)
    assert len(rows.blocks) > 1 and (kind != "sliding_window" or rows.blocks[-1][2] > 0)
    with torch.no_grad():
        out, (K, V) = attend_rows(attn, rows.gather(h), rope, rows, (kept[0].clone(), kept[1].clone()))

        def heads(proj):
            return proj(h).view(B, L, H, -1).transpose(1, 2)
        k_fresh, v_fresh = apply_rope(heads(attn.k_proj), rope), heads(attn.v_proj)
        keep = ~running[:, None, :, None]
        k_all = torch.where(keep, kept[0].transpose(1, 2), k_fresh)
        v_all = torch.where(keep, kept[1].transpose(1, 2), v_fresh)
        dense = torch.nn.functional.scaled_dot_product_attention(
            apply_rope(heads(attn.q_proj), rope), k_all, v_all, attn_mask=attn.pattern.mask(L))
        want = attn.o_proj(dense.transpose(1, 2).reshape(B, L, d))[running]
    assert torch.equal(K, k_all.transpose(1, 2)) and torch.equal(V, v_all.transpose(1, 2))
    assert (out - want).abs().max() < 1e-5
