"""forge diagnose's machinery: signals, robust reading, the metric catalogue, verdicts and exit codes,
patches (recorded, never edits; relative paths; no duplicates; the top finding or the chosen one)."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import REPO, SPECS
from forge.diagnose.patch import apply_finding, build_patch, read_patch, write_patched_spec
from forge.diagnose.rules import load_rules
from forge.errors import ForgeError, SpecError
from forge.metrics.catalogue import load_catalogue
from forge.metrics.jsonl import read_metric_stream
from forge.metrics.signals import compute, roughness, spikes, trend
from forge.spec.load import load_spec
from forge.spec.render import resolved_toml
from test_diagnose_tree import H, TINY, run, with_

RULES = load_rules(REPO / "checklists" / "diagnose.toml")


def test_signals():
    assert trend([10, 9, 8, 7, 6]) == pytest.approx(-0.5)
    assert roughness([1, 1, 1, 1]) == 0 and roughness([1, 3, 1, 3, 1, 3]) > 0.9
    assert spikes([1, 1.1, 0.9, 1, 1.05, 9, 1]) == 1 and spikes([1, 2, 3, 4, 5, 6]) == 0
    assert spikes([10 - 0.3 * i + (5 if i == 12 else 0) for i in range(20)]) == 1   # a spike on a falling loss
    assert compute("mean", [(1, 1.0), (2, 3.0)], 3) is None                # not enough evidence
    assert compute("mean", [(1, 1.0), (2, 3.0), (3, 5.0)], 2) == (4.0, 2, 3)
    assert compute("improvement", [(i, 10 - i) for i in range(10)], 3)[0] == pytest.approx((9 - 2) / 9)


# ------------------------------------------------------------------------------------ reading

def test_malformed_lines_anywhere_are_skipped_and_counted(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n\nnot json\n[1, 2]\n{"a": 2.0}\n{"step": "3", "a": 1}\n'
                    '{"step": 4, "a": "high", "b": 2.0}\n{"step": 5, "a": 5.0}\n{"step": 6, "a"')
    stream = read_metric_stream(path)
    assert stream.records == [{"step": 1, "a": 1.0}, {"step": 4, "b": 2.0}, {"step": 5, "a": 5.0}]
    assert [n for n, _ in stream.skipped] == [2, 3, 4, 5, 6, 7, 9]
    assert "torn last line" in stream.skipped[-1][1] and "'high' is not a number" in stream.skipped[5][1]


def test_report_and_runs_read_past_a_bad_line(run_cli, tmp_path):
    from forge.train.runs import list_runs

    d = tmp_path / "runs" / "r1"
    d.mkdir(parents=True)
    (d / "status.json").write_text('{"status": "finished", "step": 20}')
    (d / "metrics.jsonl").write_text('{"step": 10, "loss/total": 5.0}\nbad\n{"step": 20, "loss/total": 4.0}\n')
    assert list_runs(tmp_path / "runs")[0]["loss"] == 4.0


# ---------------------------------------------------------------------------------- catalogue

def test_every_metric_a_rule_monitor_criterion_or_plot_names_is_catalogued():
    from forge.report.criteria import PLOTS, RunRecord, load_criteria
    from forge.train.monitors import load_monitors

    cat = load_catalogue()
    for name in ("phase1", "tiny"):
        assert load_monitors(name) and load_criteria(name)
    rec = RunRecord(None, [{"step": 1, "loss/step_0": 1.0, "optim/lr_muon": 1.0, "eval/position_accuracy/d10": 1.0}],
                    TINY, {}, {}, [])
    for _, metrics_of in PLOTS.values():
        for metric in metrics_of(rec):
            cat.check(metric, "forge/report/criteria.py")
    from forge.report.probes import PROBE_METRICS
    from forge.report.render import CURVES
    for metric in [m for m, _ in PROBE_METRICS] + list(CURVES):
        cat.check(metric, "forge/report")


def test_a_typo_in_a_rule_fails_at_load_with_file_and_line(tmp_path):
    text = (REPO / "checklists" / "diagnose.toml").read_text().replace('metric = "gate/entropy"',
                                                                       'metric = "gate/entropi"', 1)
    path = tmp_path / "diagnose.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_rules(path)
    line = next(n for n, l in enumerate(text.splitlines(), 1) if '"C1-gate-saturation"' in l)
    assert "gate/entropi" in str(err.value) and f"diagnose.toml:{line}" in str(err.value)


def test_design_names_are_aliases_never_other_meanings():
    cat = load_catalogue()
    names = {m.name for m in cat.metrics}
    for design, forge_name in cat.design_names().items():
        assert design not in names or cat.entry(design).design == design, design   # no forge name with another meaning
    assert cat.from_design({"train/loss": 3.0, "train/loss_step_2": 2.0, "optim/grad_ema_norm": 1.2}) == \
        {"loss/total": 3.0, "loss/step_2": 2.0, "optim/grad_ema_ratio": 1.2}
    assert cat.kind("optim/nonfinite_count") == "counter" and cat.entry("valid/halt/stdlib_code/perplexity")


def test_counters_read_as_increments_and_qk_clip_count_per_100_steps():
    from forge.metrics.engine import Records

    recs = Records([{"step": 100 * (i + 1), "optim/qk_clip_total": 50 * (i + 1), "optim/nonfinite_count": 3}
                    for i in range(4)], load_catalogue())
    assert recs.values("optim/qk_clip_count") == [50.0, 50.0, 50.0, 50.0]
    assert recs.values("optim/nonfinite_count") == [3, 0, 0, 0]


def test_plain_metrics_file_with_the_design_names(run_cli, tmp_path):
    path = tmp_path / "other.jsonl"
    rows = [{("train/loss" if k == "loss/total" else "optim/grad_ema_norm" if k == "optim/grad_ema_ratio" else k): v
             for k, v in r.items()} for r in with_(H, optim__grad_ema_ratio=lambda i: 3.0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run_cli("diagnose", str(path), "--spec", str(SPECS / "tiny.toml"), "--json")
    report = json.loads(out)
    assert code == 1 and report["findings"][0]["rule"] == "D1-grokfast-over-amplification"
    assert run_cli("diagnose", str(path), "--apply")[0] == 2


# ----------------------------------------------------------------------------------- verdicts

def _run_dir(tmp_path, records, status, warnings=()):
    d = tmp_path / "runs" / "r1"
    (d / "checkpoints").mkdir(parents=True)
    (d / "status.json").write_text(json.dumps(status))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "warnings.jsonl").write_text("".join(json.dumps(w) + "\n" for w in warnings))
    (d / "spec.toml").write_text(resolved_toml(load_spec(SPECS / "tiny.toml")))
    return d


@pytest.mark.parametrize("records,status,code,verdict", [
    ([], {"status": "finished"}, 3, "undecidable"),
    ("short", {"status": "finished"}, 3, "undecidable"),
    ("healthy", {"status": "running"}, 1, "unhealthy"),       # no process holds the lock: stale
    ("healthy", {"status": "failed", "error": "ValueError: x"}, 1, "unhealthy"),
    ("healthy", {"status": "finished"}, 0, "healthy"),
])
def test_exit_codes_and_run_status_as_evidence(run_cli, tmp_path, records, status, code, verdict):
    records = {"short": H[:3], "healthy": H}.get(records, records) if isinstance(records, str) else records
    _run_dir(tmp_path, records, status, warnings=[{"step": 30, "id": "C1-gate-entropy", "title": "t", "measured": "m"}])
    got, out, err = run_cli("diagnose", "r1", "--json", cwd=tmp_path)
    report = json.loads(out)
    assert (got, report["verdict"]) == (code, verdict), err
    assert report["warnings"][0]["id"] == "C1-gate-entropy"
    gate = next(r for r in report["rules"] if r["rule"] == "C1-gate-entropy")
    if verdict == "healthy":
        assert gate["recovered"] == "warned during training at step 30, clear since"


def test_live_lock_holder_is_not_stale(tmp_path):
    from forge.train.run_dir import RunDir

    run_dir = RunDir(_run_dir(tmp_path, H, {"status": "running"}))
    assert not run_dir.lock_held()
    run_dir.lock()
    try:
        assert run_dir.lock_held()
    finally:
        run_dir.unlock()


def test_severity_ranks_before_confidence():
    records = with_(H, perf__logging_fraction=lambda i: 0.5, act__avg_steps=lambda i: 1.15)
    top = run(records).findings
    assert [f.rule.id for f in top[:2]] == ["C1-act-always-halting", "F1-logging-overhead"]
    assert top[0].confidence < top[1].confidence


# ------------------------------------------------------------------------------------ patches

def _sick_run(tmp_path, records, overrides=()):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir(exist_ok=True)
    for name in ("phase1.toml", "tiny.toml"):
        shutil.copy(SPECS / name, spec_dir)
    resolved = load_spec(spec_dir / "tiny.toml", list(overrides))
    lineage = {"spec_file": str(spec_dir / "tiny.toml"), "spec_hash": resolved.hash, "overrides": list(overrides)}
    return spec_dir, run(records, resolved.spec.model_dump(mode="json")), lineage


def test_patch_writes_a_new_spec_that_extends_the_original(tmp_path):
    spec_dir, result, lineage = _sick_run(tmp_path, with_(H, optim__grad_ema_ratio=lambda i: 3.0),
                                          ["optim.grokfast.lam=2.0"])
    original = (spec_dir / "tiny.toml").read_text()
    finding = result.findings[0]
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
    record = json.loads(written.path.read_text())
    assert (record["base_spec"], record["output"], record["number"]) == ("tiny.toml", "tiny.r1.toml", 1)
    moved = tmp_path / "elsewhere"                                       # a record works from another checkout
    shutil.copytree(spec_dir, moved)
    assert read_patch(moved / "patches" / "tiny.r1.json")["base_spec"] == str(moved / "tiny.toml")
    # the same remedy again (the run diagnosed twice) is refused, not written as r2
    with pytest.raises(ForgeError, match="tiny.r1.json already made this change"):
        write_patched_spec(build_patch(finding, finding.suggestions[0], "run-1", lineage))
    # a second patch of the patched spec continues the chain: r2 extends r1
    lineage2 = {"spec_file": str(written.spec_path), "spec_hash": r1.hash, "overrides": []}
    d2 = run(with_(H, optim__ortho_error=lambda i: 2.5), r1.spec.model_dump(mode="json")).findings[0]
    second = write_patched_spec(build_patch(d2, d2.suggestions[0], "run-2", lineage2))
    assert second.spec_path.name == "tiny.r2.toml"
    chain = load_spec(second.spec_path)
    assert [p.name for p in chain.chain] == ["phase1.toml", "tiny.toml", "tiny.r1.toml", "tiny.r2.toml"]
    assert chain.spec.optim.muon.ns_steps == 5 and chain.spec.optim.grokfast.lam == 0.1


def test_patch_refuses_a_changed_spec(tmp_path):
    spec_dir, result, lineage = _sick_run(tmp_path, with_(H, optim__grad_ema_ratio=lambda i: 3.0))
    patch = build_patch(result.findings[0], result.findings[0].suggestions[0], "run-1", lineage)
    tiny = spec_dir / "tiny.toml"
    tiny.write_text(tiny.read_text().replace("[run]", "[optim.grokfast]\nlam = 0.2\n\n[run]"))
    with pytest.raises(ForgeError, match="is now 0.2"):
        write_patched_spec(patch)
    assert not list(spec_dir.glob("tiny.r*.toml"))                      # nothing written


def test_apply_takes_the_top_finding_or_the_chosen_one_never_silently_another(tmp_path):
    # top finding: C1-act-never-halting (critical, remedy); F2-checkpoint-corruption has no remedy
    spec_dir, result, lineage = _sick_run(tmp_path, with_(H, act__avg_steps=lambda i: 3.0,
                                                          perf__data_fraction=lambda i: 0.5))
    assert [f.rule.id for f in result.findings][:2] == ["C1-act-never-halting", "F1-data-loader-bottleneck"]
    with pytest.raises(ForgeError, match="F1-data-loader-bottleneck has no remedy as a spec change.*--finding"):
        apply_finding(result, "F1-data-loader-bottleneck", 1, "run-1", lineage)
    with pytest.raises(ForgeError, match="did not fire"):
        apply_finding(result, "C1-gate-saturation", 1, "run-1", lineage)
    written = apply_finding(result, None, 1, "run-1", lineage)
    assert load_spec(written.spec_path).spec.model.act.halt_thresh == 0.3


def test_a_remedy_already_in_the_spec_chain_is_refused(tmp_path):
    spec_dir, result, lineage = _sick_run(tmp_path, with_(H, act__avg_steps=lambda i: 3.0), ["model.act.halt_thresh=0.3"])
    top = result.findings[0]
    assert top.rule.id == "C1-act-never-halting" and not top.suggestions and top.applied
    with pytest.raises(ForgeError, match="already in the spec chain"):
        apply_finding(result, None, 1, "run-1", lineage)


def test_every_remedy_resolves_and_passes_the_checklist_items():
    """Each remedy applied to the spec it is meant for resolves, and the checklist's critical spec_values
    items (the ones that refuse a launch) accept it, as the design's value or a documented mitigation."""
    from forge.checklist.items import load_checklist

    for spec_name in ("tiny", "phase1"):
        resolved = load_spec(SPECS / f"{spec_name}.toml")
        items = [i for i in load_checklist(spec_name).items if i.check == "spec_values" and i.severity == "critical"]
        accepted: dict[str, list] = {}
        for item in items:
            for key, value in item.params.get("expected", {}).items():
                accepted.setdefault(key, []).append(value)
            for key, values in item.params.get("mitigations", {}).items():
                accepted.setdefault(key, []).extend(values)
        for rule in RULES:
            if spec_name == "tiny" and rule.id == "B1-budget-overrun":
                continue      # sized for the 25M design (fires above 26M parameters)
            for remedy in rule.remedy:
                overrides = [f"{k}={json.dumps(v)}" for k, v in remedy.set.items()]
                if overrides and not any("lr_overrides" in o for o in overrides):
                    load_spec(SPECS / f"{spec_name}.toml", overrides)      # resolves (validates)
                for key, value in remedy.set.items():
                    if key in accepted:
                        assert value in accepted[key], (spec_name, rule.id, key, value)


# ------------------------------------------------------------------------------ success criteria

def _criteria(records, spec=TINY):
    from forge.report.criteria import RunRecord, success_criteria

    return {c.id: c for c in success_criteria(RunRecord(None, records, spec, {}, {}, []))}


def test_success_criteria_fail_where_they_should_and_never_pass_without_evidence():
    evals = with_(H, valid__halt__avg_steps=lambda i: 2.4, valid__bits_per_byte=lambda i: 3.0 - 0.02 * i)
    good = _criteria(evals)
    assert good["C1-act-avg-steps"].status == "pass" and good["A2-valid-bpb-falls"].status == "pass"
    never_halts = _criteria(with_(evals, valid__halt__avg_steps=lambda i: 3.0))       # t_max: never halting
    assert never_halts["C1-act-avg-steps"].status == "fail"
    assert _criteria(with_(evals, config__param_count=lambda i: 25_000_000))["B1-param-budget"].status == "fail"
    slow = _criteria(with_(evals, perf__tokens_per_sec=lambda i: 300))
    assert slow["F1-training-speed"].status == "fail"                                 # the tiny CPU target
    phase1 = json.loads(json.dumps(TINY))
    phase1["run"]["checklist"] = "phase1"
    assert _criteria(evals, phase1)["F1-training-speed"].status == "n/a"               # a GPU target, on CPU
    none = _criteria([{"step": 10, "loss/total": 3.0}])
    assert all(c.status == "n/a" and c.note.startswith(("no evidence", "does not apply")) for c in none.values())


def test_contribution_criteria_fail_on_an_undecided_gate_and_never_pass_without_the_probes():
    """The gate rows read discrimination, not the mean: g = 0.5 everywhere (entropy ln 2, y usage 0.5) used to
    pass "entropy > 0.5" and "y usage 0.3-0.7"; it fails now, as do a memory and a recursion that earn nothing."""
    from test_diagnose_tree import probes

    ids = ("C1-memory-contribution", "C1-gate-discrimination", "C2-recursion-gain")
    good = _criteria(H)
    assert [good[i].status for i in ids] == ["pass"] * 3
    assert good["C1-memory-contribution"].measured == 0.05
    undecided = _criteria(probes(with_(H, gate__entropy=lambda i: math.log(2), gate__y_usage=lambda i: 0.5),
                                 valid__gate__token_spread=lambda i: 0.0, valid__gate__decided_share=lambda i: 0.0))
    assert undecided["C1-gate-discrimination"].status == "fail"
    idle = _criteria(probes(H, valid__memory_contribution_bpb=lambda i: 0.0, valid__recursion_gain_bpb=lambda i: -0.01))
    assert idle["C1-memory-contribution"].status == "fail" and idle["C2-recursion-gain"].status == "fail"
    bare = _criteria([{k: v for k, v in r.items() if not k.startswith(("valid/memory", "valid/rec", "valid/gate"))}
                      for r in H])
    assert all(bare[i].status == "n/a" and bare[i].note.startswith("no evidence") for i in ids), bare
    plain = json.loads(json.dumps(TINY))
    plain["model"]["memory"]["enabled"] = plain["model"]["trm"]["enabled"] = False
    absent = _criteria(H, plain)
    assert all(absent[i].status == "n/a" and absent[i].note.startswith("does not apply") for i in ids)
    assert absent["C1-act-avg-steps"].status == "n/a"          # no recursion: no halting to judge


def test_report_reads_nulls_and_a_bad_line(run_cli, tmp_path):
    d = _run_dir(tmp_path, H, {"status": "finished", "step": 300})
    (d / "checklist.json").write_text("{}")
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 310, "valid/halt/share_step0": null, "valid/halt/share_step1": null}\nnot json\n')
    with open(d / "warnings.jsonl", "a") as f:     # a torn warnings line too: the report reads past it
        f.write('{"step": 30, "id": "C1-gate-entropy", "title": "t", "measured": "m"}\n{"step": 40, "id"\n')
    code, out, err = run_cli("report", "r1", cwd=tmp_path)
    assert code == 0, err
    assert "C1-gate-entropy" in out


def test_readme_metric_table_is_generated_from_the_catalogue():
    from forge.metrics.catalogue import readme_with_table

    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme_with_table(text, load_catalogue()) == text, "run: python -m forge.metrics.catalogue README.md"
