"""Pre-flight memory estimate (B1, the OOM branch): forge check predicts the training step's peak from the model's
arithmetic, judges it against a budget and names the spec changes that fit (forge.train.memory_estimate)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from forge.model import build_model
from forge.spec.load import load_spec
from forge.train.memory_estimate import MODES, estimate, ledger_peaks, model_shapes

NO_WANDB = ("--set", "logging.wandb.mode=disabled")


@pytest.fixture(scope="module")
def tiny():
    spec = load_spec(REPO / "specs/tiny.toml").spec
    return spec, model_shapes(spec, build_model(spec.model, spec.objective, device="meta"))


def memory_item(out: str) -> dict:
    return next(i for i in json.loads(out)["items"] if i["id"] == "B1-memory-estimate")


def test_check_fails_a_small_budget_and_names_the_changes_that_fit(repo, run_cli, tiny):
    """Judged for a GPU (no process term: the figures do not depend on this process) with 0.1 GB."""
    spec, shapes = tiny
    check = ("check", str(repo / "specs/tiny.toml"), "--device", "cuda", "--memory-gb", "0.1", "--json", *NO_WANDB)
    code, out, _ = run_cli(*check)
    item = memory_item(out)
    assert code == 1 and item["status"] == "fail" and item["data"]["predicted_gb"] > 0.1
    fixes = {k[len("with "):]: v for k, v in item["data"].items() if k.startswith("with ")}
    assert set(fixes) == {"train.gradient_checkpointing=backbone_and_trm", "data.grad_accum=4"}
    assert "fits with: --set train.gradient_checkpointing=backbone_and_trm: 0.08 GB" in item["detail"]
    for overrides, predicted in fixes.items():      # applied, each suggestion is predicted to fit, as it says
        changed = load_spec(repo / "specs/tiny.toml", [overrides]).spec
        again = estimate(changed, shapes, "cuda", "fp32").total / 1e9
        assert again <= 0.1 and round(again, 3) == predicted, overrides
    code, out, _ = run_cli(*check, "--set", "data.grad_accum=4")
    assert code == 0 and memory_item(out)["status"] == "pass"


def test_on_cpu_the_check_counts_its_own_process(repo, run_cli):
    code, out, _ = run_cli("check", str(repo / "specs/tiny.toml"), "--memory-gb", "0.1", "--json", *NO_WANDB)
    item = memory_item(out)            # interpreter + torch alone hold more than 0.1 GB: nothing can fit
    assert item["status"] == "fail" and item["data"]["runtime"] > 0.1 and "no change" in item["detail"]


def test_check_judges_the_device_memory_by_default_and_cuda_without_a_gpu_is_skipped(repo, run_cli):
    code, out, _ = run_cli("check", str(repo / "specs/tiny.toml"), "--json", *NO_WANDB)
    item = memory_item(out)
    assert item["status"] == "pass" and item["expected"].endswith("(total RAM)")
    assert item["data"]["budget_gb"] == pytest.approx(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9,
                                                      abs=1e-3)
    import torch

    if not torch.cuda.is_available():
        code, out, _ = run_cli("check", str(repo / "specs/tiny.toml"), "--device", "cuda", "--json", *NO_WANDB)
        item = memory_item(out)
        assert item["status"] == "skip" and "no CUDA device" in item["detail"] and "GB predicted on cuda" in item["detail"]
    code, _, err = run_cli("check", str(repo / "specs/tiny.toml"), "--device", "tpu")
    assert code == 2 and "--device must be cpu or cuda" in err


def test_estimate_matches_the_ledger_of_the_real_step(tiny):
    """The arithmetic against the step itself run on the meta device with every storage booked (tensors only)."""
    spec, shapes = tiny
    (booked,) = ledger_peaks(spec, (4,), spec.data.seq_len, "backbone_and_trm")
    predicted = estimate(spec, shapes, "cpu", "fp32", micro_batch=4, grad_accum=1, mode="backbone_and_trm")
    assert predicted.weights == booked.weights
    assert predicted.total == pytest.approx(booked.peak, rel=0.10)


def test_estimate_within_15_percent_of_a_measured_step(tiny):
    """A real tiny step (two, the optimizer state from the first) in a fresh process: the peak of its anonymous
    resident memory minus its value before the model is built, glibc's mmap threshold fixed so that it follows
    the live tensors (benchmarks/bench_memory_estimate.py, which measures the same for tiny and phase1)."""
    spec, shapes = tiny
    out = subprocess.run([sys.executable, "benchmarks/bench_memory_estimate.py", "--child", "specs/tiny.toml",
                          "--batch", "8", "--mode", "off", "--threads", "1"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    predicted = estimate(spec, shapes, "cpu", "fp32", micro_batch=8, grad_accum=1, mode="off").total
    assert predicted == pytest.approx(measured, rel=0.15)


def test_checkpointing_and_micro_batching_lower_the_peak(tiny):
    spec, shapes = tiny
    peak = {(b, m): estimate(spec, shapes, "cpu", "fp32", micro_batch=b, grad_accum=1, mode=m).total
            for b in (4, 8) for m in MODES}
    assert peak[8, "off"] > peak[4, "off"]
    assert peak[8, "off"] > peak[8, "backbone"] > peak[8, "backbone_and_trm"]
    assert estimate(spec, shapes, "cpu", "fp32").micro_batch == 8
    assert estimate(spec, shapes, "cpu", "fp32", grad_accum=4).micro_batch == 2
