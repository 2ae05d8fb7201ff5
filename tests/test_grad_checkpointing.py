"""Gradient checkpointing (train.gradient_checkpointing, an OOM mitigation): recomputing the backbone blocks
and the TRM refiner in the backward pass gives the same loss and gradients (1e-5) as storing them, with every
side channel intact (max-logit tracking for QK-clip, state-gradient hooks)."""
from __future__ import annotations

import pytest
import torch

from conftest import SPECS
from forge.model import attention_modules, build_model
from forge.spec.load import load_spec

SMALL = ["model.vocab_size=64", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=48",
         "model.memory.d_mem=16", "model.memory.rank=4", "model.memory.chunk_size=8", "model.gate.hidden=16",
         "model.trm.ffn_hidden=48", "model.attention.sw_window=8", "model.trm.n_layers=2"]


def loss_and_grads(mode: str, *overrides: str):
    torch.manual_seed(0)
    spec = load_spec(SPECS / "tiny.toml", SMALL + list(overrides)).spec
    model = build_model(spec.model, spec.objective)
    model.set_gradient_checkpointing(mode)
    for attn in attention_modules(model):
        attn.track_max_logit = True
    if model.trm is not None:
        model.trm.track_state_grads = True
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 64, (3, 40), generator=g), torch.randint(0, 64, (3, 40), generator=g)
    out = model(idx, targets, act_loss_weight=0.1)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    max_logits = [a.max_logit.clone() for a in attention_modules(model)]
    state_grads = model.trm.pop_state_grad_norms() if model.trm is not None else {}
    return out.loss.detach(), grads, max_logits, state_grads, model


@pytest.mark.parametrize("mode", ["backbone", "backbone_and_trm"])
@pytest.mark.parametrize("variant", [[], ["model.trm.detach_between_steps=false"], ["model.trm.enabled=false"]])
def test_checkpointing_gives_the_same_loss_and_gradients(mode, variant):
    loss, grads, max_logits, state_grads, _ = loss_and_grads("off", *variant)
    loss_c, grads_c, max_logits_c, state_grads_c, model = loss_and_grads(mode, *variant)
    assert model.checkpoint_blocks
    if model.trm is not None:
        assert model.trm.checkpoint_refiner == (mode == "backbone_and_trm")
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-5, rtol=1e-5, msg=name)
    for a, b in zip(max_logits_c, max_logits):       # the recomputation does not change what QK-clip reads
        torch.testing.assert_close(a, b)
    assert state_grads_c.keys() == state_grads.keys()
    for k in state_grads:
        torch.testing.assert_close(state_grads_c[k], state_grads[k], atol=1e-5, rtol=1e-5)


def test_checkpointing_really_recomputes_in_backward():
    """The switch is not a no-op: the checkpointed blocks run again during backward."""
    calls = {"n": 0}
    _, _, _, _, model = loss_and_grads("off")
    block = model.blocks[0]
    block.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    for mode, expected in (("off", 1), ("backbone", 2)):
        calls["n"] = 0
        model.set_gradient_checkpointing(mode)
        model(idx, targets).loss.backward()
        assert calls["n"] == expected, mode
    with torch.no_grad():                     # evaluation: nothing to recompute, one call
        calls["n"] = 0
        model(idx)
        assert calls["n"] == 1
