"""The contribution probes of every evaluation (forge/train/evaluate.py) on real tiny models: what the memory
(gate forced to the attention path) and the recursion (step 0 against the last step) earn in held-out
bits/byte, and how the MAG gate discriminates; absent where the part does not exist."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SPECS
from forge.model import build_model
from forge.model.gate import GateStats, attention_only, observe
from forge.spec.load import load_spec
from forge.train.evaluate import evaluate

PROBES = ("valid/memory_contribution_bpb", "valid/recursion_gain_bpb", "valid/gate/")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny spec's real tokenizer and held-out data (built-in corpus, one batch per source)."""
    from forge.data import build_data

    cache = tmp_path_factory.getbasetemp() / "forge-cache"
    spec = load_spec(SPECS / "tiny.toml", ["data.eval.max_batches=1"]).spec
    data = build_data(spec.data, vocab_size=spec.model.vocab_size, seed=spec.run.seed, cache_dir=cache)
    return spec, data


def _model(spec, *overrides):
    if overrides:
        spec = load_spec(SPECS / "tiny.toml", ["data.eval.max_batches=1", *overrides]).spec
    torch.manual_seed(0)
    return build_model(spec.model, spec.objective).eval()


@torch.no_grad()
def _bpb_by_forward(model, data, step: int | None = None) -> dict[str, float]:
    """Held-out bits/byte per source through the model's forward (step None) or of one outer step's logits
    (model.step_logits): the evaluation's figures, recomputed another way."""
    out = {}
    for name in data.names:
        nats, n_bytes = 0.0, 0
        for batch in data.eval_batches(name):
            if step is None:
                logits = model(batch.idx, batch.targets, return_logits=True).logits
            else:
                logits = model.step_logits(batch.idx)[step]
            ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
            nats += float(ce[batch.target_bytes.flatten() > 0].sum())
            n_bytes += batch.n_bytes
        out[name] = nats / (math.log(2) * n_bytes)
    return out


def test_memory_contribution_is_the_bpb_without_the_memory_path_minus_with_it(tiny):
    spec, data = tiny
    model = _model(spec)
    with torch.no_grad():                  # a memory path that matters: scale its read-out up
        model.memory.o_proj.weight.mul_(30.0)
    out = evaluate(model, data, "cpu")
    full = _bpb_by_forward(model, data)
    with attention_only(model.gate):
        ablated = _bpb_by_forward(model, data)
    for name in data.names:
        assert out[f"valid/{name}/bits_per_byte"] == pytest.approx(full[name], rel=1e-5)
        assert out[f"valid/memory_contribution_bpb/{name}"] == pytest.approx(ablated[name] - full[name], abs=1e-5)
    assert out["valid/memory_contribution_bpb"] != 0.0
    assert not model.gate.force_attention and model.gate.stats is None   # the switches are reset


def test_a_model_whose_gate_is_forced_to_attention_gets_contribution_exactly_zero(tiny):
    spec, data = tiny
    model = _model(spec)
    model.gate.force_attention = True
    out = evaluate(model, data, "cpu")
    assert out["valid/memory_contribution_bpb"] == 0.0
    assert all(out[f"valid/memory_contribution_bpb/{n}"] == 0.0 for n in data.names)
    # g = 1 everywhere: decided, and the same for every token and channel
    assert out["valid/gate/decided_share"] == 1.0
    assert out["valid/gate/token_spread"] == 0.0 and out["valid/gate/channel_spread"] == 0.0


def test_recursion_gain_is_step_zero_minus_the_last_step(tiny):
    spec, data = tiny
    model = _model(spec)
    out = evaluate(model, data, "cpu")
    first, last = _bpb_by_forward(model, data, 0), _bpb_by_forward(model, data, model.n_steps - 1)
    for name in data.names:
        assert out[f"valid/recursion_gain_bpb/{name}"] == pytest.approx(first[name] - last[name], abs=1e-5)
    assert out["valid/avg_steps"] == model.n_steps


def test_parts_that_do_not_exist_log_no_probe(tiny):
    spec, data = tiny
    plain = evaluate(_model(spec, "model.memory.enabled=false", "model.trm.enabled=false"), data, "cpu")
    assert not [k for k in plain if k.startswith(PROBES)], plain
    assert "valid/bits_per_byte" in plain
    no_trm = evaluate(_model(spec, "model.trm.enabled=false"), data, "cpu")
    assert not [k for k in no_trm if k.startswith("valid/recursion_gain_bpb")]
    assert "valid/memory_contribution_bpb" in no_trm and "valid/gate/token_spread" in no_trm
    no_memory = evaluate(_model(spec, "model.memory.enabled=false"), data, "cpu")
    assert not [k for k in no_memory if k.startswith(("valid/memory_contribution_bpb", "valid/gate/"))]
    assert "valid/recursion_gain_bpb" in no_memory


def test_an_undecided_gate_reads_as_undecided(tiny):
    spec, data = tiny
    out = evaluate(_model(spec), data, "cpu")          # at initialisation g = sigmoid(~0) ~ 0.5
    assert out["valid/gate/decided_share"] == 0.0
    assert out["valid/gate/token_spread"] < 0.02       # below the criterion's 0.05 and the rule's 0.05


def test_gate_stats_tell_undecided_static_and_token_dependent_gates_apart():
    def stats(*gs):
        s = GateStats()
        for g in gs:
            s.add(g)
        return s.summary()

    assert GateStats().summary() == {}
    undecided = stats(torch.full((2, 16, 8), 0.5), torch.full((1, 16, 8), 0.5))
    assert undecided == {"token_spread": 0.0, "channel_spread": 0.0, "decided_share": 0.0}
    static = stats(torch.tensor([0.05, 0.95]).expand(3, 10, 2))     # one channel per path, for every token
    assert static["token_spread"] == 0.0 and static["channel_spread"] == pytest.approx(0.45)
    assert static["decided_share"] == 1.0
    per_token = torch.tensor([0.2, 0.8]).repeat(5)[None, :, None].expand(1, 10, 4)   # alternates with the token
    chosen = stats(per_token)
    assert chosen["token_spread"] == pytest.approx(0.3) and chosen["channel_spread"] == pytest.approx(0.0, abs=1e-9)
    assert chosen["decided_share"] == 0.0
    # pooled over batches: the same as one batch holding both
    a, b = torch.rand(2, 7, 3), torch.rand(1, 5, 3)
    pooled = stats(a, b)
    whole = stats(torch.cat([a.flatten(0, 1), b.flatten(0, 1)])[None])
    assert pooled == pytest.approx(whole)


def test_observe_sees_every_gate_value_of_a_forward(tiny):
    spec, data = tiny
    model = _model(spec)
    idx = data.eval_batches(data.names[0])[0].idx
    with torch.no_grad(), observe(model.gate) as seen:
        model(idx)
    assert seen.rows == idx.numel() and seen.values == idx.numel() * spec.model.d_model
    assert model.gate.stats is None


def test_catalogue_and_report_name_the_probes_per_source():
    from forge.metrics.catalogue import load_catalogue
    from forge.report.criteria import RunRecord
    from forge.report.probes import probe_rows

    catalogue = load_catalogue()
    for name in ("valid/memory_contribution_bpb", "valid/recursion_gain_bpb"):
        assert catalogue.entry(f"{name}/tinystories").name == f"{name}/{{source}}"   # not valid/{source}/{stat}
    record = {"step": 50, "valid/memory_contribution_bpb": 0.01, "valid/memory_contribution_bpb/tinystories": 0.02,
              "valid/recursion_gain_bpb": 0.03, "valid/gate/token_spread": 0.1}
    rows = {m: (why, values) for m, why, values in probe_rows(RunRecord(None, [record], {}, {}, {}, []))}
    assert rows["valid/memory_contribution_bpb/tinystories"] == ("C1 memory, tinystories", [0.02])
    assert rows["valid/recursion_gain_bpb"][1] == [0.03] and "valid/gate/decided_share" not in rows


def test_halting_compute_at_evaluation_follows_the_share_halted_early(tiny):
    """valid/halt/compute_share is the refiner work run under halting: 1 when nothing halts early, below 1 with
    act.freeze_halted when tokens halt at step 0 (the halting head's bias forced up), and, as the share halted
    early approaches 1, close to the minimum 1 / t_max; absent without TRM."""
    spec, data = tiny
    model = _model(spec, "model.act.freeze_halted=true")
    nothing = evaluate(model, data, torch.device("cpu"))
    assert nothing["valid/halt/halted_early_share"] == 0.0 and nothing["valid/halt/compute_share"] == 1.0
    with torch.no_grad():
        model.trm.act.bias.fill_(0.0)
        model.trm.act.weight.normal_(0.0, 1.0)          # some tokens confident, some not
    some = evaluate(model, data, torch.device("cpu"))
    early, compute = some["valid/halt/halted_early_share"], some["valid/halt/compute_share"]
    assert 0.0 < early < 1.0 and compute < 1.0
    t_max = model.n_steps
    assert compute >= 1.0 - early * (t_max - 1) / t_max - 1e-9      # never below what the halts allow
    no_trm = evaluate(_model(spec, "model.trm.enabled=false"), data, torch.device("cpu"))
    assert "valid/halt/compute_share" not in no_trm and "valid/halt/halted_early_share" not in no_trm
