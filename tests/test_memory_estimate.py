"""Pre-flight memory estimate (B1, the OOM branch): forge check predicts the training step's peak, judges it
against a budget and names the spec changes that fit (forge.train.memory_estimate)."""
from __future__ import annotations

import json

from forge.model import build_model
from forge.spec.load import load_spec
from forge.train.memory_estimate import estimate, model_shapes


def memory_item(out: str) -> dict:
    return next(i for i in json.loads(out)["items"] if i["id"] == "B1-memory-estimate")


def test_check_fails_a_small_budget_and_names_changes_that_fit(repo, run_cli):
    code, out, _ = run_cli("check", str(repo / "specs/tiny.toml"), "--memory-gb", "0.2", "--json",
                           "--set", "logging.wandb.mode=disabled")
    item = memory_item(out)
    assert code == 1 and item["status"] == "fail"
    assert item["data"]["predicted_gb"] > 0.2
    fixes = {k[len("with "):]: v for k, v in item["data"].items() if k.startswith("with ")}
    assert fixes and all(v <= 0.2 for v in fixes.values())
    for overrides, predicted in fixes.items():      # each suggestion, applied, is predicted to fit
        sets = [s for part in overrides.split(" --set ") for s in ("--set", part)]
        code, out, _ = run_cli("check", str(repo / "specs/tiny.toml"), "--memory-gb", "0.2", "--json",
                               "--set", "logging.wandb.mode=disabled", *sets)
        again = memory_item(out)
        assert again["status"] == "pass" and again["data"]["predicted_gb"] == predicted


def test_check_passes_a_large_budget(repo, run_cli):
    code, out, _ = run_cli("check", str(repo / "specs/tiny.toml"), "--memory-gb", "100", "--json",
                           "--set", "logging.wandb.mode=disabled")
    item = memory_item(out)
    assert item["status"] == "pass" and item["expected"].endswith("(--memory-gb)")


def test_estimate_grows_with_batch_and_shrinks_with_checkpointing(repo):
    spec = load_spec(repo / "specs/tiny.toml").spec
    shapes = model_shapes(spec, build_model(spec.model, spec.objective, device="meta"))
    peak = {(b, m): estimate(spec, shapes, "cpu", "fp32", micro_batch=b, grad_accum=1, mode=m).total
            for b in (4, 8) for m in ("off", "backbone", "backbone_and_trm")}
    assert peak[8, "off"] > peak[4, "off"]
    assert peak[8, "off"] > peak[8, "backbone"] > peak[8, "backbone_and_trm"]
