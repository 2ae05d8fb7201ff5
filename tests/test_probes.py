"""Evaluation probes through their one scoring path: a known-correct oracle scores 1.0, a near miss 0, a random
real model about chance; the item sets are what they claim (GSM8K final numbers from the real held-out split,
marked pairs exactly d apart); heatmaps, the ACT histogram and attn/rope_norm come from the real model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SPECS
from forge.model import build_model
from forge.probes.heatmaps import capture_attention, heatmap_metrics, write_heatmaps
from forge.probes.long_range import range_accuracy
from forge.probes.position import PREFIX, position_items
from forge.probes.reasoning import arithmetic_items, gsm8k_items
from forge.probes.scoring import Item, accuracy_by_kind, exact_match, full_depth_logits
from forge.probes.suite import ProbeSuite, observing
from forge.spec.load import load_spec
from forge.train.evaluate import evaluate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny spec's real tokenizer and held-out data (built-in corpus), and a random model of it."""
    from forge.data import build_data

    cache = tmp_path_factory.getbasetemp() / "forge-cache"
    spec = load_spec(SPECS / "tiny.toml", ["data.eval.max_batches=1"]).spec
    data = build_data(spec.data, vocab_size=spec.model.vocab_size, seed=spec.run.seed, cache_dir=cache)
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective).eval()
    return spec, data, model


class LookupOracle:
    """A known-correct model: it has memorised sequences and predicts each one's next token (one-hot logits);
    an unknown prefix gets uniform logits. `shift` makes it predict the token `shift` places later instead (a
    near miss that must score 0)."""

    def __init__(self, sequences, vocab_size: int, shift: int = 0):
        self.next = {}
        for seq in sequences:
            for t in range(len(seq) - 1 - shift):
                self.next[tuple(seq[:t + 1])] = seq[t + 1 + shift]
        self.vocab_size = vocab_size

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                token = self.next.get(tuple(row[:t + 1]))
                if token is not None:
                    logits[b, t, token] = 1.0
        return logits


def induction_oracle(vocab_size: int):
    """The algorithm the position probe asks for: find the previous occurrence of the current token and
    predict the token that followed it (uniform when there is none)."""
    def logits(idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*idx.shape, vocab_size)
        for b, row in enumerate(idx.tolist()):
            last_seen = {}
            for t, token in enumerate(row):
                if token in last_seen:
                    out[b, t, row[last_seen[token] + 1]] = 1.0
                last_seen[token] = t
        return out
    return logits


@pytest.fixture
def gsm8k_texts(data_dir) -> list[str]:
    lines = (data_dir / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    return [json.loads(line)["text"] for line in lines]


# ------------------------------------------------------------------------------------------ reasoning (A1)
def test_gsm8k_items_ask_for_the_final_number_of_held_out_solutions(tiny, gsm8k_texts):
    _, data, _ = tiny
    tok = data.tokenizer
    texts = gsm8k_texts
    items = gsm8k_items(texts + ["no final answer here"], tok, 12)
    assert len(items) == 12
    for item, text in zip(items, texts):
        assert tok.decode(item.prompt) == text[:text.rindex("####") + 4]
        assert item.answer[-1] == tok.eos_id
        assert tok.decode(item.answer[:-1]) == " " + text.rsplit("####", 1)[1].strip()
    assert tok.decode(items[0].answer[:-1]) == " 18"          # Janet's ducks


def test_reasoning_oracle_scores_one_near_miss_zero_random_model_chance(tiny, gsm8k_texts):
    _, data, model = tiny
    tok = data.tokenizer
    items = gsm8k_items(gsm8k_texts, tok, 16) + arithmetic_items(tok, 16, torch.Generator().manual_seed(0))
    sequences = [it.prompt + it.answer for it in items]
    oracle = exact_match(LookupOracle(sequences, tok.vocab_size), items, tok.pad_id, "cpu", batch_size=5)
    near_miss = exact_match(LookupOracle(sequences, tok.vocab_size, shift=1), items, tok.pad_id, "cpu", 5)
    random_model = exact_match(full_depth_logits(model), items, tok.pad_id, "cpu", batch_size=8)
    assert accuracy_by_kind(items, oracle) == {"gsm8k": 1.0, "arithmetic": 1.0, "all": 1.0}
    assert accuracy_by_kind(items, near_miss)["all"] == 0.0
    assert accuracy_by_kind(items, random_model)["all"] <= 0.05   # chance of a 2+ token exact match ~ 1/V^2


def test_exact_match_needs_the_terminator():
    item = Item((5, 6, 7), (8, 9), "x")
    knows_number_only = LookupOracle([(5, 6, 7, 8, 3)], 16)     # predicts 8, then 3 instead of the terminator 9
    assert exact_match(LookupOracle([(5, 6, 7, 8, 9)], 16), [item], 0, "cpu", 1) == [True]
    assert exact_match(knows_number_only, [item], 0, "cpu", 1) == [False]


def test_arithmetic_items_are_correct_sums(tiny):
    tok = tiny[1].tokenizer
    for item in arithmetic_items(tok, 10, torch.Generator().manual_seed(3)):
        a, b = (int(x) for x in tok.decode(item.prompt).rstrip(" =").split(" + "))
        assert tok.decode(item.answer) == f" {a + b}\n"


# ------------------------------------------------------------------------------------------ position (E1)
def test_position_items_plant_a_unique_marker_exactly_d_apart(tiny):
    _, data, _ = tiny
    tok = data.tokenizer
    stream = np.concatenate([data.source(n).eval.tokens[:3000] for n in data.names]).astype(np.int64)
    items = position_items(stream, [10, 100, 1000], 4, tok.vocab_size, (tok.eos_id, tok.pad_id),
                           torch.Generator().manual_seed(0))
    assert [it.kind for it in items] == ["d10"] * 4 + ["d100"] * 4 + ["d1000"] * 4
    for it in items:
        d = int(it.kind[1:])
        a = it.prompt[-1]
        assert [t for t, x in enumerate(it.prompt) if x == a] == [PREFIX, PREFIX + d]
        assert it.answer == (it.prompt[PREFIX + 1],) and it.answer[0] not in (tok.eos_id, tok.pad_id)


def test_position_probe_oracle_scores_one_and_random_model_chance(tiny):
    _, data, model = tiny
    tok = data.tokenizer
    stream = np.asarray(data.source(data.names[0]).eval.tokens[:5000], dtype=np.int64)
    items = position_items(stream, [10, 100], 8, tok.vocab_size, (tok.eos_id, tok.pad_id),
                           torch.Generator().manual_seed(1))
    oracle = accuracy_by_kind(items, exact_match(induction_oracle(tok.vocab_size), items, tok.pad_id, "cpu", 8))
    assert oracle == {"d10": 1.0, "d100": 1.0, "all": 1.0}
    random_model = accuracy_by_kind(items, exact_match(full_depth_logits(model), items, tok.pad_id, "cpu", 8))
    assert random_model["all"] <= 0.125          # chance ~ 1/2048; at most one lucky item of 16


# ------------------------------------------------------------------------------------------ long range (B2)
def test_long_range_accuracy_splits_at_the_window(tiny):
    spec, data, model = tiny
    window = spec.model.attention.sw_window
    rows = [(b.idx, b.targets) for b in data.eval_batches(data.names[0], 256)[:1]]
    oracle = LookupOracle([], spec.model.vocab_size)
    for idx, targets in rows:
        for i, t in zip(idx.tolist(), targets.tolist()):
            for p in range(len(i)):
                oracle.next[tuple(i[:p + 1])] = t[p]
    assert range_accuracy(oracle, rows, window, "cpu") == {"valid/short_range_acc": 1.0, "valid/long_range_acc": 1.0}

    def only_far(idx):     # right only where part of the context lies beyond the window
        logits = oracle(idx)
        logits[:, :window] = logits[:, :window].roll(1, dims=-1)
        return logits
    assert range_accuracy(only_far, rows, window, "cpu") == {"valid/short_range_acc": 0.0,
                                                             "valid/long_range_acc": 1.0}
    random_model = range_accuracy(full_depth_logits(model), rows, window, "cpu")
    assert random_model["valid/long_range_acc"] < 0.05 and random_model["valid/short_range_acc"] < 0.05


# ------------------------------------------------------------------------------------------ heatmaps, ACT
def test_heatmaps_are_causal_windowed_distributions_with_one_png_per_head(tiny, tmp_path):
    import matplotlib.image

    spec, data, model = tiny
    T, window = 96, spec.model.attention.sw_window
    idx = data.eval_batches(data.names[0], T)[0].idx[:1]
    layers = capture_attention(model, idx)
    assert [l.name for l in layers] == ["backbone0", "backbone1", "refiner0"]
    mask = torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(-window)
    for layer in layers:
        assert layer.probs.shape == (spec.model.n_heads, T, T)
        torch.testing.assert_close(layer.probs.sum(-1), torch.ones(spec.model.n_heads, T))
        assert float(layer.probs[:, ~mask].abs().max()) == 0.0      # never the future, never beyond the window
    paths = write_heatmaps(layers, tmp_path)
    assert len(paths) == 3 * spec.model.n_heads
    assert matplotlib.image.imread(paths[0]).shape[:2] == (T, T)
    metrics = heatmap_metrics(layers)
    keys = [a for a in model.modules() if hasattr(a, "capture")]
    assert all(not a.capture and not a.captured for a in keys)       # capture switched off again
    assert metrics["eval/attn/rope_norm"] > 0 and 0 < metrics["eval/attn/entropy"] <= np.log(window)


def test_rope_norm_follows_the_key_scale_so_a_collapsed_qk_clip_would_show(tiny):
    spec, data, _ = tiny
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective).eval()
    idx = data.eval_batches(data.names[0], 64)[0].idx[:1]
    before = heatmap_metrics(capture_attention(model, idx))["eval/attn/rope_norm"]
    with torch.no_grad():
        for block in model.blocks:
            block.attn.k_proj.weight.mul_(0.5)
    after = heatmap_metrics(capture_attention(model, idx))["eval/attn/rope_norm"]
    assert after < before


def test_act_histogram_counts_the_halting_step_of_every_held_out_token(tiny):
    spec, data, _ = tiny
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective).eval()
    shares = lambda out: [out[f"valid/halt/share_step{t}"] for t in range(model.n_steps)]
    assert shares(evaluate(model, data, "cpu")) == [0.0, 0.0, 1.0]      # init bias -5: nobody halts early
    with torch.no_grad():
        model.trm.act.bias.fill_(5.0)                                    # everybody halts at once
    out = evaluate(model, data, "cpu")
    assert shares(out) == [1.0, 0.0, 0.0] and out["valid/halt/avg_steps"] == 1.0
    with torch.no_grad():                                                # a mixture: shares add up to 1
        model.trm.act.weight.normal_(0, 3.0)
        model.trm.act.bias.fill_(0.0)
    mixed = shares(evaluate(model, data, "cpu"))
    assert sum(mixed) == pytest.approx(1.0) and sum(v > 0 for v in mixed) >= 2


# ------------------------------------------------------------------------------------------ the suite
def test_suite_leaves_training_state_and_the_global_rng_untouched(tiny, tmp_path):
    spec, data, _ = tiny
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective).train()
    attn = [m for m in model.modules() if hasattr(m, "track_max_logit")]
    for m in attn:
        m.track_max_logit = True
    model(data.eval_batches(data.names[0])[0].idx)
    saved = [m.max_logit.clone() for m in attn]
    rng = torch.get_rng_state()
    suite = ProbeSuite(spec.probes, spec.model.attention.sw_window, data, spec.run.seed)
    with observing(model):
        first = suite.run(model, "cpu", 7, tmp_path)
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(m.track_max_logit and torch.equal(m.max_logit, s) for m, s in zip(attn, saved))
    with observing(model):
        again = suite.run(model, "cpu", 7, tmp_path)
    deterministic = lambda out: {k: v for k, v in out.items() if not k.startswith("perf/")}
    assert deterministic(again) == deterministic(first)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["source"] for s in samples] == data.names * 2 and samples[0] == samples[len(data.names)]
    assert not (tmp_path / "heatmaps").exists()                          # step 7 is not a heatmap step


@pytest.mark.parametrize("override,message", [
    ('probes.reasoning_sources=["nope"]', "names unknown sources ['nope']"),
    ("probes.long_range_seq_len=64", "must exceed model.attention.sw_window (64)"),
    ("probes.position_distances.0=1", "greater than or equal to 2"),
])
def test_bad_probe_settings_are_refused_with_the_key(override, message):
    from forge.errors import SpecError

    with pytest.raises(SpecError, match="probes") as err:
        load_spec(SPECS / "tiny.toml", ["probes.reasoning_items=4", override])
    assert message in str(err.value)
