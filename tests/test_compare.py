"""forge compare at small size: the variants of specs/tiny.toml x --vary, both budgets, round-robin and
serial, an interrupted comparison resumed, bad --vary input refused with nothing written, and `forge report
A B` on the same view."""
from __future__ import annotations

import json

import pytest

from conftest import SPECS
from forge.compare.budget import Budget, steps_for_tokens, tokens_through
from forge.compare.plan import plan_variants
from forge.compare.run import Request, run_comparison
from forge.errors import SpecError
from forge.train import checkpoint as ckpt
from forge.train.metrics_log import read_metrics
from forge.train.run_dir import RunDir

TINY = SPECS / "tiny.toml"
# 4 x 64 = 256 tokens a step; an evaluation (a slice) every 2 steps, one held-out batch per source
SMALL = ["data.batch_size=4", "data.seq_len=64", "train.warmup_steps=1", "train.eval_every=2", "logging.every=2",
         "checkpoint.every=2", "data.eval.max_batches=1", "probes.enabled=false", "merge_preview.enabled=false",
         "logging.wandb.mode=disabled"]
VARY = ["optim.grokfast.enabled=true,false"]


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "forge-cache"))


def _sets(assignments):
    return [x for a in assignments for x in ("--set", a)]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A round-robin comparison at tokens=1024 (4 steps each) stopped after 2 slices, as Ctrl-C would stop it."""
    import os

    cwd = tmp_path_factory.mktemp("compare")
    here, cache = os.getcwd(), os.environ.get("FORGE_CACHE_DIR")
    os.environ["FORGE_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "forge-cache")
    os.chdir(cwd)
    try:
        outcome = run_comparison(Request([TINY], VARY, SMALL, "tokens=1024", comparison_id="c1", force=True,
                                         data_dir=cwd), max_slices=2)
    finally:
        os.chdir(here)
        if cache is None:
            os.environ.pop("FORGE_CACHE_DIR")
        else:
            os.environ["FORGE_CACHE_DIR"] = cache
    return cwd, outcome


def test_plan_is_the_cartesian_product_with_the_budget_applied():
    budget = Budget.parse("tokens=1000")
    variants = plan_variants([TINY], [*VARY, "optim.grokfast.lam=0.1,0.3"], SMALL, 2, budget.overrides)
    assert len(variants) == 2 * 2 * 2
    seed = plan_variants([TINY], VARY, SMALL, 1)[0].resolved.spec.run.seed     # the spec's run.seed
    assert variants[0].name == f"enabled-true_lam-0.1_seed{seed}"
    assert variants[-1].name == f"enabled-false_lam-0.3_seed{seed + 1}"
    assert variants[-1].overrides == ("optim.grokfast.enabled=false", "optim.grokfast.lam=0.3", f"run.seed={seed + 1}")
    spec = variants[0].resolved.spec
    assert spec.optim.grokfast.lam == 0.1 and spec.run.seed == seed and variants[-1].resolved.spec.run.seed == seed + 1
    assert spec.train.max_steps == 4                     # the fewest steps of 256 tokens that reach 1000
    assert len({v.resolved.hash for v in variants}) == 8


def test_token_arithmetic_follows_the_curriculum():
    spec = {"data": {"batch_size": 2, "seq_len": 16, "curriculum": [{"from_step": 3, "seq_len": 32}]}}
    assert tokens_through(spec, 3) == 3 * 2 * 16
    assert tokens_through(spec, 5) == 3 * 2 * 16 + 2 * 2 * 32
    assert steps_for_tokens(spec, 3 * 2 * 16 + 1) == 4 and steps_for_tokens(spec, 1) == 1


@pytest.mark.parametrize("vary, named", [(["optim.grokfast.enabledd=true,false"], "optim.grokfast.enabledd"),
                                         (["optim.grokfast.enabled=true,maybe"], "optim.grokfast.enabled"),
                                         (["optim.grokfast.lam"], "optim.grokfast.lam")])
def test_bad_vary_is_exit_2_naming_the_key_and_writes_nothing(run_cli, tmp_path, vary, named):
    code, out, err = run_cli("compare", str(TINY), *[x for v in vary for x in ("--vary", v)],
                             "--budget", "tokens=1000", cwd=tmp_path)
    assert code == 2, (out, err)
    assert named in err and "--vary" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_budget_and_nproc_are_refused(run_cli, tmp_path):
    code, _, err = run_cli("compare", str(TINY), "--vary", VARY[0], "--budget", "steps=3", cwd=tmp_path)
    assert code == 2 and "--budget" in err
    code, _, err = run_cli("compare", str(TINY), "--vary", VARY[0], "--budget", "tokens=1000", "--nproc", "2",
                           cwd=tmp_path)
    assert code == 2 and "--nproc" in err
    assert list(tmp_path.iterdir()) == []


def test_round_robin_takes_turns_and_stops_resumable(interrupted):
    cwd, outcome = interrupted
    assert outcome.status == "interrupted" and outcome.exit_code == 130
    record = json.loads((cwd / "runs" / "c1" / "comparison.json").read_text())
    assert record["status"] == "interrupted" and record["budget"] == {"kind": "tokens", "amount": 1024}
    # one slice (to the first evaluation, step 2) each: in turns, not one variant to its end
    assert [(v["name"], v["step"], v["status"]) for v in record["variants"]] == \
        [("enabled-true", 2, "interrupted"), ("enabled-false", 2, "interrupted")]
    for v in record["variants"]:
        run = RunDir(cwd / "runs" / v["run_id"])
        assert run.status()["status"] == "interrupted"
        assert (run.checkpoints / ckpt.step_dir_name(2)).is_dir()
        assert run.resolved_spec().spec.logging.wandb.group == "c1"      # one W&B group per comparison


def test_resume_finishes_every_variant_at_equal_tokens(interrupted, run_cli):
    cwd, _ = interrupted
    code, out, err = run_cli("compare", "--resume", "c1", "--data-dir", str(cwd), cwd=cwd)
    assert code == 0, (out, err)
    record = json.loads((cwd / "runs" / "c1" / "comparison.json").read_text())
    assert record["status"] == "finished"
    for v in record["variants"]:
        run = RunDir(cwd / "runs" / v["run_id"])
        assert run.status()["status"] == "finished" and run.status()["step"] == 4
        assert run.status()["tokens"] == v["tokens"] == 4 * 256          # the same tokens for every variant
        evals = [r["step"] for r in read_metrics(run.metrics_path) if "valid/bits_per_byte" in r]
        assert evals == [2, 4]                                            # continued, not restarted
    # the table: both variants ranked, the reference, the spec diff, per-source columns, step and token columns
    assert "enabled-true" in out and "enabled-false" in out and "reference" in out
    assert "optim.grokfast.enabled: true -> false" in out
    assert "stdlib_code bpb" in out and "pydoc_prose bpb" in out and "tokens" in out and "steps" in out
    page = (cwd / "runs" / "c1" / "comparison.html").read_text()
    assert page.count("<svg") == 2 and page.count("<polyline") == 4       # 2 runs x (tokens, seconds)
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")   # nothing fetched


def test_minutes_budget_serial_gives_each_variant_its_training_seconds(run_cli, tmp_path, monkeypatch):
    """Also: W&B offline, one W&B run per variant in the one process (not the first run returned again); --output-dir
    holds the comparison and its variants' runs."""
    import os

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    sets = [*SMALL[:-1], "logging.wandb.mode=offline"]
    out_dir = tmp_path / "elsewhere"
    code, out, err = run_cli("compare", str(TINY), "--vary", VARY[0], "--budget", "minutes=0.002", "--serial",
                             "--force", "--id", "m1", "--json", "--output-dir", str(out_dir), "--data-dir",
                             str(tmp_path), *_sets(sets), cwd=tmp_path)
    assert code == 0, (out, err)
    assert not (tmp_path / "runs").exists()
    for name in ("enabled-true", "enabled-false"):
        # W&B's default (return_previous) would hand the second variant the first one's run: no file of its own
        assert len(list((out_dir / f"m1-{name}" / "wandb").glob(f"offline-run-*-m1-{name}/run-m1-{name}.wandb"))) == 1
        # and each stays live to the end: the next variant's checklist (F1 starts an offline W&B run) must not
        # finish it, which would drop its later logs with an OBS-wandb warning
        warnings = [w for w in RunDir(out_dir / f"m1-{name}").warnings() if w["id"] == "OBS-wandb"]
        assert not warnings, warnings
    view = json.loads(out)
    record = json.loads((out_dir / "m1" / "comparison.json").read_text())
    assert record["order"] == "serial" and record["status"] == "finished"
    for v in record["variants"]:
        assert v["status"] == "finished" and v["train_seconds"] >= 0.12 and v["step"] >= 1
    assert [g["rank"] for g in view["ranking"]] == [1, 2] and view["reference"] == "enabled-true"
    ranked = [g["final_bits_per_byte"] for g in view["ranking"]]
    assert ranked == sorted(ranked)
    runs = {r["name"]: r for g in view["ranking"] for r in g["runs"]}
    assert {name: r["train_seconds"] for name, r in runs.items()} == \
        {v["name"]: v["train_seconds"] for v in record["variants"]}


def test_report_of_several_runs_uses_the_comparison_view(interrupted, run_cli):
    cwd, _ = interrupted
    ids = ["c1-enabled-true", "c1-enabled-false"]
    code, out, err = run_cli("report", *ids, "--html", cwd=cwd)
    assert code == 0, (out, err)
    assert "optim.grokfast.enabled: true -> false" in out and "steps" in out and "tokens" in out
    assert "stdlib_code bpb" in out
    page = (cwd / "runs" / ids[0] / "comparison.html").read_text()
    assert page.count("<svg") == 2
    code, out, _ = run_cli("report", *ids, "--json", cwd=cwd)
    view = json.loads(out)
    assert {r["run_id"] for g in view["ranking"] for r in g["runs"]} == set(ids)
    assert all(r["tokens"] > 0 and r["steps"] > 0 and r["per_source_final"] for g in view["ranking"]
               for r in g["runs"])
