"""The probes in a real run: forge train (tiny spec, async checkpoints) writes samples at every evaluation
and heatmaps at the configured steps only; forge report shows probes, samples, the ACT histogram and the
heatmaps (the HTML page embeds them); forge sample generates from the run's checkpoint."""
from __future__ import annotations

import json

import pytest

from conftest import SPECS
from forge.train import checkpoint as ckpt
from forge.train.metrics_log import read_metrics
from forge.train.run_dir import RunDir

RUN = ["train.eval_every=2", "logging.every=2", "checkpoint.every=2", "checkpoint.async_save=true",
       "merge_preview.every=8", "data.eval.max_batches=1", "logging.wandb.mode=disabled",
       "probes.heatmap_steps=[2]", "probes.sample_new_tokens=12"]
PROBE_METRICS = ("valid/reasoning_accuracy", "valid/long_range_acc", "valid/short_range_acc",
                 "eval/position_accuracy", "eval/position_accuracy/d10", "eval/position_accuracy/d100",
                 "eval/position_accuracy/d1000", "eval/attn/entropy", "eval/attn/sink_count", "eval/attn/rope_norm",
                 "valid/halt/share_step0", "valid/halt/share_step2", "eval/sample_avg_steps")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 4-step run, shared by the tests of this module."""
    import os

    from forge.cli import main

    cwd = tmp_path_factory.mktemp("probes-run")
    old_cwd, old_cache = os.getcwd(), os.environ.get("FORGE_CACHE_DIR")
    os.environ["FORGE_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "forge-cache")
    os.chdir(cwd)
    try:
        with pytest.raises(SystemExit) as done:
            main(["train", str(SPECS / "tiny.toml"), "--force", "--run-id", "probed", "--max-steps", "4",
                  *[x for a in RUN for x in ("--set", a)]])
        assert done.value.code in (0, None)
    finally:
        os.chdir(old_cwd)
        if old_cache is None:
            os.environ.pop("FORGE_CACHE_DIR")
        else:
            os.environ["FORGE_CACHE_DIR"] = old_cache
    return cwd, RunDir(cwd / "runs" / "probed")


def test_probe_metrics_are_logged_at_every_evaluation(trained):
    _, run = trained
    evals = [r for r in read_metrics(run.metrics_path) if "valid/perplexity" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        missing = [m for m in PROBE_METRICS if m not in record]
        assert not missing, missing
        assert sum(v for k, v in record.items() if k.startswith("valid/halt/share_step")) == pytest.approx(1.0)
    assert "attn/rope_norm" in read_metrics(run.metrics_path)[0]      # training logging steps too


def test_samples_every_evaluation_and_heatmaps_only_at_configured_steps(trained):
    import matplotlib.image

    _, run = trained
    samples = [json.loads(line) for line in (run.path / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["source"]) for s in samples] == [(2, "stdlib_code"), (2, "pydoc_prose"),
                                                            (4, "stdlib_code"), (4, "pydoc_prose")]
    assert all(0 < s["tokens"] <= 12 and s["prompt"] for s in samples)
    assert sorted(p.name for p in (run.path / "heatmaps").iterdir()) == ["step-0000002"]
    pngs = sorted((run.path / "heatmaps" / "step-0000002").glob("*.png"))
    assert len(pngs) == (2 + 1) * 4                            # (backbone + refiner layers) x heads
    assert matplotlib.image.imread(pngs[0]).shape[:2] == (128, 128)   # probes.heatmap_seq_len


def test_async_checkpoints_of_the_run_are_valid(trained):
    _, run = trained
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(run.checkpoints)] == [2, 4]
    assert all(ckpt.verify(p) is None for p in ckpt.list_checkpoints(run.checkpoints))
    assert not list(run.checkpoints.glob(".tmp-*"))


def test_report_shows_probes_samples_histogram_and_heatmaps(trained, run_cli):
    cwd, run = trained
    code, out, err = run_cli("report", "probed", "--html", cwd=cwd)
    assert code == 0, err
    for text in ("probes (at evaluations)", "valid/reasoning_accuracy", "valid/long_range_acc",
                 "eval/position_accuracy/d1000", "ACT halting histogram", "samples at step 4", "heatmaps_step-0000002.png",
                 "act_histogram.png"):
        assert text in out, text
    page = (run.path / "report.html").read_text()
    assert "<h2>Samples at step 4</h2>" in page and "valid/long_range_acc" in page
    assert 'alt="heatmaps_step-0000002"' in page and 'alt="act_histogram"' in page


def test_forge_sample_is_seeded_and_respects_max_tokens(trained, run_cli):
    cwd, _ = trained
    args = ("sample", "probed", "--prompt", "def ", "--n", "2", "--max-tokens", "9", "--seed", "5", "--json")
    code, out, err = run_cli(*args, cwd=cwd)
    assert code == 0, err
    first = json.loads(out)
    assert first["step"] == 4 and len(first["samples"]) == 2 and 1 <= first["avg_steps"] <= first["t_max"]
    assert json.loads(run_cli(*args, cwd=cwd)[1])["samples"] == first["samples"]
    uncached = json.loads(run_cli(*args, "--no-cache", cwd=cwd)[1])
    assert uncached["samples"] == first["samples"]
    full = json.loads(run_cli(*args, "--full-depth", "--step", "2", cwd=cwd)[1])
    assert full["avg_steps"] == full["t_max"] and full["step"] == 2
    skipping = json.loads(run_cli(*args, "--skip-halted", cwd=cwd)[1])
    assert len(skipping["samples"]) == 2 and 1 <= skipping["avg_steps"] <= skipping["t_max"]
    code, _, err = run_cli(*args, "--skip-halted", "--no-cache", cwd=cwd)
    assert code == 2 and "--skip-halted needs the cached decoder" in err
    code, _, err = run_cli("sample", "probed", "--step", "3", cwd=cwd)
    assert code == 2 and "kept steps: 2, 4" in err
