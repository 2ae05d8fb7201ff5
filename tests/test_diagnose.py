"""The debugging tree on synthetic metric streams: every rule fires on its pathology, stays quiet on
a healthy run and on noisy streams just inside its thresholds; patches are recorded, never edits."""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from conftest import REPO, SPECS
from forge.diagnose.patch import build_patch, read_patch, write_patched_spec
from forge.diagnose.rules import diagnose, load_rules
from forge.diagnose.signals import compute, roughness, spikes, trend
from forge.errors import ForgeError
from forge.spec.load import load_spec

RULES = load_rules(REPO / "checklists" / "diagnose.toml")
TINY = load_spec(SPECS / "tiny.toml").spec.model_dump(mode="json")   # act warmup 50, t_max 3
STEPS = list(range(10, 310, 10))


def healthy(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i, step in enumerate(STEPS):
        loss = 6.0 * math.exp(-i / 25) + 2.0 + rng.gauss(0, 0.01)
        records.append({
            "step": step, "loss/total": loss, "loss/step_0": loss + 0.2, "loss/step_1": loss + 0.1,
            "loss/step_2": loss, "optim/grad_ema_ratio": 1.2 + rng.gauss(0, 0.02),
            "optim/ortho_error": 0.05, "act/avg_steps": 2.2 + rng.gauss(0, 0.05),
            "act/halt_prob_step0": 0.2, "act/ema_acc_step0": 0.30, "act/ema_acc_step1": 0.35,
            "act/ema_acc_step2": 0.40, "gate/entropy": 0.65, "gate/y_usage": 0.5,
            "optim/qk_clip_count": 0, "optim/qk_clip_fraction": 0.0, "attn/sink_count": 1.0,
            "perf/logging_fraction": 0.01, "perf/data_fraction": 0.05, "config/param_count": 600_000,
            "merge/fitness": 1.02, "optim/nonfinite_count": 0, "valid/perplexity": 30 - i * 0.5,
            "valid/reasoning_accuracy": 0.01 * i})
    return records


def fired(records, spec=TINY, status=None) -> list[str]:
    return [f.rule.id for f in diagnose(RULES, records, spec, status or {"status": "finished"})]


def with_(records, **series) -> list[dict]:
    """Replace metrics (name with / written as __) by per-step functions of the index."""
    out = []
    for i, r in enumerate(records):
        r = dict(r)
        for name, fn in series.items():
            r[name.replace("__", "/")] = fn(i)
        out.append(r)
    return out


def spec_with(**changes) -> dict:
    spec = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return spec


def test_signals():
    assert trend([10, 9, 8, 7, 6]) == pytest.approx(-0.5)
    assert roughness([1, 1, 1, 1]) == 0 and roughness([1, 3, 1, 3, 1, 3]) > 0.9
    assert spikes([1, 1.1, 0.9, 1, 1.05, 9, 1]) == 1 and spikes([1, 2, 3, 4, 5, 6]) == 0
    assert compute("mean", [(1, 1.0), (2, 3.0)], 3) is None                # not enough evidence
    assert compute("mean", [(1, 1.0), (2, 3.0), (3, 5.0)], 2) == (4.0, 2, 3)
    assert compute("improvement", [(i, 10 - i) for i in range(10)], 3)[0] == pytest.approx((9 - 2) / 9)


@pytest.mark.parametrize("seed", range(5))
def test_healthy_runs_produce_no_finding(seed):
    assert fired(healthy(seed)) == []


PATHOLOGIES = {
    "D1-grokfast-over-amplification": dict(
        records=lambda h: with_(h, optim__grad_ema_ratio=lambda i: 3.0)),
    "D2-newton-schulz-divergence": dict(records=lambda h: with_(h, optim__ortho_error=lambda i: 2.5)),
    "A2-data-quality-flat-loss": dict(records=lambda h: with_(h, loss__total=lambda i: 5.0 + 0.001 * (i % 3))),
    "C2-recursion-instability": dict(records=lambda h: with_(h, loss__step_2=lambda i: 9.0)),
    "C2-nonfinite-updates": dict(records=lambda h: with_(h, optim__nonfinite_count=lambda i: 0 if i < 20 else 3)),
    "B2-attention-instability": dict(records=lambda h: with_(h, loss__total=lambda i: 3.0 + (6 if i in (22, 26) else 0)
                                                             + 0.01 * (i % 2))),
    "C1-act-always-halting": dict(records=lambda h: with_(h, act__avg_steps=lambda i: 1.0,
                                                          act__halt_prob_step0=lambda i: 0.97)),
    "C1-act-never-halting": dict(records=lambda h: with_(h, act__avg_steps=lambda i: 3.0,
                                                         act__ema_acc_step0=lambda i: 0.6)),
    "C1-gate-saturation": dict(records=lambda h: with_(h, gate__entropy=lambda i: 0.05)),
    "D3-qk-clip-over-activation": dict(records=lambda h: with_(h, optim__qk_clip_fraction=lambda i: 0.9,
                                                               optim__qk_clip_count=lambda i: 11)),
    "E1-rotary-k-unprotected": dict(records=lambda h: with_(h, optim__qk_clip_count=lambda i: 2),
                                    spec=spec_with(optim__qk_clip__mlarope_shared_k_protected=False)),
    "E2-attention-sinks": dict(records=lambda h: with_(h, attn__sink_count=lambda i: 9.0)),
    "G2-optimizer-config-reuse": dict(records=lambda h: h, spec=spec_with(optim__kl_coefficient=0.5)),
    "B1-out-of-memory": dict(records=lambda h: h[:3],
                             status={"status": "failed", "error": "RuntimeError: CUDA out of memory. Tried ..."}),
    "B1-budget-overrun": dict(records=lambda h: with_(h, config__param_count=lambda i: 32_600_000)),
    "F1-logging-overhead": dict(records=lambda h: with_(h, perf__logging_fraction=lambda i: 0.08)),
    "F1-data-loader-bottleneck": dict(records=lambda h: with_(h, perf__data_fraction=lambda i: 0.5)),
    "G1-merge-incompatibility": dict(records=lambda h: with_(h, merge__fitness=lambda i: 0.4)),
    "A1-objective-mismatch": dict(records=lambda h: with_(h, valid__reasoning_accuracy=lambda i: 0.3 - 0.01 * i)),
    "F2-checkpoint-corruption": dict(records=lambda h: h + [{"step": 300, "run/invalid_checkpoints": 1}]),
}


def test_every_rule_has_a_pathology_test():
    assert sorted(PATHOLOGIES) == sorted(r.id for r in RULES)


@pytest.mark.parametrize("rule_id", sorted(PATHOLOGIES))
def test_rule_fires_on_its_pathology(rule_id):
    case = PATHOLOGIES[rule_id]
    ids = fired(case["records"](healthy()), case.get("spec", TINY), case.get("status"))
    assert rule_id in ids, ids


NEAR_MISSES = {
    # noisy streams just inside the thresholds: no finding
    "grad_ema_ratio around 1.4": lambda h: with_(h, optim__grad_ema_ratio=lambda i: 1.4 + 0.08 * (-1) ** i),
    "ortho_error just below 0.5": lambda h: with_(h, optim__ortho_error=lambda i: 0.46 + 0.03 * (i % 2)),
    "act steps 1.3 with noise": lambda h: with_(h, act__avg_steps=lambda i: 1.3 + 0.05 * (-1) ** i,
                                                act__halt_prob_step0=lambda i: 0.8),
    "gate entropy 0.35 with noise": lambda h: with_(h, gate__entropy=lambda i: 0.35 + 0.03 * (-1) ** i),
    "one loss spike only": lambda h: with_(h, loss__total=lambda i: h[i]["loss/total"] + (6 if i == 25 else 0)),
    "qk clip on 40% of heads": lambda h: with_(h, optim__qk_clip_fraction=lambda i: 0.4),
    "logging at 1.5%": lambda h: with_(h, perf__logging_fraction=lambda i: 0.015),
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_threshold_noise_does_not_fire(name):
    assert fired(NEAR_MISSES[name](healthy())) == []


def test_act_rules_wait_for_the_warmup():
    # before act.warmup_steps (50) nothing halts by design: a pathology there is not evidence
    early = [r for r in with_(healthy(), act__avg_steps=lambda i: 1.0, act__halt_prob_step0=lambda i: 0.97)
             if r["step"] < 50] + [r for r in healthy() if r["step"] >= 50]
    assert "C1-act-always-halting" not in fired(early)


def test_findings_rank_by_confidence_and_carry_evidence():
    records = with_(healthy(), optim__ortho_error=lambda i: 5.0, gate__entropy=lambda i: 0.28)
    findings = diagnose(RULES, records, TINY, {"status": "finished"})
    assert [f.rule.id for f in findings] == ["D2-newton-schulz-divergence", "C1-gate-saturation"]
    d2 = findings[0]
    assert d2.confidence > findings[1].confidence
    assert "optim/ortho_error mean 5 > 0.5 (steps 280-300)" == str(d2.evidence[0])
    assert [(c.key, c.before, c.after) for c in d2.suggestions[0].changes] == [("optim.muon.ns_steps", 3, 5)]


def test_remedy_already_in_the_spec_is_not_suggested():
    records = with_(healthy(), optim__ortho_error=lambda i: 2.5)
    finding = diagnose(RULES, records, spec_with(optim__muon__ns_steps=5), {"status": "finished"})[0]
    assert [s.rationale for s in finding.suggestions] == [
        "orthogonalise exactly with an SVD (slow, always orthogonal)"]


# --------------------------------------------------------------------------------------- patches

def _finding_for_tiny(tmp_path, overrides=()):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    shutil.copy(SPECS / "phase1.toml", spec_dir)
    shutil.copy(SPECS / "tiny.toml", spec_dir)
    resolved = load_spec(spec_dir / "tiny.toml", list(overrides))
    lineage = {"spec_file": str(spec_dir / "tiny.toml"), "spec_hash": resolved.hash, "overrides": list(overrides)}
    spec = resolved.spec.model_dump(mode="json")
    finding = diagnose(RULES, with_(healthy(), optim__grad_ema_ratio=lambda i: 3.0,
                                    loss__total=lambda i: 4 + (0.8 if i % 2 else -0.8)), spec, {"status": "finished"})[0]
    return spec_dir, finding, lineage


def test_patch_writes_a_new_spec_that_extends_the_original(tmp_path):
    spec_dir, finding, lineage = _finding_for_tiny(tmp_path, ["optim.grokfast.lam=2.0"])
    original = (spec_dir / "tiny.toml").read_text()
    patch = build_patch(finding, finding.suggestions[0], "run-1", lineage)
    assert patch["ops"] == [{"op": "test", "path": "/optim/grokfast/lam", "value": 2.0},
                            {"op": "replace", "path": "/optim/grokfast/lam", "value": 0.1}]
    written = write_patched_spec(patch)
    assert written.spec_path == spec_dir / "tiny.r1.toml" and written.path == spec_dir / "patches" / "tiny.r1.json"
    text = written.spec_path.read_text()
    assert 'extends = "tiny.toml"' in text and "rule D1-grokfast-over-amplification" in text and "run run-1" in text
    assert (spec_dir / "tiny.toml").read_text() == original            # the original is never modified
    r1 = load_spec(written.spec_path)
    assert r1.spec.optim.grokfast.lam == 0.1
    assert [p.name for p in r1.chain] == ["phase1.toml", "tiny.toml", "tiny.r1.toml"]
    assert read_patch(written.path)["output"] == str(written.spec_path)
    # a second patch of the patched spec continues the chain: r2 extends r1
    lineage2 = {"spec_file": str(written.spec_path), "spec_hash": r1.hash, "overrides": []}
    spec2 = r1.spec.model_dump(mode="json")
    d2 = diagnose(RULES, with_(healthy(), optim__ortho_error=lambda i: 2.5), spec2, {"status": "finished"})[0]
    second = write_patched_spec(build_patch(d2, d2.suggestions[0], "run-2", lineage2))
    assert second.spec_path.name == "tiny.r2.toml"
    chain = load_spec(second.spec_path)
    assert [p.name for p in chain.chain] == ["phase1.toml", "tiny.toml", "tiny.r1.toml", "tiny.r2.toml"]
    assert chain.spec.optim.muon.ns_steps == 5 and chain.spec.optim.grokfast.lam == 0.1


def test_patch_refuses_a_changed_spec(tmp_path):
    spec_dir, finding, lineage = _finding_for_tiny(tmp_path)
    patch = build_patch(finding, finding.suggestions[0], "run-1", lineage)
    tiny = spec_dir / "tiny.toml"
    tiny.write_text(tiny.read_text().replace("[run]", "[optim.grokfast]\nlam = 0.2\n\n[run]"))
    with pytest.raises(ForgeError, match="is now 0.2"):
        write_patched_spec(patch)
    assert not list(spec_dir.glob("tiny.r*.toml"))                      # nothing written
