"""Self-healing runs (forge train --heal, [train.heal]; forge/train/heal.py) on real tiny trainings:

    healed  Grokfast lam = 20 (D1 fires at step 10) -> rolled back, patched to lam 0.1 (sick.r1.toml), recovered
    split   the same run stopped after its heal, resumed from before the skipped batch: equal to the uninterrupted one
    bound   lr 1e30: non-finite updates (C2) -> its remedy halves the lr -> the finding returns -> stopped
    strict  a gate that pins lam 20: D1's remedy would fail it, so it is not applied and the run stops
    compare two variants in turns (lam 20, 0.3) with heal on: the lam-20 variant heals within its slice

The runs are micro-sized (d_model 32, 4 x 32 tokens, 20 steps) and gated by a checklist without the design-size
items and the costly metric-family step, so the file stays within a minute.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SPECS
from forge.cli import main
from forge.data import TrainLoader
from forge.data.packing import DocArray, PackedStream
from forge.spec.load import load_spec

SICK = """extends = "tiny.toml"
[run]
checklist = "heal_micro"
[model]
vocab_size = 512
d_model = 32
n_layers = 1
n_heads = 2
ffn_hidden = 64
[model.attention]
sw_window = 16
[model.memory]
d_mem = 16
rank = 4
chunk_size = 8
[model.gate]
hidden = 16
[model.trm]
ffn_hidden = 64
[data]
seq_len = 32
batch_size = 4
[data.eval]
max_batches = 1
[train]
max_steps = 20
warmup_steps = 5
eval_every = 20
[train.heal]
attribute = ["D1-grokfast-over-amplification"]   # this heal also skips a batch (the loader path)
batch_z = 0.8      # low: these 10 losses have no outlier; the largest (z 0.88) is set aside
[checkpoint]
every = 4
[logging]
every = 2
[logging.wandb]
mode = "disabled"
[merge_preview]
enabled = false
[probes]
enabled = false
[optim.grokfast]
lam = 20.0
"""

# the tiny gate without the items that pin the tiny design's sizes and cadences, and without the real step of
# OBS-metric-families (seconds per gate; the heal runs a gate on each patched spec)
CHECKLIST = """extends = "tiny.toml"
name = "heal_micro"
description = "tests/test_heal.py: the tiny gate at micro sizes"
drop = ["B1-param-budget", "B2-architecture", "B2-tiny-memory-gate", "F2-checkpoint", "OBS-metric-families"]
"""

# a gate that pins Grokfast lam at 20 (critical): D1's remedy (lam 0.1) would fail it
STRICT = """extends = "heal_micro.toml"
name = "heal_strict"
[[item]]
id = "D1-grokfast-pinned"
title = "Grokfast lam pinned at 20 (a test's gate)"
severity = "critical"
check = "spec_values"
params = { expected = { "optim.grokfast.lam" = 20.0 } }
"""


def _cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code or 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three runs, trained once for the module: {name: (exit code, run dir)} and the spec directory."""
    root = tmp_path_factory.mktemp("heal")
    (root / "specs").mkdir()
    for name in ("phase1.toml", "tiny.toml"):
        shutil.copy(SPECS / name, root / "specs")
    (root / "specs" / "sick.toml").write_text(SICK)
    checklists = root / "checklists"
    shutil.copytree(REPO / "checklists", checklists)
    (checklists / "heal_micro.toml").write_text(CHECKLIST)
    (checklists / "heal_strict.toml").write_text(STRICT)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("FORGE_CHECKLIST_DIR", str(checklists))
        mp.setenv("FORGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "forge-cache"))
        out = {"healed": _cli("train", "specs/sick.toml", "--run-id", "healed", "--force", "--heal")}
        _cli("train", "specs/sick.toml", "--run-id", "split", "--force", "--heal", "--max-steps", "14")
        # resume from a checkpoint before the batch the heal set aside: the resumed run must skip it too
        out["split"] = _cli("train", "--resume", "split", "--from-step", "8")
        out["strict"] = _cli("train", "specs/sick.toml", "--run-id", "strict", "--force", "--heal",
                             "--set", "run.checklist=heal_strict")
        out["compare"] = _cli("compare", "specs/sick.toml", "--vary", "optim.grokfast.lam=20.0,0.3", "--set",
                              "train.heal.enabled=true", "--budget", "tokens=1536", "--force", "--id", "compare")
        for k in [k for k in os.environ if k.startswith("WANDB_")]:
            mp.delenv(k)
        out["bound"] = _cli("train", "specs/sick.toml", "--run-id", "bound", "--force", "--heal",   # W&B: offline
                            "--set", "optim.grokfast.lam=0.3", "--set", "optim.lr=1e30",
                            "--set", "logging.wandb.mode=offline")
    yield {name: (code, root / "runs" / name) for name, code in out.items()}, root / "specs"


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run once W&B has written its exit record: its service writes the file
    asynchronously (a wait, not a timing assertion)."""
    from test_ecosystem import wandb_records

    for _ in range(240):
        try:
            records = list(wandb_records(path)) if path.is_file() and path.stat().st_size > 7 else []
        except Exception:    # a chunk still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        time.sleep(0.25)
    return records


def _json(path: Path):
    return json.loads(path.read_text())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _metrics(run: Path) -> list[dict]:
    return _lines(run / "metrics.jsonl")


def test_a_diverging_run_is_healed_end_to_end(runs, run_cli, monkeypatch):
    out, specs = runs
    monkeypatch.setenv("FORGE_CHECKLIST_DIR", str(specs.parent / "checklists"))
    code, run = out["healed"]
    assert code == 0
    assert _json(run / "status.json")["status"] == "finished"
    lineage = _json(run / "lineage.json")
    [heal] = lineage["heals"]
    assert heal["finding"] == "D1-grokfast-over-amplification"
    assert "optim/grad_ema_ratio mean" in heal["evidence"][0]
    assert heal["rollback_step"] < heal["onset"] <= heal["step"]   # a checkpoint before the onset, or step 0
    assert heal["patch"]["changes"] == [{"key": "optim.grokfast.lam", "before": 20.0, "after": 0.1}]
    assert heal["outcome"] == "recovered: finished at step 20"
    # the patch is the record forge diagnose --apply writes, and the run continued under it
    patched = load_spec(specs / "sick.r1.toml")
    assert patched.spec.optim.grokfast.lam == 0.1 and patched.spec.train.heal.enabled
    assert _json(specs / "patches" / "sick.r1.json")["rule"] == "D1-grokfast-over-amplification"
    assert "evidence: optim/grad_ema_ratio" in (specs / "sick.r1.toml").read_text()
    assert lineage["spec_hash"] == patched.hash and lineage["spec_file"].endswith("sick.r1.toml")
    # metrics rewound to the rollback step: one record per logged step, and the slow gradient no longer dominates
    records = _metrics(run)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    after = [r["optim/grad_ema_ratio"] for r in records if r["step"] > heal["rollback_step"]]
    assert max(after) < 1.5
    # the batches that carried it are skipped from the rollback on
    skipped = _json(run / "skipped_batches.json")["batches"]
    assert skipped and [[b["batch"], b["micro"]] for b in skipped] == heal["skipped_batches"]
    assert all(b["step"] > heal["rollback_step"] and b["z"] > 0.8 for b in skipped)
    # forge diagnose: D1 is clear on the healed run; forge report shows the timeline
    code, text, err = run_cli("diagnose", "healed", "--json", cwd=specs.parent)
    assert code in (0, 1, 3), err
    assert "D1-grokfast-over-amplification" not in [f["rule"] for f in json.loads(text)["findings"]], err
    code, text, err = run_cli("report", "healed", cwd=specs.parent)
    assert code == 0, err
    assert "heal timeline" in text and "D1-grokfast-over-amplification" in text and "sick.r1.toml" in text


def test_heal_then_resume_equals_heal_uninterrupted(runs):
    out, _ = runs
    (code_a, a), (code_b, b) = out["healed"], out["split"]
    assert code_a == code_b == 0
    assert _json(a / "skipped_batches.json") == _json(b / "skipped_batches.json")
    wa, wb = (load_file(r / "checkpoints" / "step-0000020" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0, msg=name)
    la = {r["step"]: r["loss/total"] for r in _metrics(a)}
    lb = {r["step"]: r["loss/total"] for r in _metrics(b)}
    assert la.keys() == lb.keys()
    assert all(abs(la[s] - lb[s]) <= 1e-6 for s in la)


def test_a_finding_that_returns_after_its_remedy_stops_the_run(runs):
    out, specs = runs
    code, run = out["bound"]
    assert code == 1
    status = _json(run / "status.json")
    assert status["status"] == "failed"
    assert "C2-nonfinite-updates" in status["error"] and "returned after its remedy" in status["error"]
    assert "heal attempts: 1" in status["error"]
    first, stop = _json(run / "lineage.json")["heals"]
    assert first["finding"] == stop["finding"] == "C2-nonfinite-updates"
    assert first["patch"]["changes"] == [{"key": "optim.lr", "before": 1e30, "after": 5e29}]
    assert first["outcome"].startswith("returned at step") and stop["patch"] is None
    assert stop["outcome"] == status["error"].removeprefix("heal stopped the run: ")
    # W&B got the heal as alerts, through the run's own mirror (the heal's gate leaves that W&B run alive)
    assert not [w for w in _lines(run / "warnings.jsonl") if w["id"] == "OBS-wandb"]
    (offline,) = (run / "wandb").glob("offline-run-*-bound")
    records = _wandb_records(offline / "run-bound.wandb")
    alerts = [r.alert.title for r in records if r.WhichOneof("record_type") == "alert"]
    assert alerts == ["forge heal: C2-nonfinite-updates", "forge heal: rolled back to step 0",
                      "forge heal: C2-nonfinite-updates"]


def test_a_remedy_that_fails_the_checklist_is_never_applied(runs):
    out, specs = runs
    code, run = out["strict"]
    assert code == 1
    error = _json(run / "status.json")["error"]
    assert "D1-grokfast-over-amplification" in error and "fails the checklist (D1-grokfast-pinned)" in error
    [stop] = _json(run / "lineage.json")["heals"]
    assert stop["patch"] is None and stop["rollback_step"] is None
    assert load_spec(run / "spec.toml").spec.optim.grokfast.lam == 20.0           # the run's spec: unpatched
    written = {p.name for p in specs.glob("sick.r*.toml")}
    assert all(load_spec(specs / n).spec.run.checklist != "heal_strict" for n in written)   # nothing left of it
    assert not (run / "abandoned").exists()                                        # and nothing rolled back


def test_a_compare_variant_heals_in_its_turn(runs):
    out, _ = runs
    code, root = out["compare"]
    assert code == 0
    variants = {v["name"]: v for v in _json(root / "comparison.json")["variants"]}
    assert {v["status"] for v in variants.values()} == {"finished"}
    assert variants["lam-20.0"]["step"] == variants["lam-0.3"]["step"] == 12    # the healed trainer's counters
    [heal] = _json(root.parent / "compare-lam-20.0" / "lineage.json")["heals"]
    assert heal["finding"] == "D1-grokfast-over-amplification" and heal["outcome"] == "recovered: finished at step 12"
    assert "heals" not in _json(root.parent / "compare-lam-0.3" / "lineage.json")


def test_robust_z_scores_an_outlier_against_the_median_and_mad():
    from forge.metrics.signals import robust_z

    z = robust_z([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 4.0, float("nan")])
    assert z[6] > 20 and max(abs(v) for v in z[:6]) < 1.5 and z[7] == float("inf")
    assert robust_z([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]      # no spread: nothing stands out


def test_bad_heal_settings_exit_2_naming_the_key(run_cli, tmp_path):
    shutil.copy(SPECS / "phase1.toml", tmp_path)
    shutil.copy(SPECS / "tiny.toml", tmp_path)
    code, _, err = run_cli("train", str(tmp_path / "tiny.toml"), "--set", "train.heal.max_attempts=0", cwd=tmp_path)
    assert code == 2 and "train.heal.max_attempts" in err
    (tmp_path / "bad.toml").write_text('extends = "tiny.toml"\n[train.heal]\nmodes = ["D1-no-such-rule"]\n')
    code, _, err = run_cli("train", str(tmp_path / "bad.toml"), "--heal", cwd=tmp_path)
    assert code == 2 and "train.heal.modes" in err and "D1-no-such-rule" in err
    (tmp_path / "monitor.toml").write_text('extends = "tiny.toml"\n[train.heal]\n'
                                           'modes = ["D2-newton-schulz-divergence"]\n')
    code, _, err = run_cli("train", str(tmp_path / "monitor.toml"), "--heal", cwd=tmp_path)
    assert code == 2 and "cannot be healed" in err
    (tmp_path / "typo.toml").write_text('extends = "tiny.toml"\n[train.heal]\nenabeld = true\n')
    code, _, err = run_cli("train", str(tmp_path / "typo.toml"), cwd=tmp_path)
    assert code == 2 and "train.heal.enabeld" in err
    code, _, err = run_cli("train", str(tmp_path / "tiny.toml"), "--heal", "--nproc", "2", cwd=tmp_path)
    assert code == 2 and "not supported with --nproc" in err
    code, _, err = run_cli("train", "--resume", "some-run", "--heal", cwd=tmp_path)
    assert code == 2 and "--heal cannot change a run being resumed" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())   # nothing written


def test_the_loader_never_trains_on_a_skipped_micro_batch_and_resumes_the_same():
    lengths = [7, 3, 11, 5, 9, 4]
    tokens = np.concatenate([1000 * i + np.arange(1, n + 1) for i, n in enumerate(lengths)]).astype(np.uint32)
    docs = DocArray(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def loader(skip=()):
        out = TrainLoader([PackedStream("s", docs, 0, seed=0)], [1.0], batch_size=4, grad_accum=2, seq_len=6,
                          curriculum=[], seed=0)
        out.skip = set(skip)
        return out

    plain, skipping = loader(), loader({(1, 1)})
    rows = [plain.micro_batches(step) for step in range(4)]
    got = [skipping.micro_batches(step) for step in range(4)]
    assert all((a[0] == b[0]).all() for a, b in zip(rows[0], got[0]))            # before it: the same batches
    assert (got[1][0][0] == rows[1][0][0]).all()                                  # its sibling micro-batch too
    assert (got[1][1][0] == rows[2][0][0]).all()                                  # replaced by the next rows
    seen = torch.cat([m[0] for batch in got for m in batch])
    assert not any((seen == row).all(dim=1).any() for row in rows[1][1][0])        # the skipped rows: never seen
    first = loader({(1, 1)})
    first.micro_batches(0)
    resumed = loader({(1, 1)})
    resumed.load_state_dict(first.state_dict())                                   # a resume after step 0 ...
    again = [resumed.micro_batches(step) for step in range(1, 4)]                 # ... skips it the same way
    assert all((a[0] == b[0]).all() for x, y in zip(got[1:], again) for a, b in zip(x, y))


def test_a_heal_reaches_wandb_as_an_alert_and_its_history_never_goes_back(tmp_path, monkeypatch):
    from forge.train.metrics_log import MetricsLog
    from forge.train.run_dir import RunDir

    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    spec = load_spec(SPECS / "tiny.toml", ["logging.wandb.mode=offline"]).spec
    run = RunDir.create(tmp_path / "runs", "h")
    log = MetricsLog(run.metrics_path, spec, "h", run.path, {"spec_hash": "c" * 64}, print)
    for step in (2, 4):
        log.log(step, {"loss/total": 9.0})
    log.alert("forge heal: D1-grokfast-over-amplification", "rolled back to step 0")
    log.rewind(0)
    log.log(2, {"loss/total": 5.0})
    log.log(6, {"loss/total": 4.0})
    log.close()
    assert [json.loads(line)["step"] for line in run.metrics_path.read_text().splitlines()] == [2, 6]
    (offline,) = (run.path / "wandb").glob("offline-run-*-h")
    records = _wandb_records(offline / "run-h.wandb")
    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert [a.title for a in alerts] == ["forge heal: D1-grokfast-over-amplification"]
    assert "rolled back to step 0" in alerts[0].text
    steps = [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]
    assert steps == sorted(steps) and 6 in steps
