"""forge train on several processes (torch DDP, gloo, 2 ranks on CPU): results independent of world size.

One torchrun launch runs every 2-process scenario (tests/dist_worker.py); the 1-process references run here
with the same builders (tests/dist_common.py). Tolerance 1e-5 on parameters after 10 steps of gradient
accumulation 2, Grokfast, firing QK-clip, ACT loss and the batch-level losses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_common import latest_checkpoint, make_trainer, param_file, parameters, save_parameters
from conftest import SPECS
from forge.train.metrics_log import read_metrics
from forge.train.run_dir import RunDir

TOL = 1e-5


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """1-process references, then the 2-process scenarios in one torchrun launch; the worker's outputs."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "FORGE_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "forge-cache"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FORGE_CACHE_DIR", env["FORGE_CACHE_DIR"])   # the references prepare the workers' cache
        reference = make_trainer(out / "runs", "single10")
        assert reference.run_until(10) == "finished"
        save_parameters(reference, out, "single10", 0)
        assert make_trainer(out / "runs", "single5").run_until(5) == "finished"   # resumed on 2 processes
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               "--max-restarts=0", str(Path(__file__).with_name("dist_worker.py")), str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        yield out


def result(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]


def params(out: Path, name: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(param_file(out, name, rank), weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_processes_match_one_process_with_the_same_global_batch(launched):
    ranks = result(launched, "ddp10")
    assert [r["status"] for r in ranks] == ["finished", "finished"]
    assert ranks[0]["clipped"] == ranks[1]["clipped"] > 0          # QK-clip fired, identically
    assert max_diff(params(launched, "ddp10"), params(launched, "single10")) < TOL


def test_replicas_are_bit_identical(launched):
    a, b = params(launched, "ddp10", 0), params(launched, "ddp10", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(r["replicas"] for r in result(launched, "ddp10"))


def test_owner_sharded_newton_schulz_matches_replicated(launched):
    ranks = result(launched, "sharded10")
    assert all(r["status"] == "finished" and r["replicas"] for r in ranks)
    assert ranks[0]["owners"] == [0, 1]                                 # both ranks own matrices
    replicated, sharded = params(launched, "ddp10"), params(launched, "sharded10")
    assert max_diff(sharded, replicated) < TOL
    one = read_metrics(launched / "runs" / "ddp10" / "metrics.jsonl")[-1]
    two = read_metrics(launched / "runs" / "sharded10" / "metrics.jsonl")[-1]
    assert two["optim/ortho_error"] == pytest.approx(one["optim/ortho_error"], rel=1e-5)


def test_the_logged_loss_equals_the_one_process_loss(launched):
    one = {r["step"]: r for r in read_metrics(launched / "runs" / "single10" / "metrics.jsonl")}
    two = {r["step"]: r for r in read_metrics(launched / "runs" / "ddp10" / "metrics.jsonl")}
    assert one.keys() == two.keys() == {5, 10}
    for step in one:
        for key in ("loss/total", "loss/ce", "loss/coherence", "loss/diversity", "loss/act", "embedding_diversity",
                    "act/ema_acc_step0", "optim/grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_a_checkpoint_resumes_across_world_sizes(launched):
    single10 = params(launched, "single10")
    # 1 -> 2: the 1-process checkpoint at step 5, continued on 2 processes
    assert [r["step"] for r in result(launched, "resume12")] == [10, 10]
    assert max_diff(params(launched, "resume12"), single10) < TOL
    # 2 -> 1: the 2-process checkpoint at step 5, continued here
    trainer = make_trainer(launched / "runs", "ddp5", create=False)
    trainer.restore(latest_checkpoint(launched / "runs" / "ddp5"))
    assert trainer.counters.step == 5 and trainer.run_until(10) == "finished"
    assert max_diff(parameters(trainer), single10) < TOL


def test_a_nan_on_one_rank_makes_every_rank_skip(launched):
    ranks = result(launched, "nan")
    for r in ranks:
        assert (r["status"], r["steps"], r["skipped"], r["nonfinite"], r["replicas"]) == ("finished", 3, 1, 1, True)


def test_qk_clip_over_tau_on_one_rank_clips_on_both(launched):
    r0, r1 = result(launched, "qkclip")
    assert max(r0["local_max"] + r1["local_max"]) < 1000.0     # only the planted logit exceeds tau
    assert r0["clipped"] == r1["clipped"] == 1
    assert r0["replicas"] and r1["replicas"]


def test_ranks_halting_at_different_depths_run_the_same_steps(launched):
    r0, r1 = result(launched, "halting")
    assert (r0["halt_share_step0"], r1["halt_share_step0"]) == (0.0, 1.0)   # local halting differs...
    assert r0["outer_steps"] == r1["outer_steps"] == 3                      # ...every outer step still runs
    assert r0["logged_share"] == r1["logged_share"] == pytest.approx(0.5)   # metrics: means over ranks
    assert r0["replicas"] and r1["replicas"]


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")   # torchrun in-process: stderr is captured
def test_forge_train_nproc_2_end_to_end(run_cli, tmp_path, launched):
    """--nproc 2 through torch's launcher: one run directory, rank-0 metrics, the 1-process loss."""
    code, out, err = run_cli("train", str(SPECS / "tiny.toml"), "--nproc", "2", "--max-steps", "2",
                             "--set", "logging.every=1", "--set", "logging.wandb.mode=disabled",
                             "--set", "probes.enabled=false", "--set", "data.eval.max_batches=1", cwd=tmp_path)
    assert code == 0, out + err
    (path,) = [p for p in (tmp_path / "runs").iterdir()]
    run = RunDir(path)
    assert run.status()["status"] == "finished" and run.status()["world_size"] == 2
    assert not list(path.glob("error*.txt"))
    assert [c.name for c in sorted(run.checkpoints.iterdir())] == ["step-0000002"]
    two = read_metrics(run.metrics_path)
    assert [r["step"] for r in two] == [1, 2]                                     # one writer
    code, _, err = run_cli("train", str(SPECS / "tiny.toml"), "--max-steps", "2", "--set", "logging.every=1",
                           "--set", "logging.wandb.mode=disabled", "--set", "probes.enabled=false",
                           "--set", "data.eval.max_batches=1", "--set", "run.output_dir=single", cwd=tmp_path)
    assert code == 0, err
    (single,) = list((tmp_path / "single").iterdir())
    one = read_metrics(single / "metrics.jsonl")
    for a, b in zip(one, two):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5)


def test_nproc_rejects_a_batch_that_does_not_split(run_cli, tmp_path):
    code, _, err = run_cli("train", str(SPECS / "tiny.toml"), "--nproc", "3", cwd=tmp_path)
    assert code == 2 and "data.batch_size = 8 does not split over 3 processes" in err
    assert not (tmp_path / "runs").exists()                                       # nothing written


def test_torchrun_without_a_launching_forge_gates_on_rank_0(tmp_path, launched):
    """The multi-node form (`torchrun ... -m forge train SPEC`), here on one node: rank 0 runs the checklist
    and creates the run, the other ranks join it by id."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--max-restarts=0", "-m", "forge", "train", str(SPECS / "tiny.toml"), "--max-steps", "2",
                           "--set", "logging.wandb.mode=disabled", "--set", "probes.enabled=false",
                           "--set", "data.eval.max_batches=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = list((tmp_path / "runs").iterdir())
    run = RunDir(path)
    assert (run.status()["status"], run.status()["world_size"]) == ("finished", 2)
    assert (path / "checklist.json").is_file() and [r["step"] for r in read_metrics(run.metrics_path)] == [2]
