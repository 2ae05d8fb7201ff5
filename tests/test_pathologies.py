"""The loop closes on real runs: three real pathological trainings of the tiny model (not synthetic
metric files), each diagnosed with the right failure mode, patched by `forge diagnose --apply`, and
trained again from the patched spec without the pathology.

    D1  Grokfast lam = 20: the slow gradient dominates          -> lam 0.1
    C1  ACT halt threshold 0.005: every token halts at step 0    -> threshold 0.7
    D2  Newton-Schulz k = 1: updates far from orthogonal          -> k 5
"""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import SPECS
from forge.spec.load import load_spec

# short runs: 40 steps, a log every 5, one evaluation at the end; cadences the tiny checklist accepts
SHORT = """
[train]
max_steps = 40
eval_every = 40

[logging]
every = 5

[logging.wandb]
mode = "disabled"

[data.eval]
max_batches = 1
"""

SCENARIOS = {
    "D1-grokfast-over-amplification": ("[optim.grokfast]\nlam = 20.0\n", "optim.grokfast.lam", 0.1),
    "C1-act-always-halting": ("[model.act]\nhalt_thresh = 0.005\nwarmup_steps = 0\n", "model.act.halt_thresh", 0.7),
    "D2-newton-schulz-divergence": ("[optim.muon]\nns_steps = 1\n", "optim.muon.ns_steps", 5),
}


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "forge-cache"))


def _diagnose(run_cli, cwd, run_id, *extra):
    code, out, err = run_cli("diagnose", run_id, "--json", *extra, cwd=cwd)
    assert code in (0, 1, 3), err   # healthy, findings, undecidable
    return json.loads(out)


@pytest.mark.parametrize("rule_id", sorted(SCENARIOS))
def test_pathology_is_diagnosed_patched_and_cured(run_cli, tmp_path, rule_id):
    pathology, key, cured_value = SCENARIOS[rule_id]
    specs = tmp_path / "specs"
    specs.mkdir()
    for name in ("phase1.toml", "tiny.toml"):
        shutil.copy(SPECS / name, specs)
    sick = specs / "sick.toml"
    sick.write_text(f'extends = "tiny.toml"\n{SHORT}\n{pathology}')

    # the gate refuses the pathological spec; --force launches it anyway (recorded)
    assert run_cli("train", str(sick), "--run-id", "sick", cwd=tmp_path)[0] == 1
    code, _, err = run_cli("train", str(sick), "--run-id", "sick", "--force", cwd=tmp_path)
    assert code == 0, err

    report = _diagnose(run_cli, tmp_path, "sick")
    assert not report["healthy"]
    assert rule_id in [r for ids in report["problems"].values() for r in ids]
    assert report["findings"][0]["rule"] == rule_id, [(f["rule"], f["confidence"]) for f in report["findings"]]

    applied = _diagnose(run_cli, tmp_path, "sick", "--apply")
    patched = specs / "sick.r1.toml"
    assert applied["written"]["spec"] == str(patched) and patched.is_file()
    assert (specs / "patches" / "sick.r1.json").is_file()
    resolved = load_spec(patched)
    assert [p.name for p in resolved.chain] == ["phase1.toml", "tiny.toml", "sick.toml", "sick.r1.toml"]
    value = resolved.spec.model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    assert value == cured_value

    # the patched spec passes the gate (a documented mitigation warns) and the pathology is gone
    code, _, err = run_cli("train", str(patched), "--run-id", "cured", cwd=tmp_path)
    assert code == 0, err
    cured = _diagnose(run_cli, tmp_path, "cured")
    assert rule_id not in [f["rule"] for f in cured["findings"]], cured["findings"]
