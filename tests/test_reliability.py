"""Nothing lost, nothing poisoned (issue 14), one section per failure class it lists:
1 non-finite updates never reach a checkpoint; 2 resume walks back over checkpoints that do not load;
3 OS, encoding and size errors are a clean exit 2; 4 bad input writes nothing; 5 (test_checklist: no timed
assertion); 6 older run formats stay readable. benchmarks/fault_injection.py attacks the same at scale."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import SPECS
from forge.errors import ForgeError, SpecError
from forge.spec.load import load_spec
from forge.train import checkpoint as ckpt
from forge.train import launch
from forge.train.run_dir import RunDir

FAST = ["train.eval_every=4", "logging.every=2", "checkpoint.every=2", "checkpoint.keep_last_n=3",
        "merge_preview.enabled=false", "data.eval.max_batches=1", "logging.wandb.mode=disabled",
        "probes.enabled=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("forge-cache")


@pytest.fixture(autouse=True)
def shared_cache(cache, monkeypatch):
    monkeypatch.setenv("FORGE_CACHE_DIR", str(cache))


def new_run(cwd: Path, run_id: str, steps: int, *overrides: str) -> RunDir:
    """A tiny run trained `steps` steps in `cwd`/runs, recorded as forge train records it (launch.start without
    its checklist, which test_train covers)."""
    from forge.spec.render import resolved_toml

    resolved = load_spec(SPECS / "tiny.toml", [*FAST, f"run.output_dir={cwd / 'runs'}", *overrides])
    run = RunDir.create(cwd / "runs", run_id)
    run.lock()
    run.write("spec.toml", resolved_toml(resolved))
    run.write("lineage.json", launch.lineage(resolved, force=False))
    run.set_status("running", step=0, spec_hash=resolved.hash)
    result = launch.train(resolved, run, resume=False, max_steps=steps, data_dir=cwd, tty=False)
    assert result.status == "finished", result.message
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> RunDir:
    """A finished 4-step run with checkpoints at 2 and 4; tests work on copies (copy_run)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FORGE_CACHE_DIR", str(cache))
        return new_run(tmp_path_factory.mktemp("trained"), "r", 4)


def copy_run(run: RunDir, cwd: Path) -> RunDir:
    shutil.copytree(run.path, cwd / "runs" / run.run_id)
    (cwd / "runs" / run.run_id / ".lock").unlink(missing_ok=True)
    return RunDir(cwd / "runs" / run.run_id)


def snapshot_files(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and recompute its manifest entry: only content checks can catch it."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


# ------------------------------------------------------------------------- 1. non-finite updates
def test_inf_lr_never_reaches_weights_or_checkpoints_and_counters_agree(tmp_path):
    """optim.lr = inf (the issue's case; the schema now refuses it, so it is set on the live optimizer): each
    step is undone, the run stops as failed after max_nonfinite_in_a_row, every checkpoint holds finite
    weights that verify, skipped == non-finite steps, and a resume from the newest checkpoint works."""
    from forge.train.components import build_components
    from forge.train.evaluate import NonFiniteWeights
    from forge.train.live import LiveView
    from forge.train.loop import Trainer, restore
    from forge.train.metrics_log import MetricsLog
    from forge.train.monitors import MonitorSet

    resolved = load_spec(SPECS / "tiny.toml", [*FAST, "train.max_nonfinite_in_a_row=3"])
    parts = build_components(resolved.spec, tmp_path)
    run = RunDir.create(tmp_path / "runs", "inf")
    live = LiveView("inf", 0, 12, tty=False, quiet=True)
    log = MetricsLog(run.metrics_path, resolved.spec, "inf", run.path, {}, live.warn)
    trainer = Trainer(resolved, run, parts, live, log, MonitorSet([]))
    assert trainer.run_until(2) == "finished"
    for group in parts.optimizer.param_groups:
        group["base_lr"] = float("inf")          # the schedule multiplies it into every later step's lr
    assert trainer.run_until(12) == "failed" and "3 consecutive non-finite steps" in trainer.stop_reason
    log.close()
    assert trainer.counters.nonfinite_total == parts.optimizer.skipped_steps == 3
    assert all(torch.isfinite(p).all() for p in parts.model.parameters())
    kept = ckpt.list_checkpoints(run.checkpoints)
    assert [ckpt.step_of(p) for p in kept] == [2, 4]
    assert all(ckpt.verify(p) is None for p in kept)
    fresh = build_components(resolved.spec, tmp_path)
    # step 3 still ran at the lr computed before the change; 4, 5 and 6 were undone; 4 was then checkpointed
    assert restore(fresh, kept[-1])[0].nonfinite_total == 1

    with torch.no_grad():
        next(parts.model.parameters())[0] = float("nan")   # evaluation and checkpoints refuse such weights
    with pytest.raises(NonFiniteWeights, match="non-finite weights"):
        trainer.evaluate(12)
    with pytest.raises(ckpt.CheckpointError, match="refusing to write"):
        ckpt.save_checkpoint(run.checkpoints, 12, parts.model, {}, {})
    assert not list(run.checkpoints.glob(".tmp-*"))


def test_resume_from_a_chosen_step_sets_the_later_checkpoints_aside(run_cli, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    samples = run.path / "samples.jsonl"
    with open(samples, "a") as f:            # records of the steps abandoned, and before: texts stay whole
        f.writelines(json.dumps({"step": s, "source": "code", "prompt": "def", "text": f"x{s}"}) + "\n"
                     for s in (2, 4))
    for s in (1, 4):
        run.append_warning({"step": s, "id": "C1-x", "title": f"warned at {s}", "measured": "0.1"})
    run.append_warning({"id": "OBS-wandb", "title": "no step"})
    code, out, err = run_cli("train", "--resume", "r", "--from-step", "2", "--max-steps", "3", cwd=tmp_path)
    assert code == 0, err
    assert "resumed r from step-0000002" in out
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(run.checkpoints)] == [2, 3]
    (aside,) = (run.path / "abandoned").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["step-0000004", "warnings.jsonl"]
    assert [w["title"] for w in map(json.loads, (aside / "warnings.jsonl").read_text().splitlines())] == \
        ["warned at 4"]                       # the abandoned steps' warnings: kept beside their checkpoints
    assert [w["title"] for w in run.warnings()][:2] == ["warned at 1", "no step"]   # then step 3's, if any
    assert {"step": 2, "source": "code", "prompt": "def", "text": "x2"} in \
        list(map(json.loads, samples.read_text().splitlines()))
    assert all(r["step"] <= 3 for r in map(json.loads, samples.read_text().splitlines()))
    assert max(r["step"] for r in map(json.loads, run.metrics_path.read_text().splitlines())) == 3
    code, _, err = run_cli("train", "--resume", "r", "--from-step", "7", cwd=tmp_path)
    assert code == 2 and "no checkpoint at step 7 (kept steps: 2, 3)" in err


# ------------------------------------------------------------------------- 2. checkpoints that do not load
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight


def _nan_weights(path: Path) -> bytes:
    from safetensors.torch import load_file, save

    weights = load_file(str(path / "model.safetensors"))
    next(t for t in weights.values() if t.is_floating_point()).view(-1)[0] = float("nan")
    return save(weights)


CORRUPTIONS = {   # each passes the checksum test (the manifest is rewritten to match)
    "truncated_weights": lambda p: rewrite(p, "model.safetensors", (p / "model.safetensors").read_bytes()[:200]),
    "garbage_meta": lambda p: rewrite(p, "meta.json", b"\x00garbage{"),
    "meta_of_another_step": lambda p: rewrite(p, "meta.json", b'{"step": 1}'),
    "empty_manifest": lambda p: (p / ckpt.MANIFEST).write_text('{"files": {}}'),
    "nan_weights": lambda p: rewrite(p, "model.safetensors", _nan_weights(p)),
    "state_not_a_pickle": lambda p: rewrite(p, "state.pt", b"PK\x03\x04 not a torch file"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_verify_checks_content_and_latest_valid_walks_back(tmp_path, kind):
    older = ckpt.save_checkpoint(tmp_path, 1, Tied(), {"m": torch.ones(2)}, {})
    newest = ckpt.save_checkpoint(tmp_path, 2, Tied(), {"m": torch.ones(2)}, {})
    CORRUPTIONS[kind](newest)
    assert ckpt.verify(newest) is not None
    lines = []
    assert ckpt.latest_valid(tmp_path, report=lines.append) == older
    assert len(lines) == 1 and lines[0].startswith("skipping checkpoint step-0000002: ")


def test_prune_never_deletes_the_newest_healthy_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, Tied(), {}, {})
    for step in (3, 4):
        CORRUPTIONS["nan_weights"](tmp_path / ckpt.step_dir_name(step))
    ckpt.prune(tmp_path, keep_last_n=1)
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [2, 3, 4]
    assert ckpt.latest_valid(tmp_path, report=lambda _: None) == tmp_path / "step-0000002"


def test_resume_sample_and_diagnose_skip_bad_checkpoints_and_stray_directories(run_cli, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    CORRUPTIONS["truncated_weights"](run.checkpoints / "step-0000004")
    (run.checkpoints / "step-0000002.bak").mkdir()
    (run.checkpoints / "notes.txt").write_text("mine")
    code, out, err = run_cli("sample", "r", "--max-tokens", "2", "--json", cwd=tmp_path)
    assert code == 0 and json.loads(out)["step"] == 2, err
    code, out, err = run_cli("diagnose", "r", "--json", cwd=tmp_path)
    assert code in (0, 1) and json.loads(out)["run_id"] == "r", err
    code, out, err = run_cli("train", "--resume", "r", "--max-steps", "4", cwd=tmp_path)
    assert code == 0, err
    assert out.count("skipping checkpoint step-0000004: model.safetensors does not load") == 1
    assert "ignoring" in out and "step-0000002.bak: not a checkpoint" in out
    assert "resumed r from step-0000002" in out and run.status()["status"] == "finished"
    assert (run.checkpoints / "step-0000002.bak").is_dir() and ckpt.verify(run.checkpoints / "step-0000004") is None


# ------------------------------------------------------------------------- 3. OS, encoding and size errors
def test_spec_that_is_not_utf8_or_not_text_names_file_and_line(tmp_path):
    (tmp_path / "latin1.toml").write_bytes(b'extends = "x.toml"\n[run]\nname = "caf\xe9"\n')
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)))
    with pytest.raises(SpecError, match=r"latin1.toml:3: not UTF-8 text"):
        load_spec(tmp_path / "latin1.toml")
    with pytest.raises(SpecError, match=r"binary.toml:2: not UTF-8 text \(byte 128"):
        load_spec(tmp_path / "binary.toml")


@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "finite number"), ("optim.grokfast.lam=nan", "finite number"),
    ("optim.adamw.betas=[0.9, nan]", "finite number"), ("optim.qk_clip.tau=inf", "finite number"),
    ("run.seed=1180591620717411303424", "less than or equal to 9223372036854775807"),
    ("train.max_steps=1000000000000000000000000000000", "integer out of range"),
    ("data.batch_size=100000000000000000000", "integer out of range"),
])
def test_schema_rejects_non_finite_numbers_and_integers_beyond_int64(override, message):
    with pytest.raises(SpecError, match=message) as info:
        load_spec(SPECS / "tiny.toml", [override])
    assert info.value.problems[0].key.startswith(override.split("=")[0])


def test_a_model_beyond_memory_is_refused_before_allocation(run_cli, tmp_path):
    code, _, err = run_cli("check", str(SPECS / "tiny.toml"), "--set", "model.vocab_size=1000000000000",
                           cwd=tmp_path)
    assert code == 2 and "128,000,000,567,940 parameters" in err and "reduce model.vocab_size" in err


def test_output_dir_that_is_a_file_is_refused_before_the_checklist(run_cli, tmp_path):
    (tmp_path / "taken").write_text("")
    code, out, err = run_cli("train", str(SPECS / "tiny.toml"), "--set", "run.output_dir=taken/runs",
                             cwd=tmp_path)
    assert code == 2 and "taken is not a directory" in err and "B1" not in out   # no checklist ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_lock_that_is_a_directory_and_status_that_is_garbage(run_cli, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    (run.path / ".lock").mkdir()
    code, _, err = run_cli("train", "--resume", "r", cwd=tmp_path)
    assert code == 2 and ".lock: Is a directory" in err
    (run.path / ".lock").rmdir()
    shutil.copytree(run.path, tmp_path / "runs" / "other")
    (run.path / "status.json").write_bytes(b"\xff\xfe{")
    code, out, err = run_cli("runs", "--json", cwd=tmp_path)
    assert code == 0, err
    assert {r["run_id"]: r["status"] for r in json.loads(out)} == {"r": "unreadable", "other": "finished"}


def test_run_without_spec_exits_2_naming_the_path(run_cli, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    (run.path / "spec.toml").unlink()
    for command in ("diagnose", "report", "sample"):
        code, _, err = run_cli(command, "r", cwd=tmp_path)
        assert code == 2 and f"has no spec.toml ({Path('runs') / 'r' / 'spec.toml'})" in err, command


def test_full_disk_during_a_checkpoint_ends_cleanly(trained, tmp_path, monkeypatch):
    """The checkpoint write meets a real ENOSPC (its state.pt goes to /dev/full): exit-2 error naming the
    checkpoint and the free space, no temporary directory left, status failed, older checkpoints intact."""
    run = copy_run(trained, tmp_path)
    resolved, _ = launch.reopen("r", tmp_path / "runs", lock=False)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: real_save(obj, "/dev/full", **kw))
    with pytest.raises(ckpt.CheckpointError, match="could not write checkpoint .*step-0000006.*free") as info:
        launch.train(resolved, run, resume=True, max_steps=6, data_dir=tmp_path, tty=False)
    assert "Traceback" not in str(info.value)
    assert not [p for p in run.path.rglob("*") if p.name.startswith((".tmp", ".old"))]
    assert run.status()["status"] == "failed" and "could not write checkpoint" in run.status()["error"]
    assert ckpt.latest_valid(run.checkpoints) == run.checkpoints / "step-0000004"


# ------------------------------------------------------------------------- 4. nothing written on bad input
def test_refused_resume_writes_nothing(run_cli, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    for path in ckpt.list_checkpoints(run.checkpoints):
        CORRUPTIONS["empty_manifest"](path)
    before = snapshot_files(run.path)
    code, _, err = run_cli("train", "--resume", "r", cwd=tmp_path)
    assert code == 2 and "no checkpoint to resume from that loads (kept steps: 2, 4)" in err
    assert err.count("the manifest does not list") == 2
    assert snapshot_files(run.path) == before and run.status()["status"] == "finished"


def test_force_past_the_checklist_with_bad_data_leaves_no_run(run_cli, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.jsonl").write_bytes(b"")
    (tmp_path / "spec.toml").write_text(f'extends = "{SPECS / "tiny.toml"}"\n[[data.sources]]\nname = "e"\n'
                                        'weight = 1.0\ntype = "local"\nformat = "jsonl"\npaths = ["empty.jsonl"]\n')
    code, _, err = run_cli("train", "spec.toml", "--force", "--data-dir", "data", "--run-id", "bad", cwd=tmp_path)
    assert code == 2 and "empty.jsonl is empty" in err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------- 6. run formats
def test_an_older_run_format_is_migrated_and_a_newer_one_named(run_cli, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    (env,) = run.read("environment.json")
    run.write("environment.json", env)                        # format 1: one launch record, no run_format
    lineage = run.read("lineage.json")
    del lineage["run_format"]
    run.write("lineage.json", lineage)
    code, _, err = run_cli("train", "--resume", "r", "--max-steps", "5", cwd=tmp_path)
    assert code == 0, err
    assert len(run.launches()) == 2 and run.launches()[0] == env     # the resume appended its launch
    run.write("lineage.json", {**lineage, "run_format": 99})
    for command in (["diagnose", "r"], ["report", "r"], ["train", "--resume", "r"]):
        code, _, err = run_cli(*command, cwd=tmp_path)
        assert code == 2 and "run format 99" in err and "read it with forge 0.1.0" in err, command


def test_a_spec_this_forge_cannot_validate_names_the_run_format(run_cli, trained, tmp_path):
    """A run whose spec.toml lacks a section the schema now requires: resume refuses it by name (exit 2);
    diagnose and report read the records they need and still work."""
    run = copy_run(trained, tmp_path)
    text = (run.path / "spec.toml").read_text()
    (run.path / "spec.toml").write_text(text[: text.index("[merge_preview]")] + text[text.index("[probes]"):])
    code, _, err = run_cli("train", "--resume", "r", cwd=tmp_path)
    assert code == 2 and "the spec of run r (run format 2, written by forge 0.1.0)" in err
    assert "merge_preview: required key is missing" in err
    for command in ("diagnose", "report"):
        code, _, err = run_cli(command, "r", "--json", cwd=tmp_path)
        assert code in (0, 1, 3), (command, err)   # read, not refused (3: diagnose undecidable; 2 = bad input)


# ------------------------------------------------------------------------- 7. a resume tells what changed
def test_resume_names_what_changed_since_the_last_launch_and_records_it(run_cli, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    (first,) = run.launches()
    assert first["changes"] == [] and first["data"]["sources"]      # the data's fingerprints are recorded
    source = next(iter(first["data"]["sources"]))
    older = json.loads(json.dumps(first))                           # a launch on another commit, torch, data
    older["git"]["commit"], older["packages"]["torch"] = "0" * 40, "2.0.0"
    older["data"]["sources"][source]["input"] = "stale"
    run.write("environment.json", [older])
    code, out, err = run_cli("train", "--resume", "r", "--max-steps", "5", cwd=tmp_path)
    assert code == 0, err
    changes = run.launches()[-1]["changes"]
    assert "packages.torch: 2.0.0 -> " + first["packages"]["torch"] in changes
    assert f"data.sources.{source}.input: stale -> {first['data']['sources'][source]['input']}" in changes
    assert any(c.startswith("git.commit: 000000000000 -> ") for c in changes) == bool(first["git"]["commit"])
    for line in changes:
        assert f"changed since the last launch: {line}" in out
    code, out, err = run_cli("train", "--resume", "r", "--max-steps", "6", cwd=tmp_path)   # nothing changed
    assert code == 0 and "same code, environment and data as the last launch" in out, err
    assert run.launches()[-1]["changes"] == [] and len(run.launches()) == 3
