"""The debugging tree on a test set of synthetic metric streams built from the design's tree: every
branch (at least two streams each), near-misses, healthy runs short and long, missing evidence.
diagnose must name the right failure mode first in >= 95% of the cases and never say "healthy"
without evidence."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from conftest import SPECS
from forge.diagnose.run import diagnose_records
from forge.metrics.jsonl import Stream
from forge.spec.load import load_spec

TINY = load_spec(SPECS / "tiny.toml").spec.model_dump(mode="json")   # act warmup 50, t_max 3, checklist tiny
FINISHED = {"status": "finished", "step": 300}


def healthy(n: int = 30, every: int = 10, seed: int = 0) -> list[dict]:
    """A healthy tiny-model run: every metric a rule or monitor of the tiny checklist reads."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        step = (i + 1) * every
        loss = 6.0 * math.exp(-i / (n / 1.2)) + 2.0 + rng.gauss(0, 0.01)
        out.append({
            "step": step, "loss/total": loss, "loss/step_0": loss + 0.2, "loss/step_1": loss + 0.1,
            "loss/step_2": loss, "optim/grad_ema_ratio": 1.2 + rng.gauss(0, 0.02), "optim/ortho_error": 0.14,
            "act/avg_steps": 2.2 + rng.gauss(0, 0.05), "act/halt_prob_step0": 0.2, "act/ema_acc_step0": 0.30,
            "act/ema_acc_step1": 0.35, "act/ema_acc_step2": 0.40, "gate/entropy": 0.65, "gate/y_usage": 0.5,
            "gate/m_usage": 0.5, "grad/norm_z": 0.003 + rng.gauss(0, 1e-4), "optim/qk_clip_heads": 0,
            "optim/qk_clip_total": 0, "optim/qk_clip_fraction": 0.0, "attn/sink_count": 1.0,
            "perf/logging_fraction": 0.01, "perf/data_fraction": 0.05, "perf/mfu": 0.2,
            "perf/tokens_per_sec": 3000 + rng.gauss(0, 50), "perf/checkpoint_fraction": 0.01,
            "perf/peak_memory_gb": 0.7, "config/param_count": 815_000, "data/seq_len": 128,
            "attn/rope_norm": 1.3 + 0.01 * i, "optim/nonfinite_count": 0,
            "run/invalid_checkpoints": 0, "valid/perplexity": 300 - i * 5, "merge/fitness": 1.02,
            "memory/step_size": 0.5 + rng.gauss(0, 0.005)})
        if step % 50 == 0:   # the evaluation's contribution probes (every train.eval_every = 50 steps)
            out[-1].update({"valid/bits_per_byte": 3.0 - 0.02 * i, "valid/memory_contribution_bpb": 0.05,
                            "valid/recursion_gain_bpb": 0.04, "valid/gate/token_spread": 0.12,
                            "valid/gate/decided_share": 0.08})
    return out


def probes(records, **series) -> list[dict]:
    """with_, on the records that carry the evaluation's probes only."""
    out = []
    for i, r in enumerate(records):
        r = dict(r)
        if "valid/bits_per_byte" in r:
            for name, fn in series.items():
                r[name.replace("__", "/")] = fn(i)
        out.append(r)
    return out


def with_(records, **series) -> list[dict]:
    """Replace metrics (written with __ for /) by functions of the index i (and the record)."""
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


def run(records, spec=TINY, status=FINISHED):
    return diagnose_records(Stream(Path("metrics.jsonl"), records), spec, status, "tiny", "test")


H = healthy()
LONG = healthy(n=300, every=100)
CASES: dict[str, tuple] = {
    # --- loss not decreasing
    "A2 flat loss": (with_(H, loss__total=lambda i: 5.0 + 0.001 * (i % 3)), "A2-data-quality-flat-loss"),
    "A2 flat noisy loss": (with_(H, loss__total=lambda i: 5.0 + 0.05 * (-1) ** i), "A2-data-quality-flat-loss"),
    "A2 valid diverging": (with_(H, valid__perplexity=lambda i: 100 + 8 * i), "A2-valid-diverging"),
    "A2 valid diverging late": (with_(H, valid__perplexity=lambda i: 300 - 5 * i if i < 20 else 200 + 10 * i),
                                "A2-valid-diverging"),
    "D1 ratio 3": (with_(H, optim__grad_ema_ratio=lambda i: 3.0), "D1-grokfast-over-amplification"),
    "D1 ratio 1.8": (with_(H, optim__grad_ema_ratio=lambda i: 1.8 + 0.05 * (-1) ** i), "D1-grokfast-over-amplification"),
    "D1 oscillation": (with_(H, loss__total=lambda i: H[i]["loss/total"] if i < 18 else 3.0 + 0.8 * (-1) ** i),
                       "D1-loss-oscillation"),
    "D1 oscillation wide": (with_(H, loss__total=lambda i: H[i]["loss/total"] if i < 15 else 3.5 + 1.2 * (-1) ** i),
                            "D1-loss-oscillation"),
    "D2 ortho 0.25": (with_(H, optim__ortho_error=lambda i: 0.25), "D2-newton-schulz-divergence"),
    "D2 ortho 0.8": (with_(H, optim__ortho_error=lambda i: 0.8), "D2-newton-schulz-divergence"),
    "C2 last step worse": (with_(H, loss__step_2=lambda i: H[i]["loss/step_0"] * 1.1), "C2-recursion-instability"),
    "C2 last step much worse": (with_(H, loss__step_2=lambda i: 9.0), "C2-recursion-instability"),
    "C2 z gradient explodes": (with_(H, grad__norm_z=lambda i: 0.003 * 1.3 ** i), "C2-state-gradient-explosion"),
    "C2 z gradient explodes late": (with_(H, grad__norm_z=lambda i: 0.003 if i < 20 else 0.5), "C2-state-gradient-explosion"),
    "C2 no recursion gain": (with_(H, loss__step_0=lambda i: H[i]["loss/total"], loss__step_1=lambda i: H[i]["loss/total"]),
                             "C2-no-recursion-gain"),
    "C2 no gain, slightly": (with_(H, loss__step_0=lambda i: H[i]["loss/total"] * 1.002,
                                   loss__step_1=lambda i: H[i]["loss/total"] * 1.001), "C2-no-recursion-gain"),
    "C2 NaN now": (with_(H, optim__nonfinite_count=lambda i: 0 if i < 27 else 3 * (i - 26)), "C2-nonfinite-updates"),
    "C2 NaN steady": (with_(H, optim__nonfinite_count=lambda i: i), "C2-nonfinite-updates"),
    "A1 reasoning flat": (with_(H, valid__perplexity=lambda i: 40 - 0.7 * i, valid__reasoning_accuracy=lambda i: 0.05),
                          spec_with(probes__reasoning_items=32), FINISHED, "A1-objective-mismatch"),
    "A1 reasoning falls": (with_(H, valid__perplexity=lambda i: 40 - 0.8 * i,
                                 valid__reasoning_accuracy=lambda i: 0.2 - 0.002 * i),
                           spec_with(probes__reasoning_items=32), FINISHED, "A1-objective-mismatch"),
    "near: A1 early run, reasoning 0": (with_(H, valid__reasoning_accuracy=lambda i: 0.0),
                                        spec_with(probes__reasoning_items=32), FINISHED, "healthy"),
    "B2 loss spikes": (with_(H, loss__total=lambda i: H[i]["loss/total"] + (6 if i in (22, 26) else 0)),
                       "B2-attention-instability"),
    "B2 three spikes": (with_(H, loss__total=lambda i: H[i]["loss/total"] + (4 if i in (12, 20, 27) else 0)),
                        "B2-attention-instability"),
    # --- ACT
    "C1 always halts": (with_(H, act__avg_steps=lambda i: 1.0, act__halt_prob_step0=lambda i: 0.97), "C1-act-always-halting"),
    "C1 nearly always halts": (with_(H, act__avg_steps=lambda i: 1.1), "C1-act-always-halting"),
    "C1 never halts": (with_(H, act__avg_steps=lambda i: 3.0), "C1-act-never-halting"),
    "C1 never halts, low acc": (with_(H, act__avg_steps=lambda i: 3.0, act__ema_acc_step0=lambda i: 0.05),
                                "C1-act-never-halting"),
    # --- gate
    "C1 gate saturated": (with_(H, gate__entropy=lambda i: 0.05), "C1-gate-saturation"),
    "C1 gate entropy 0.2": (with_(H, gate__entropy=lambda i: 0.2), "C1-gate-saturation"),
    "C1 y usage 0.95": (with_(H, gate__y_usage=lambda i: 0.95, gate__m_usage=lambda i: 0.15, gate__entropy=lambda i: 0.45),
                        "C1-gate-attention-dominant"),
    "C1 y usage 0.92": (with_(H, gate__y_usage=lambda i: 0.92, gate__m_usage=lambda i: 0.12, gate__entropy=lambda i: 0.45),
                        "C1-gate-attention-dominant"),
    "C1 m collapsed": (with_(H, gate__m_usage=lambda i: 0.05, gate__y_usage=lambda i: 0.6), "C1-gate-memory-collapse"),
    "C1 m 0.08": (with_(H, gate__m_usage=lambda i: 0.08, gate__y_usage=lambda i: 0.65), "C1-gate-memory-collapse"),
    "C1 m fading to 0.15": (with_(H, gate__m_usage=lambda i: 0.5 - 0.35 * i / 29), "C1-gate-memory-fading"),
    "C1 m fading to 0.17": (with_(H, gate__m_usage=lambda i: 0.45 - 0.28 * i / 29), "C1-gate-memory-fading"),
    # --- a part that earns nothing (contribution probes)
    "C1 memory unused": (probes(H, valid__memory_contribution_bpb=lambda i: 0.001), "C1-memory-unused"),
    "C1 memory hurts": (probes(H, valid__memory_contribution_bpb=lambda i: -0.02), "C1-memory-unused"),
    "C1 memory write collapses, gate undecided": (
        probes(with_(H, memory__step_size=lambda i: 0.5 * 0.9 ** i), valid__gate__token_spread=lambda i: 0.004,
               valid__gate__decided_share=lambda i: 0.0), "C1-memory-write-collapse"),
    "C1 memory write 0.5 -> 0.086, gate undecided": (
        probes(with_(H, memory__step_size=lambda i: 0.5 - 0.414 * i / 29), valid__gate__token_spread=lambda i: 0.01),
        "C1-memory-write-collapse"),
    "C2 recursion wasted": (probes(H, valid__recursion_gain_bpb=lambda i: 0.0005), "C2-recursion-wasted"),
    "C2 recursion hurts held-out": (probes(H, valid__recursion_gain_bpb=lambda i: -0.01), "C2-recursion-wasted"),
    "near: memory unused early, used at the end": (
        probes(H, valid__memory_contribution_bpb=lambda i: 0.001 if i < 25 else 0.03), "healthy"),
    "near: memory write falls, gate decides": (with_(H, memory__step_size=lambda i: 0.5 * 0.9 ** i), "healthy"),
    "near: gate undecided, memory writes": (probes(H, valid__gate__token_spread=lambda i: 0.004), "healthy"),
    "no contribution probes": ([{k: v for k, v in r.items() if not k.startswith(("valid/memory", "valid/rec"))}
                                for r in H], "undecidable"),
    # --- out of memory
    "B1 CUDA OOM": (H[:3], TINY, {"status": "failed", "error": "RuntimeError: CUDA out of memory. Tried to allocate"},
                    "B1-out-of-memory"),
    "B1 OOM at start": ([], TINY, {"status": "failed", "error": "torch.OutOfMemoryError: CUDA out of memory"},
                        "B1-out-of-memory"),
    "B1 OOM after the seq_len stage": (with_(H, data__seq_len=lambda i: 128 if i < 28 else 256), TINY,
                                       {"status": "failed", "error": "torch.OutOfMemoryError: CUDA out of memory"},
                                       "B1-curriculum-out-of-memory"),
    "B1 OOM at the new seq_len": (with_(H[:15], data__seq_len=lambda i: 64 if i < 14 else 128), TINY,
                                  {"status": "failed", "error": "RuntimeError: out of memory"},
                                  "B1-curriculum-out-of-memory"),
    "B1 leak": (with_(H, perf__peak_memory_gb=lambda i: 0.7 + 0.1 * i), "B1-memory-leak"),
    "B1 late leak": (with_(H, perf__peak_memory_gb=lambda i: 0.7 if i < 15 else 0.7 + 0.2 * (i - 14)), "B1-memory-leak"),
    "B1 budget 32.6M": (with_(H, config__param_count=lambda i: 32_600_000), "B1-budget-overrun"),
    "B1 budget 27M": (with_(H, config__param_count=lambda i: 27_000_000), "B1-budget-overrun"),
    "B1 peak 7 GB": (with_(H, perf__peak_memory_gb=lambda i: 7.0), "B1-peak-memory-high"),
    "B1 peak 9 GB": (with_(H, perf__peak_memory_gb=lambda i: 9.0), "B1-peak-memory-high"),
    # --- training too slow
    "F1 logging 8%": (with_(H, perf__logging_fraction=lambda i: 0.08), "F1-logging-overhead"),
    "F1 logging 4% noisy": (with_(H, perf__logging_fraction=lambda i: 0.04 + 0.01 * (-1) ** i), "F1-logging-overhead"),
    "F1 data loader": (with_(H, perf__data_fraction=lambda i: 0.5), "F1-data-loader-bottleneck"),
    "F1 data loader 30%": (with_(H, perf__data_fraction=lambda i: 0.3), "F1-data-loader-bottleneck"),
    "F1 low MFU": (with_(H, perf__mfu=lambda i: 0.001), "F1-low-utilisation"),
    "F1 MFU 0.3%": (with_(H, perf__mfu=lambda i: 0.003), "F1-low-utilisation"),
    "F1 slow GPU": (with_(H, perf__tokens_per_sec=lambda i: 1200), spec_with(train__device="cuda"), FINISHED,
                    "F1-slow-gpu-throughput"),
    "F1 GPU 4000 tok/s": (with_(H, perf__tokens_per_sec=lambda i: 4000), spec_with(train__device="cuda"), FINISHED,
                          "F1-slow-gpu-throughput"),
    "F1 bf16 emulated (AVX2)": (with_(H, run__precision_slowdown=lambda i: 200.0), spec_with(train__precision="bf16"),
                                FINISHED, "F1-bf16-emulated"),
    "F1 bf16 3x slower": (with_(H, run__precision_slowdown=lambda i: 3.0), spec_with(train__precision="bf16"),
                          FINISHED, "F1-bf16-emulated"),
    "F1 bf16 native: near-miss": (with_(H, run__precision_slowdown=lambda i: 0.25), spec_with(train__precision="bf16"),
                                  FINISHED, "healthy"),
    "F2 checkpoint blocking": (with_(H, perf__checkpoint_fraction=lambda i: 0.3), "F2-checkpoint-blocking"),
    "F2 checkpoint 15%": (with_(H, perf__checkpoint_fraction=lambda i: 0.15), "F2-checkpoint-blocking"),
    # --- instability
    "D3 qk over-activation": (with_(H, optim__qk_clip_total=lambda i: 80 * (i + 1), optim__qk_clip_heads=lambda i: 8),
                              "D3-qk-clip-over-activation"),
    "D3 qk 600/100 steps": (with_(H, optim__qk_clip_total=lambda i: 60 * (i + 1), optim__qk_clip_heads=lambda i: 6),
                            "D3-qk-clip-over-activation"),
    "E1 rotary k clipped": (with_(H, optim__qk_clip_heads=lambda i: 2, optim__qk_clip_total=lambda i: 2 * (i + 1)),
                            spec_with(optim__qk_clip__mlarope_shared_k_protected=False), FINISHED, "E1-rotary-k-unprotected"),
    "E1 rotary k, one head": (with_(H, optim__qk_clip_heads=lambda i: 1, optim__qk_clip_total=lambda i: i + 1),
                              spec_with(optim__qk_clip__mlarope_shared_k_protected=False), FINISHED, "E1-rotary-k-unprotected"),
    "E1 rope norm collapses": (with_(H, attn__rope_norm=lambda i: 1.5 * 0.9 ** i), spec_with(
        optim__qk_clip__mlarope_shared_k_protected=False), FINISHED, "E1-rotary-norm-collapse"),
    "E1 rope norm falls late": (with_(H, attn__rope_norm=lambda i: 1.5 if i < 15 else 0.4), "E1-rotary-norm-collapse"),
    "E2 sinks": (with_(H, attn__sink_count=lambda i: 9.0), "E2-attention-sinks"),
    "E2 sinks 6": (with_(H, attn__sink_count=lambda i: 6.0), "E2-attention-sinks"),
    "G2 config reuse": (H, spec_with(optim__kl_coefficient=0.5), FINISHED, "G2-optimizer-config-reuse"),
    "G1 merge 0.4": (with_(H, merge__fitness=lambda i: 0.4), "G1-merge-incompatibility"),
    "G1 merge 0.7": (with_(H, merge__fitness=lambda i: 0.7), "G1-merge-incompatibility"),
    "F2 corrupt checkpoints": (with_(H, run__invalid_checkpoints=lambda i: 1), "F2-checkpoint-corruption"),
    "F2 two corrupt": (with_(H, run__invalid_checkpoints=lambda i: 2), "F2-checkpoint-corruption"),
    # --- the run itself
    "failed, other error": (H[:12], TINY, {"status": "failed", "error": "ValueError: bad batch"}, "RUN-failed"),
    "failed at once": ([], TINY, {"status": "failed", "error": "FileNotFoundError: data"}, "RUN-failed"),
    "dead run marked running": (H[:20], TINY, {"status": "stale", "recorded": "running"}, "RUN-stale"),
    "interrupted": (H[:20], TINY, {"status": "interrupted", "step": 200}, "RUN-interrupted"),
    "interrupted early": (H[:4], TINY, {"status": "interrupted", "step": 40}, "RUN-interrupted"),
    # --- near-misses, healthy, missing evidence
    "healthy": (H, "healthy"),
    "healthy, other seed": (healthy(seed=3), "healthy"),
    "healthy long": (LONG, "healthy"),
    "near: grad_ema_ratio 1.45": (with_(H, optim__grad_ema_ratio=lambda i: 1.45 + 0.03 * (-1) ** i), "healthy"),
    "near: ortho 0.18": (with_(H, optim__ortho_error=lambda i: 0.18 + 0.01 * (-1) ** i), "healthy"),
    "near: one spike that recovered": (with_(H, loss__total=lambda i: H[i]["loss/total"] + (6 if i == 8 else 0)), "healthy"),
    "near: early NaN burst": (with_(H, optim__nonfinite_count=lambda i: 0 if i < 3 else 4), "healthy"),
    "near: one slow logging reading": (with_(H, perf__logging_fraction=lambda i: 0.09 if i == 28 else 0.01), "healthy"),
    "near: m usage 0.25": (with_(H, gate__m_usage=lambda i: 0.25, gate__y_usage=lambda i: 0.68), "healthy"),
    "near: memory +30%": (with_(H, perf__peak_memory_gb=lambda i: 0.7 + 0.21 * i / 29), "healthy"),
    "near: last step 1% worse": (with_(H, loss__step_2=lambda i: H[i]["loss/total"] * 1.01,
                                       loss__step_0=lambda i: H[i]["loss/total"], loss__step_1=lambda i: H[i]["loss/total"]),
                                 "C2-no-recursion-gain"),
    "short: 3 logged steps": (H[:3], "undecidable"),
    "empty metrics": ([], "undecidable"),
    "running, too early": (H[:4], TINY, {"status": "running"}, "undecidable"),
    "no gate metrics": ([{k: v for k, v in r.items() if not k.startswith("gate/")} for r in H], "undecidable"),
    "no ACT after warmup": ([{k: v for k, v in r.items() if not k.startswith("act/avg")} for r in H], "undecidable"),
}


def _case(name):
    case = CASES[name]
    if len(case) == 2:
        return case[0], TINY, FINISHED, case[1]
    return case


def _named(result, expected: str) -> bool:
    if expected in ("healthy", "undecidable"):
        return result.verdict == expected
    return bool(result.findings) and result.findings[0].rule.id == expected


def test_the_tree_names_the_right_failure_mode_first():
    wrong = []
    for name in CASES:
        records, spec, status, expected = _case(name)
        result = run(records, spec, status)
        if not _named(result, expected):
            wrong.append((name, expected, result.verdict, [(f.rule.id, f.confidence) for f in result.findings][:3]))
    assert len(CASES) >= 70
    assert 1 - len(wrong) / len(CASES) >= 0.95, wrong


@pytest.mark.parametrize("name", [n for n in CASES if _case(n)[3] != "healthy"])
def test_never_healthy_without_evidence_or_with_a_pathology(name):
    records, spec, status, _ = _case(name)
    assert run(records, spec, status).verdict != "healthy"


def test_every_tree_rule_has_streams():
    from forge.checklist.items import checklist_dir
    from forge.diagnose.rules import load_rules

    rules = {r.id for r in load_rules(checklist_dir() / "diagnose.toml")}
    covered = [_case(n)[3] for n in CASES]
    missing = sorted(r for r in rules if covered.count(r) < 2 and r != "G2-optimizer-config-reuse"
                     and r != "RUN-stale")
    assert not missing, missing


def test_recovered_spike_and_counter_are_reported_as_such():
    result = run(with_(H, optim__nonfinite_count=lambda i: 0 if i < 3 else 4))
    nonfinite = next(v for v in result.verdicts if v.rule.id == "C2-nonfinite-updates")
    assert nonfinite.state == "clear" and nonfinite.recovered == "fired at steps 50-80, clear since"


def test_undecidable_says_why():
    result = run(H[:3])
    reasons = {v.rule.id: v.reason for v in result.undecided}
    assert "loss/total: 3 logged point(s), the signal needs 10" in reasons["A2-data-quality-flat-loss"]
    assert result.exit_code == 3
