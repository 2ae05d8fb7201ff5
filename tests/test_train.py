"""forge train end to end on the tiny spec (CPU, built-in corpus): artefacts, metric families,
resume equivalence, crash safety, non-finite handling, lock, W&B modes, gating."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SPECS
from forge.train import checkpoint as ckpt
from forge.train.metrics_log import read_metrics
from forge.metrics.catalogue import load_catalogue
from forge.train.run_dir import RunDir

# short runs: log every 2 steps, evaluate/checkpoint every 4, one eval batch per source
FAST = ["train.eval_every=4", "logging.every=2", "checkpoint.every=4", "merge_preview.every=8",
        "data.eval.max_batches=1", "logging.wandb.mode=disabled"]
FAMILIES = ("loss/", "act/", "gate/", "optim/", "attn/", "memory/", "valid/", "grad/norm_y", "grad/norm_z",
            "perf/tokens_per_sec",
            "perf/step_time", "perf/peak_memory_gb", "perf/mfu", "config/param_count", "merge/")


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    """One tokenizer/data cache for the whole session (preparing the corpus is the slow part)."""
    cache = tmp_path_factory.getbasetemp() / "forge-cache"
    monkeypatch.setenv("FORGE_CACHE_DIR", str(cache))


def train(run_cli, cwd: Path, *args: str):
    return run_cli("train", str(SPECS / "tiny.toml"), "--force", *[x for a in FAST for x in ("--set", a)], *args,
                   cwd=cwd)


def only_run(cwd: Path) -> RunDir:
    (path,) = [p for p in (cwd / "runs").iterdir() if p.is_dir()]
    return RunDir(path)


def comparable(records: list[dict]) -> dict[int, dict]:
    """Metrics that must be identical between equivalent runs (timings and memory are not)."""
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")} for r in records}


def test_tiny_run_end_to_end(run_cli, tmp_path):
    code, out, err = train(run_cli, tmp_path, "--max-steps", "8")
    assert code == 0, err
    run = only_run(tmp_path)
    for name in ("spec.toml", "lineage.json", "environment.json", "checklist.json", "metrics.jsonl", "status.json"):
        assert (run.path / name).is_file(), name
    assert run.status()["status"] == "finished" and run.status()["step"] == 8
    lineage = run.read("lineage.json")
    assert lineage["forced"] is True and "train.eval_every=4" in lineage["overrides"]
    (env,) = run.read("environment.json")   # one record per launch
    assert env["packages"]["torch"] and env["seed"] == 1337 and env["device"] == "cpu"
    assert [p.name for p in ckpt.list_checkpoints(run.checkpoints)] == ["step-0000004", "step-0000008"]
    records = read_metrics(run.metrics_path)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    keys = {k for r in records for k in r}
    for family in FAMILIES:
        assert any(k.startswith(family) for k in keys), family
    for r in records:
        assert all(v is None or math.isfinite(v) for v in r.values())
    assert all(v is not None for r in records for v in r.values())  # nothing non-finite was logged
    assert records[-1]["valid/bits_per_byte"] > 0 and records[-1]["merge/fitness"] > 0
    assert f"run {run.run_id} finished" in out
    catalogue = load_catalogue()        # every metric a real step, evaluation and merge preview logs is declared
    assert sorted(k for k in keys - {"step"} if catalogue.entry(k) is None) == []
    code, out, _ = run_cli("diagnose", run.run_id, "--json", cwd=tmp_path)   # 4 logs: not evidence of health
    assert (code, json.loads(out)["verdict"]) == (3, "undecidable")


def test_resume_equals_an_uninterrupted_run(run_cli, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    assert train(run_cli, whole, "--max-steps", "12", "--run-id", "a")[0] == 0
    assert train(run_cli, split, "--max-steps", "6", "--run-id", "b")[0] == 0
    code, _, err = run_cli("train", "--resume", "b", "--max-steps", "12", cwd=split)
    assert code == 0, err
    a = comparable(read_metrics(whole / "runs" / "a" / "metrics.jsonl"))
    b = comparable(read_metrics(split / "runs" / "b" / "metrics.jsonl"))
    assert sorted(b) == sorted(a)
    for step in (8, 10, 12):
        shared = set(a[step]) & set(b[step])
        assert len(shared) > 30
        for key in shared:
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-6, abs=1e-6), (step, key)


def test_kill_during_training_leaves_a_resumable_run(run_cli, tmp_path):
    env = {**os.environ, "FORGE_CACHE_DIR": os.environ["FORGE_CACHE_DIR"]}
    cmd = [sys.executable, "-m", "forge", "train", str(SPECS / "tiny.toml"), "--force", "--run-id", "k",
           *[x for a in [*FAST, "checkpoint.every=1"] for x in ("--set", a)], "--max-steps", "200"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "runs" / "k" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(ckpt.list_checkpoints(ckpts)) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # at an arbitrary point: often inside a checkpoint write
    proc.wait()
    latest = ckpt.latest_valid(ckpts)
    assert latest is not None
    step = ckpt.read_meta(latest)["step"]
    code, _, err = run_cli("train", "--resume", "k", "--max-steps", str(step + 2), cwd=tmp_path)
    assert code == 0, err
    assert RunDir(tmp_path / "runs" / "k").status()["step"] == step + 2


def test_sigint_checkpoints_and_marks_interrupted(tmp_path):
    cmd = [sys.executable, "-m", "forge", "train", str(SPECS / "tiny.toml"), "--force", "--run-id", "i",
           *[x for a in FAST for x in ("--set", a)]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "runs" / "i" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    run = RunDir(tmp_path / "runs" / "i")
    status = run.status()
    assert status["status"] == "interrupted" and "SIGINT" in status["reason"]
    latest = ckpt.latest_valid(run.checkpoints)
    assert latest is not None and ckpt.read_meta(latest)["step"] == status["step"]


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    from forge.spec.load import load_spec
    from forge.train.components import build_components
    from forge.train.live import LiveView
    from forge.train.loop import Trainer
    from forge.train.metrics_log import MetricsLog
    from forge.train.monitors import MonitorSet

    resolved = load_spec(SPECS / "tiny.toml", [*FAST, "train.max_nonfinite_in_a_row=3"])
    parts = build_components(resolved.spec, tmp_path)
    run = RunDir.create(tmp_path / "runs", "nan")
    live = LiveView("nan", 0, 20, tty=False)
    log = MetricsLog(run.metrics_path, resolved.spec, "nan", run.path, {}, live.warn)
    trainer = Trainer(resolved, run, parts, live, log, MonitorSet([]))
    calls = {"n": 0}
    poison_at = {3, 7, 8, 9, 10}   # forward calls (one per step: grad_accum 1) that return a NaN loss

    def poison(module, args, output):
        if not module.training:        # evaluation forwards do not count
            return output
        calls["n"] += 1
        if calls["n"] in poison_at:
            output.loss = output.loss * float("nan")
        return output

    parts.model.register_forward_hook(poison)
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    status = trainer.run_until(20)
    log.close()
    assert status == "failed" and "3 consecutive non-finite" in trainer.stop_reason
    assert f"forge diagnose {run.run_id}" in trainer.stop_reason
    assert trainer.counters.nonfinite_total == 4 and trainer.counters.step == 9
    records = read_metrics(run.metrics_path)
    assert records[-1]["optim/nonfinite_count"] == 4
    assert all(load_catalogue().entry(k) for r in records for k in r if k != "step")
    changed = [n for n, p in parts.model.named_parameters() if not torch.equal(before[n], p)]
    assert changed  # the finite steps did update


def test_lock_prevents_a_second_writer(run_cli, tmp_path):
    assert train(run_cli, tmp_path, "--max-steps", "4", "--run-id", "l")[0] == 0
    holder = RunDir(tmp_path / "runs" / "l")
    holder.lock()
    try:
        code, _, err = run_cli("train", "--resume", "l", "--max-steps", "8", cwd=tmp_path)
        assert code == 2 and "being written by another process" in err
    finally:
        holder.unlock()


def test_wandb_offline_writes_under_the_run_and_disabled_writes_nothing(run_cli, tmp_path):
    offline, disabled = tmp_path / "offline", tmp_path / "disabled"
    offline.mkdir(), disabled.mkdir()
    code, _, err = run_cli("train", str(SPECS / "tiny.toml"), "--force", "--max-steps", "2", "--run-id", "w",
                           *[x for a in FAST[:-1] for x in ("--set", a)], "--set", "logging.wandb.mode=offline",
                           cwd=offline)
    assert code == 0, err
    runs = list((offline / "runs" / "w" / "wandb").glob("offline-run-*-w"))  # the W&B run id is the forge run id
    assert len(runs) == 1 and list(runs[0].glob("run-w.wandb"))
    assert not (offline / "wandb").exists()
    assert train(run_cli, disabled, "--max-steps", "2")[0] == 0
    assert not [p for p in disabled.rglob("*") if "wandb" in p.name]


def test_gate_refuses_a_failing_spec_and_force_records_it(run_cli, tmp_path):
    code, out, err = run_cli("train", str(SPECS / "tiny.toml"), "--set", "optim.muon.ns_steps=1", cwd=tmp_path)
    assert code == 1 and "D2-muon" in out and "critical checklist items failed" in err
    assert not (tmp_path / "runs").exists()
    code, _, _ = run_cli("train", str(SPECS / "tiny.toml"), "--set", "optim.muon.ns_steps=1", "--force",
                         "--max-steps", "2", *[x for a in FAST for x in ("--set", a)], cwd=tmp_path)
    assert code == 0
    run = only_run(tmp_path)
    assert run.read("lineage.json")["forced"] is True
    assert not run.read("checklist.json")["ok"]


def test_runs_lists_the_run(run_cli, tmp_path):
    assert train(run_cli, tmp_path, "--max-steps", "4", "--run-id", "r")[0] == 0
    code, out, _ = run_cli("runs", "--json", cwd=tmp_path)
    (row,) = json.loads(out)
    assert code == 0 and row["run_id"] == "r" and row["status"] == "finished" and row["step"] == 4
    assert row["spec"] == "tiny.toml" and row["valid_perplexity"] > 1 and row["loss"] > 0


def test_merge_preview_of_two_checkpoints(run_cli, tmp_path):
    assert train(run_cli, tmp_path, "--max-steps", "8", "--run-id", "m")[0] == 0
    code, out, err = run_cli("merge-preview", "m", "--a", "4", "--b", "8", "--json", cwd=tmp_path)
    assert code == 0, err
    scores = json.loads(out)
    assert scores["merge/fitness"] > 0 and scores["merge/perplexity"] > 1
    code, out, _ = run_cli("merge-preview", "m", "--a", "8", "--b", "8", "--json", cwd=tmp_path)
    assert json.loads(out)["merge/fitness"] == pytest.approx(1.0, rel=1e-6)  # merging a model with itself
    code, _, err = run_cli("merge-preview", "m", "--a", "3", "--b", "8", cwd=tmp_path)
    assert code == 2 and "step 3" in err and "kept steps: 4, 8" in err


def test_gradient_and_histogram_logging_follow_the_spec(run_cli, tmp_path):
    code, _, err = run_cli("train", str(SPECS / "tiny.toml"), "--force", "--max-steps", "4", "--run-id", "h",
                           *[x for a in [*FAST, "logging.gradients=true", "logging.histograms=true"]
                             for x in ("--set", a)], cwd=tmp_path)
    assert code == 0, err
    run = RunDir(tmp_path / "runs" / "h")
    record = read_metrics(run.metrics_path)[-1]
    per_param = {k for k in record if k.startswith("grad/param/")}
    assert "grad/param/tok_emb.weight" in per_param
    # every parameter learns, except the ACT head, whose loss weight is 0 before act.warmup_steps (50)
    assert {k for k in per_param if not record[k] > 0} == {"grad/param/trm.act.weight", "grad/param/trm.act.bias"}
    lines = [json.loads(line) for line in (run.path / "histograms.jsonl").read_text().splitlines()]
    assert [h["step"] for h in lines] == [2, 4]
    q = lines[-1]["params"]["tok_emb.weight"]
    assert q == sorted(q) and q[0] < 0 < q[-1]
    # off (the specs' default): neither is written
    assert train(run_cli, tmp_path, "--max-steps", "2", "--run-id", "n")[0] == 0
    plain = RunDir(tmp_path / "runs" / "n")
    assert not (plain.path / "histograms.jsonl").exists()
    assert not any(k.startswith("grad/param/") for r in read_metrics(plain.metrics_path) for k in r)


@pytest.mark.parametrize("precision, matmul_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_sets_cpu_autocast_and_the_step_stays_finite(tmp_path, precision, matmul_dtype):
    """train.precision = bf16 runs forward and backward under CPU bf16 autocast (the matmuls in bf16); the
    weights, their gradients and the optimizer stay fp32; the loss is finite and the step updates the weights."""
    from forge.spec.load import load_spec
    from forge.train.components import build_components
    from forge.train.loop import Trainer

    resolved = load_spec(SPECS / "tiny.toml", [*FAST, f"train.precision={precision}"])
    parts = build_components(resolved.spec, tmp_path)
    trainer = Trainer(resolved, None, parts, None, None, None)
    seen = []
    parts.model.trm.net.blocks[0].ffn.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    losses = [trainer.train_step(collect=True)["loss/total"] for _ in range(2)]
    assert all(math.isfinite(float(loss)) for loss in losses)
    assert set(seen) == {matmul_dtype}
    assert all(p.dtype == torch.float32 for p in parts.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in parts.model.named_parameters())
