"""End to end: the A2 `data_sources` check, the shipped data specs, `forge data stats`, offline use."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import SPECS
from forge.checklist.checks.data import data_sources
from forge.checklist.context import CheckContext
from forge.data import build_data
from forge.spec.load import load_spec

UNREACHABLE = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _shared_cache(tmp_path_factory, monkeypatch):
    """The data tests share one cache (default_cache_dir reads $FORGE_CACHE_DIR)."""
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "forge-data-cache"))


def _check(spec_name: str, data_dir, *overrides: str):
    return data_sources(CheckContext(load_spec(SPECS / spec_name, list(overrides)), data_dir=data_dir))


def test_check_passes_on_the_tiny_spec_and_reports_counts(tmp_path):
    outcome = _check("tiny.toml", tmp_path)                 # an empty data root: the tiny spec needs none
    assert outcome.status == "pass", outcome.detail
    for name in ("stdlib_code", "pydoc_prose"):
        assert outcome.data[f"{name}/train_tokens"] > 50_000 and outcome.data[f"{name}/eval_tokens"] > 1_000
        assert outcome.data[f"{name}/share"] == 0.5 and f"{name}: " in outcome.detail
    assert "train tokens" in outcome.measured and "dropped" in outcome.detail


def test_check_fails_with_the_reason_when_files_are_missing(tmp_path):
    outcome = _check("local.toml", tmp_path)
    assert outcome.status == "fail" and "matches no file under the data root" in outcome.detail
    assert "FORGE_DATA_DIR" in outcome.detail


def test_check_fails_fast_on_a_hub_spec_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "empty-cache"))
    outcome = _check("phase1.toml", tmp_path)
    assert outcome.status == "fail" and "forge data pull" in outcome.detail and "tinystories" in outcome.detail


@pytest.mark.parametrize("spec_name", ["local.toml", "tiny_local.toml"])
def test_local_specs_verify_every_shared_source(spec_name, data_dir):
    spec = load_spec(SPECS / spec_name).spec
    assert [s.name for s in spec.data.sources] == [s.name for s in load_spec(SPECS / "phase1.toml").spec.data.sources]
    assert all(s.type == "local" for s in spec.data.sources)
    outcome = _check(spec_name, data_dir)
    assert outcome.status == "pass", outcome.detail
    for source in spec.data.sources:
        assert outcome.data[f"{source.name}/train_kept"] > 0 and outcome.data[f"{source.name}/eval_docs"] > 0
        assert abs(outcome.data[f"{source.name}/share"] - source.weight) <= 0.02
    assert outcome.data["gsm8k/train_documents"] == 1300                     # the official splits, as the README says
    assert outcome.data["wikipedia/train_documents"] == 60


def test_tiny_spec_needs_neither_shared_data_nor_network_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_spec(SPECS / "tiny.toml").spec
    builds = []
    for n in range(2):                                      # two cold builds, in separate caches
        builds.append(build_data(spec.data, vocab_size=spec.model.vocab_size, seed=spec.run.seed,
                                 data_dir=tmp_path / "no-data", cache_dir=tmp_path / f"cache{n}"))
    a, b = builds
    assert a.tokenizer.inner.get_vocab() == b.tokenizer.inner.get_vocab()
    batch_a, batch_b = a.train_loader().next_batch(0), b.train_loader().next_batch(0)
    assert torch.equal(batch_a[0], batch_b[0]) and torch.equal(batch_a[1], batch_b[1])
    assert torch.equal(a.eval_batches("pydoc_prose")[0].idx, b.eval_batches("pydoc_prose")[0].idx)


def test_data_stats_command(tmp_path):
    from typer.testing import CliRunner

    from forge.cli_data import app

    result = CliRunner().invoke(app, ["stats", str(SPECS / "tiny.toml"), "--json", "--batches", "5",
                                      "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["name"] for s in report["sources"]] == ["stdlib_code", "pydoc_prose"]
    assert report["mixture"]["batches"] == 5 and report["mixture"]["loader_ms_per_batch"] > 0
    table = CliRunner().invoke(app, ["stats", str(SPECS / "tiny.toml"), "--data-dir", str(tmp_path)])
    assert table.exit_code == 0 and "pydoc_prose" in table.output and "ms per batch" in table.output
