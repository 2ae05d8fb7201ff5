"""forge in the ecosystem its users live in: the first hour (help, completion, README commands, what a run
prints), the HF-loadable export, W&B as W&B users expect it, TensorBoard, `forge runs`."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, SPECS
from forge.train.metrics_log import read_metrics

# a short run: a log every 3 steps (windows of 3), evaluation and checkpoints every 3, one eval batch per source
SHORT = ["train.eval_every=3", "logging.every=3", "checkpoint.every=3", "data.eval.max_batches=1"]


def _sets(assignments):
    return [x for a in assignments for x in ("--set", a)]


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "forge-cache"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real run for the tests below: 6 steps of specs/tiny.toml, W&B offline with checkpoint artifacts,
    TensorBoard, attention heatmaps at step 3. Returns (run dir, stdout)."""
    from forge.cli import main

    cwd = tmp_path_factory.mktemp("tiny-run")
    out, here = io.StringIO(), os.getcwd()
    env = {"FORGE_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "forge-cache")}
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in [k for k in os.environ if k.startswith("WANDB_")]:
            mp.delenv(k)
        os.chdir(cwd)
        try:
            main(["train", str(SPECS / "tiny.toml"), "--force", "--max-steps", "6", "--run-id", "t",
                  *_sets([*SHORT, "logging.tensorboard=true", "logging.wandb.log_checkpoints=true",
                          "probes.heatmap_steps=[3]"])])
        finally:
            os.chdir(here)
    assert done.value.code in (0, None), out.getvalue()
    return cwd / "runs" / "t", out.getvalue()


def _help(*command: str) -> str:
    from forge.cli import _register_groups, app

    _register_groups()
    result = CliRunner().invoke(app, [*command, "--help"], prog_name="forge", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())   # unwrapped


def test_help_shows_the_defaults_written_in_brackets():
    """Rich markup used to eat `[default: ...]` ("Run id ."); help is plain text now, brackets kept."""
    assert "Run id [default: <name>-<date>-<hex>]." in _help("train")
    sample = _help("sample")
    assert "0 = greedy [default: probes.sample_temperature]." in sample
    assert "Checkpoint step [default: newest valid]." in sample
    assert "[default: $FORGE_DATA_DIR or data/]" in _help("data", "stats")


def test_shell_completion_is_enabled():
    from forge.cli import _register_groups, app

    _register_groups()
    assert "--install-completion" in _help()
    env = {"_FORGE_COMPLETE": "complete_bash", "COMP_WORDS": "forge tr", "COMP_CWORD": "1"}
    result = CliRunner().invoke(app, [], prog_name="forge", env=env)
    assert result.output.split() == ["train"]
    env = {"_FORGE_COMPLETE": "complete_bash", "COMP_WORDS": "forge spec s", "COMP_CWORD": "2"}
    assert CliRunner().invoke(app, [], prog_name="forge", env=env).output.split() == ["show", "schema"]


def test_every_file_the_readme_names_ships_or_is_written_by_a_readme_command():
    readme = (REPO / "README.md").read_text()
    for name in sorted(set(re.findall(r"\b(?:specs|checklists)/[\w./-]+\.(?:toml|json)\b", readme))):
        if (REPO / name).is_file():
            continue
        written = re.fullmatch(r"specs/(?:patches/)?(\w+)\.r\d+\.(?:toml|json)", name)   # a recorded patch:
        assert written and (SPECS / f"{written.group(1)}.toml").is_file(), name
        stem = written.group(1)     # written by forge diagnose --apply, or by a heal of a run of that spec
        assert (f"forge diagnose {stem} --apply" in readme
                or re.search(rf"forge train specs/{stem}\.toml [^\n]*--heal", readme)), name


def test_the_readme_sick_spec_is_refused_for_d1(run_cli, tmp_path):
    code, out, _ = run_cli("check", str(SPECS / "sick.toml"), "--json", cwd=tmp_path)
    failed = [i["id"] for i in json.loads(out)["items"] if i["status"] == "fail"]
    assert code == 1 and failed == ["D1-grokfast"]


def test_train_start_and_events_are_announced_in_the_plain_log(tiny_run):
    """Output from the first second (the checklist's line before it runs), the checklist in one line, then every
    evaluation and checkpoint on a line of its own; the step line shows cross-entropy beside the total."""
    _, out = tiny_run
    lines = out.splitlines()
    assert lines[0].startswith("checking ") and "checklist" in lines[0]
    assert re.match(r"checklist tiny (passed|failed \(--force: launching anyway\)) in [\d.]+ s: pass \d+", lines[1])
    for step in (3, 6):
        assert any(re.match(rf"eval step {step}: valid ppl [\d.]+  bpb [\d.]+", line) for line in lines), out
        assert any(line.startswith(f"checkpoint step {step}: wrote ") for line in lines), out
    step_line = next(line for line in lines if line.startswith("step 6/6"))
    assert re.search(r"loss [\d.]+  ce [\d.]+  tok/s [\d,]+  val bpb [\d.]+", step_line), step_line


def test_every_file_of_a_run_has_the_same_mode(tiny_run):
    """safetensors wrote model.safetensors 0600; everything in a run is 0666 less the umask, like open() gives."""
    run, _ = tiny_run
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in run.rglob("*") if p.is_file() and "wandb" not in p.parts and p.name != ".lock"]
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.relative_to(run).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
            if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask} == {}


def test_logged_losses_are_window_means_and_the_last_value_is_kept(tmp_path):
    """With logging.every = 3 the logged loss/* is the mean of the window's three step values (those a run that
    logs every step records) and loss/*_last the logging step's own value."""
    from forge.spec.load import load_spec
    from forge.train.components import build_components
    from forge.train.live import LiveView
    from forge.train.loop import Trainer
    from forge.train.metrics_log import MetricsLog
    from forge.train.monitors import MonitorSet
    from forge.train.run_dir import RunDir

    def records(every: int) -> dict[int, dict]:
        resolved = load_spec(SPECS / "tiny.toml", [*SHORT, "train.eval_every=100", f"logging.every={every}",
                                                   "logging.wandb.mode=disabled", "merge_preview.enabled=false"])
        run = RunDir.create(tmp_path / "runs", f"every{every}")
        live = LiveView(run.run_id, 0, 6, tty=False, quiet=True)
        log = MetricsLog(run.metrics_path, resolved.spec, run.run_id, run.path, {}, live.warn)
        Trainer(resolved, run, build_components(resolved.spec, tmp_path), live, log, MonitorSet([])).run_until(6)
        log.close()
        return {r["step"]: r for r in read_metrics(run.metrics_path)}

    each, windowed = records(1), records(3)
    assert sorted(windowed) == [3, 6]
    losses = [k for k in windowed[6] if k.startswith("loss/") and not k.endswith("_last")]
    assert {"loss/total", "loss/ce", "loss/step_0"} <= set(losses)
    for step in (3, 6):
        for key in losses:
            mean = sum(each[s][key] for s in range(step - 2, step + 1)) / 3
            assert windowed[step][key] == pytest.approx(mean, rel=1e-5), (step, key)
            assert windowed[step][f"{key}_last"] == pytest.approx(each[step][key], rel=1e-5), (step, key)
        assert windowed[step]["loss/total"] != pytest.approx(windowed[step]["loss/total_last"], rel=1e-7)


def test_a_loss_window_skips_non_finite_steps_and_survives_a_checkpoint():
    import torch

    from forge.train.loop import LossWindow

    window = LossWindow()
    for value in (2.0, float("nan"), 4.0):
        window.add({"loss/total": torch.tensor(value)})
    restored = LossWindow()
    restored.load_state_dict(window.state_dict(), torch.device("cpu"))
    out = restored.pop({"loss/total": torch.tensor(4.0)})
    assert float(out["loss/total"]) == 3.0 and float(out["loss/total_last"]) == 4.0
    window = LossWindow()
    window.add({"loss/total": torch.tensor(float("inf"))})
    assert torch.isnan(window.pop({"loss/total": torch.tensor(float("inf"))})["loss/total"])


def test_export_is_a_folder_hf_tools_load_and_reproduces_the_run_logits(tiny_run, run_cli):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    from forge.model import load_export
    from forge.probes.from_run import load_run_model

    run, _ = tiny_run
    out = run.parent.parent / "export-3"
    code, stdout, err = run_cli("export", "t", str(out), "--step", "3", cwd=run.parent.parent)
    assert code == 0 and str(out) in stdout, err
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.safetensors", "config.json", "tokenizer.json",
                                                            "tokenizer_config.json", "special_tokens_map.json",
                                                            "spec.toml", "README.md"])
    # the tokenizer loads in transformers with eos and pad declared, and encodes as the run's tokenizer does
    exported = load_export(out)
    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert (tok.eos_token, tok.pad_token) == ("<|eos|>", "<|pad|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (exported.tokenizer.eos_id, exported.tokenizer.pad_id)
    text = "def forge(x):\n    return x + 1  # the export"
    assert tok(text)["input_ids"] == exported.tokenizer.encode(text)
    # the weights: named tensors for safetensors, metadata that says what they are
    assert "tok_emb.weight" in load_file(str(out / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    lineage = json.loads((run / "lineage.json").read_text())
    assert meta["step"] == "3" and meta["spec_hash"] == lineage["spec_hash"] and meta["forge_version"]
    assert meta["tied_weights"] == "lm_head.weight=tok_emb.weight"
    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 3 and config["vocab_size"] == 2048 and config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == exported.tokenizer.eos_id
    # the logits of the run's own checkpoint at step 3, exactly
    _, model, _, step = load_run_model(run, 3)
    idx = torch.tensor([exported.tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.equal(exported.model(idx).logits, model(idx).logits) and step == 3
        newest = load_run_model(run)[1](idx).logits
    assert not torch.equal(newest, model(idx).logits)   # step 6 differs: --step chose the checkpoint
    card = (out / "README.md").read_text()
    assert "| parameter budget | 830,084 |" in card and "valid bits per byte" in card
    # into a folder that holds something: refused, nothing written
    code, _, err = run_cli("export", "t", str(out), cwd=run.parent.parent)
    assert code == 2 and "not an empty directory" in err


# ------------------------------------------------------------------------------------------------ W&B
def wandb_records(path: Path):
    """The records of an offline run's .wandb file, parsed with W&B's own protobuf schema. The file is W&B's
    LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last; a block tail under 7 bytes is
    padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pb.Record.FromString(buf)
        if kind in (0, 1, 4):
            buf = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_is_what_a_wandb_user_expects(tiny_run):
    import subprocess
    import sys

    run, _ = tiny_run
    (offline,) = (run / "wandb").glob("offline-run-*-t")
    records = list(wandb_records(offline / "run-t.wandb"))
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    lineage = json.loads((run / "lineage.json").read_text())
    assert (meta.run_id, meta.display_name, meta.run_group, meta.job_type) == ("t", "t", "tiny", "train")
    assert f"spec:{lineage['spec_hash'][:12]}" in meta.tags
    config = {c.key: json.loads(c.value_json) for c in meta.config.update}
    assert config["optim"]["grokfast"]["lam"] == 0.3 and config["lineage"]["spec_hash"] == lineage["spec_hash"]
    assert "logging.every=3" in config["lineage"]["overrides"]
    rows = {r.history.step.num: {_key(i): i for i in r.history.item} for r in records
            if r.WhichOneof("record_type") == "history"}
    assert sorted(rows) == [3, 6]
    for step, row in rows.items():
        assert json.loads(row["loss/total"].value_json) > 0 and "loss/total_last" in row
        assert "config/param_count" not in row      # a constant: the summary's, not a time series
        kinds = {k.rsplit("/", 1)[0]: json.loads(row[k].value_json) for k in row if k.endswith("/_type")}
        images = {k for k, kind in kinds.items() if kind == "image-file"}
        tables = {k for k, kind in kinds.items() if kind == "table-file"}
        assert {"plots/valid_bpb", "plots/act_histogram", "plots/loss_per_step"} <= images, sorted(images)
        assert {"report/success_criteria", "act/halting_histogram", "probes/samples"} <= tables, sorted(tables)
    assert "probes/attention_heatmaps/_type" in rows[3] and "probes/attention_heatmaps/_type" not in rows[6]
    summary = {_key(u) for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    assert "config/param_count" in summary
    models = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
    assert sorted(a for m in models for a in m.aliases if a.startswith("step-")) == ["step-3", "step-6"]
    assert all(m.name == "t-model" for m in models)
    # W&B's own CLI finds the run to sync
    wandb_cli = Path(sys.executable).with_name("wandb")
    done = subprocess.run([str(wandb_cli), "sync", "--dry-run", str(offline)], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert done.returncode == 0 and f"{offline.name}/run-t.wandb" in done.stdout + done.stderr


def test_wandb_settings_take_the_spec_as_defaults_and_the_environment_wins():
    from forge.spec.load import load_spec
    from forge.train.mirrors import wandb_settings

    spec = load_spec(SPECS / "tiny.toml", ["logging.wandb.tags=[\"ablation\"]"]).spec
    plain = wandb_settings(spec.logging.wandb, "r1", "tiny", Path("/runs/r1"), "ab" * 32, env={})
    assert plain == {"mode": "offline", "id": "r1", "resume": "allow", "dir": "/runs/r1", "project": "agent-forge-v2",
                     "entity": None, "name": "r1", "group": "tiny", "job_type": "train",
                     "tags": ["spec:abababababab", "ablation"]}
    env = {"WANDB_MODE": "online", "WANDB_DIR": "/elsewhere", "WANDB_PROJECT": "p", "WANDB_ENTITY": "team",
           "WANDB_NAME": "mine", "WANDB_RUN_GROUP": "sweep-3", "WANDB_JOB_TYPE": "eval", "WANDB_TAGS": "a, b"}
    assert wandb_settings(spec.logging.wandb, "r1", "tiny", Path("/runs/r1"), "ab" * 32, env=env) == {
        "mode": "online", "id": "r1", "resume": "allow", "dir": "/elsewhere", "project": "p", "entity": "team",
        "name": "mine", "group": "sweep-3", "job_type": "eval", "tags": ["spec:abababababab", "ablation", "a", "b"]}
    assert wandb_settings(spec.logging.wandb, "r1", "tiny", Path("/r"), "", env={"WANDB_MODE": "disabled"}) is None
    assert wandb_settings(spec.logging.wandb, "r1", "tiny", Path("/r"), "", env={"WANDB_DISABLED": "true"}) is None
    off = load_spec(SPECS / "tiny.toml", ["logging.wandb.mode=disabled"]).spec.logging.wandb
    assert wandb_settings(off, "r1", "tiny", Path("/r"), "", env={"WANDB_MODE": "offline"})["mode"] == "offline"


def test_wandb_failures_are_kept_in_warnings_jsonl_and_the_run_goes_on(tmp_path, monkeypatch):
    from forge.spec.load import load_spec
    from forge.train.metrics_log import MetricsLog
    from forge.train.run_dir import RunDir

    spec = load_spec(SPECS / "tiny.toml").spec
    run = RunDir.create(tmp_path / "runs", "f")
    monkeypatch.setenv("WANDB_MODE", "ofline")   # a typo: wandb.init refuses it
    shown = []
    log = MetricsLog(run.metrics_path, spec, "f", run.path, {"spec_hash": "0" * 64}, shown.append)
    log.log(1, {"loss/total": 3.0})
    log.close()
    assert log.mirrors == [] and read_metrics(run.metrics_path) == [{"step": 1, "loss/total": 3.0}]
    (warning,) = run.warnings()
    assert warning["id"] == "OBS-wandb" and "W&B could not start" in warning["measured"] and shown
    # WANDB_MODE=disabled: nothing written, no warning
    monkeypatch.setenv("WANDB_MODE", "disabled")
    quiet = RunDir.create(tmp_path / "runs", "q")
    MetricsLog(quiet.metrics_path, spec, "q", quiet.path, {}, shown.append).close()
    assert not quiet.warnings() and not [p for p in quiet.path.rglob("*") if "wandb" in p.name]


def test_wandb_tags_follow_the_warnings(tmp_path, monkeypatch):
    from forge.spec.load import load_spec
    from forge.train.metrics_log import MetricsLog
    from forge.train.run_dir import RunDir

    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    spec = load_spec(SPECS / "tiny.toml").spec
    run = RunDir.create(tmp_path / "runs", "g")
    log = MetricsLog(run.metrics_path, spec, "g", run.path, {"spec_hash": "c" * 64}, print)
    log.tag("D1-grad-ema-ratio")
    log.log(1, {"loss/total": 3.0})
    log.close()
    (offline,) = (run.path / "wandb").glob("offline-run-*-g")
    tags = [list(r.run.tags) for r in wandb_records(offline / "run-g.wandb") if r.WhichOneof("record_type") == "run"]
    assert tags[-1] == ["spec:cccccccccccc", "D1-grad-ema-ratio"], tags


# ------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_without_its_package_is_a_recorded_warning(tmp_path, monkeypatch):
    import sys

    from forge.spec.load import load_spec
    from forge.train.metrics_log import MetricsLog
    from forge.train.run_dir import RunDir

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if tensorboard were not installed
    spec = load_spec(SPECS / "tiny.toml", ["logging.tensorboard=true", "logging.wandb.mode=disabled"]).spec
    run = RunDir.create(tmp_path / "runs", "tb")
    shown = []
    log = MetricsLog(run.metrics_path, spec, "tb", run.path, {}, shown.append)
    log.log(1, {"loss/total": 3.0})
    log.close()
    (warning,) = run.warnings()
    assert warning["id"] == "OBS-tensorboard" and "TensorBoard could not start" in warning["measured"] and shown
    assert read_metrics(run.metrics_path) == [{"step": 1, "loss/total": 3.0}]


def test_tensorboard_gets_the_scalars_images_and_tables(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = tiny_run
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    logged = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert [e.step for e in events.Scalars("loss/total")] == [3, 6]
    assert events.Scalars("loss/ce")[-1].value == pytest.approx(logged[6]["loss/ce"], rel=1e-6)
    assert "config/param_count" not in tags["scalars"]
    assert {"plots/valid_bpb", "plots/act_histogram", "probes/attention_heatmaps"} <= set(tags["images"])
    assert {"report/success_criteria/text_summary", "probes/samples/text_summary"} <= set(tags["tensors"])


# ------------------------------------------------------------------------------------------------ forge runs
def test_runs_shows_live_step_stop_reason_spec_hash_and_overrides(tiny_run, tmp_path, run_cli, capsys):
    import shutil

    from forge import ui
    from forge.train.run_dir import write_json

    run, _ = tiny_run
    lineage = json.loads((run / "lineage.json").read_text())
    root = tmp_path / "runs"
    for name, status in (("stopped", {"status": "finished", "step": 6}), ("live", {"status": "running", "step": 3}),
                         ("done", {"status": "finished", "step": 6})):
        (root / name).mkdir(parents=True)
        for f in ("lineage.json", "metrics.jsonl", "spec.toml"):
            shutil.copy(run / f, root / name)
        write_json(root / name / "status.json", {**status, "updated": name})
    spec = root / "done" / "spec.toml"
    spec.write_text(spec.read_text().replace("max_steps = 300", "max_steps = 6"))   # ran its whole schedule
    code, out, _ = run_cli("runs", "--json", "--output-dir", str(root))
    rows = {r["run_id"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["stopped"]["shown_status"] == "stopped at --max-steps" and rows["stopped"]["max_steps"] == 300
    assert rows["done"]["shown_status"] == "finished"
    assert rows["live"]["step"] == 6 and rows["live"]["shown_status"] == "running"  # the last logged step, not 3
    assert rows["live"]["spec_hash"] == lineage["spec_hash"][:12] and "logging.every=3" in rows["live"]["overrides"]
    code, out, _ = run_cli("runs", "--output-dir", str(root))
    flat = " ".join(out.split())
    assert "stopped at --max-steps" in flat and lineage["spec_hash"][:12] in flat and "6/300" in flat
    # --watch redraws until Ctrl-C
    calls = {"n": 0}

    def read_rows():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return list(rows.values())

    ui.watch_runs(read_rows, root, 0.01)
    assert capsys.readouterr().out.count(f"runs in {root}") == 2


# ------------------------------------------------------------------------------------------------ hub data
@pytest.mark.parametrize("hub_bytes, streamed", [(1000, False), (10**12, True)])
def test_hub_pull_uses_the_hf_cache_streams_past_the_budget_and_records_the_commit(tmp_path, monkeypatch,
                                                                                   hub_bytes, streamed):
    """The network parts (commit lookup, file sizes, the hub's rows) are replaced by local tables; what forge
    asks `datasets` for, the saved copy, pulled.json and the lineage record are the real code."""
    import datasets

    import forge.data.sources as sources
    from forge.spec.data import HubSource

    rows = {"train": {"question": ["q1", "q2"], "answer": ["a1", "a2"]}, "test": {"question": ["t1"], "answer": ["b1"]}}
    sha = "c0ffee" * 6 + "beef"
    asked = []

    def load_dataset(name, config, split, revision, **kwargs):
        asked.append(kwargs)
        table = datasets.Dataset.from_dict(rows[split])
        return table.to_iterable_dataset() if kwargs.get("streaming") else table

    monkeypatch.setattr(sources, "_hub_revision", lambda source, cache_dir: sha)
    monkeypatch.setattr(sources, "_hub_bytes", lambda source, revision: hub_bytes)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("FORGE_HF_CACHE_BUDGET_GB", "1")
    source = HubSource(name="gsm", weight=1.0, type="hub", dataset="openai/gsm8k", config="main", split="train",
                       eval_split="test", text_field="question")
    info = sources.pull_hub_source(source, tmp_path)
    assert info["streamed"] is streamed and info["splits"] == {"train": 2, "test": 1} and info["sha"] == sha
    assert asked == ([{"streaming": True}] * 2 if streamed else [{"cache_dir": None}] * 2)  # None: the user's HF cache
    assert sources.open_source(source, tmp_path, tmp_path).train.batch(0, 5) == ["q1", "q2"]
    assert sources.hub_commits([source], tmp_path) == {"gsm": {"dataset": "openai/gsm8k", "config": "main",
                                                              "revision": None, "commit": sha}}


def test_the_report_shows_a_wandb_failure_kept_in_warnings_jsonl(tiny_run, tmp_path, run_cli):
    import shutil

    from forge.train.run_dir import RunDir

    run, _ = tiny_run
    copy = tmp_path / "runs" / "t"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("wandb", "checkpoints", "tensorboard"))
    RunDir(copy).append_warning({"step": 3, "id": "OBS-wandb", "title": "W&B failed",
                                 "measured": "W&B log failed (OSError: disk full); metrics go to metrics.jsonl only"})
    code, out, err = run_cli("report", "t", "--output-dir", str(tmp_path / "runs"))
    assert code == 0, err
    assert "warning OBS-wandb (step 3, 1x): W&B log failed (OSError: disk full)" in " ".join(out.split())
