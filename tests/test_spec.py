"""The spec: shipped files validate, composition works, every kind of bad input is located (exit 2)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import SPECS
from forge.errors import SpecError
from forge.spec.load import load_spec, spec_hash
from forge.spec.render import MISSING, resolved_toml, spec_diff

SHIPPED = sorted(SPECS.glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_spec_validates_and_round_trips(path, tmp_path):
    resolved = load_spec(path)
    # the resolved TOML is a complete spec on its own: it loads back to the same hash
    flat = tmp_path / "resolved.toml"
    flat.write_text(resolved_toml(resolved))
    assert load_spec(flat).hash == resolved.hash


def test_phase1_carries_the_design_values():
    spec = load_spec(SPECS / "phase1.toml").spec
    assert (spec.model.n_layers, spec.model.d_model, spec.model.attention.sw_window) == (8, 512, 1024)
    assert (spec.model.memory.d_mem, spec.model.memory.decay, spec.model.gate.hidden) == (256, 0.99, 256)
    assert (spec.model.trm.t_max, spec.model.trm.micro_steps, spec.model.trm.step_weights) == (3, 2, [0.5, 0.75, 1.0])
    assert (spec.optim.grokfast.alpha, spec.optim.grokfast.lam, spec.optim.muon.ns_steps) == (0.98, 0.3, 3)
    assert (spec.optim.qk_clip.tau, spec.checkpoint.every, spec.checkpoint.keep_last_n) == (30.0, 5000, 3)
    assert (spec.logging.every, spec.logging.wandb.project, spec.merge_preview.every) == (100, "agent-forge-v2", 10000)
    assert (spec.data.seq_len, spec.data.batch_size, spec.data.filters.min_length) == (512, 32, 128)


def test_extends_merges_tables_and_child_wins():
    base, tiny = load_spec(SPECS / "phase1.toml"), load_spec(SPECS / "tiny.toml")
    assert tiny.spec.model.d_model == 128                           # set by tiny
    assert tiny.spec.model.trm.t_max == base.spec.model.trm.t_max   # inherited from phase1
    assert tiny.spec.model.attention.type == base.spec.model.attention.type
    assert [p.name for p in tiny.chain] == ["phase1.toml", "tiny.toml"]
    assert str(tiny.origins[("model", "d_model")]).startswith("specs/tiny.toml:") or \
        "tiny.toml:" in str(tiny.origins[("model", "d_model")])
    assert "phase1.toml:" in str(tiny.origins[("model", "trm", "t_max")])


def test_arrays_replace_whole(tmp_path):
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{SPECS / "tiny.toml"}"\n[[data.sources]]\nname = "only"\nweight = 1.0\n'
                     'type = "builtin"\ncorpus = "pydoc_topics"\n')
    assert [s.name for s in load_spec(child).spec.data.sources] == ["only"]


def test_extends_chain_of_three(tmp_path):
    mid = tmp_path / "mid.toml"
    mid.write_text(f'extends = "{SPECS / "tiny.toml"}"\n[optim.grokfast]\nlam = 0.1\n')
    top = tmp_path / "top.toml"
    top.write_text('extends = "mid.toml"\n[run]\nname = "top"\n')
    resolved = load_spec(top)
    assert resolved.spec.optim.grokfast.lam == 0.1 and resolved.spec.run.name == "top"
    assert resolved.spec.model.d_model == 128
    assert [p.name for p in resolved.chain] == ["phase1.toml", "tiny.toml", "mid.toml", "top.toml"]


def test_overrides_are_typed_by_the_schema():
    resolved = load_spec(SPECS / "tiny.toml", ["optim.grokfast.lam=0.1", "run.name=abc", "train.max_steps=7",
                                               "model.trm.detach_between_steps=false",
                                               "model.attention.type=full", "data.sources.0.weight=0.5",
                                               "optim.adamw.lr=3e-4", "run.name='quoted'"])
    spec = resolved.spec
    assert spec.optim.grokfast.lam == 0.1 and spec.train.max_steps == 7
    assert spec.model.trm.detach_between_steps is False and spec.model.attention.type == "full"
    assert spec.run.name == "quoted" and spec.optim.adamw.lr == 3e-4
    assert str(resolved.origins[("optim", "grokfast", "lam")]) == "--set optim.grokfast.lam=0.1"


def test_hash_is_stable_and_content_based(tmp_path):
    a = load_spec(SPECS / "tiny.toml")
    assert a.hash == load_spec(SPECS / "tiny.toml").hash
    assert a.hash != load_spec(SPECS / "tiny.toml", ["optim.grokfast.lam=0.1"]).hash
    # the same values reached another way hash the same
    same = tmp_path / "same.toml"
    same.write_text(f'extends = "{SPECS / "tiny.toml"}"\n[optim.grokfast]\nlam = 0.3\n')
    assert load_spec(same).hash == a.hash == spec_hash(a.spec)


def test_diff_lists_exactly_the_changed_keys():
    a = load_spec(SPECS / "tiny.toml")
    b = load_spec(SPECS / "tiny.toml", ["optim.grokfast.lam=0.1", "model.act.halt_thresh=0.3"])
    changes = spec_diff(a, b)
    assert [(c.key, c.before, c.after) for c in changes] == [
        ("model.act.halt_thresh", 0.5, 0.3), ("optim.grokfast.lam", 0.3, 0.1)]
    c = spec_diff(a, load_spec(SPECS / "tiny.toml", ["optim.adamw.lr=3e-4"]))
    assert [(x.key, x.before is MISSING, x.after) for x in c] == [("optim.adamw.lr", True, 3e-4)]


# ------------------------------------------------------------------------------------- bad input

def _variant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = (SPECS / "phase1.toml").read_text()
    assert old in text, old
    out = tmp_path / name
    out.write_text(text.replace(old, new, 1))
    return out


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


BAD_CASES = [
    # (name, old, new, key, message fragment, line needle)
    ("typo", "n_layers = 8\n", "n_layer = 8\n", "model.n_layer", "did you mean 'n_layers'", "n_layer = 8"),
    ("type", "d_model = 512", 'd_model = "512"', "model.d_model", "valid integer", 'd_model = "512"'),
    ("range", "lam = 0.3", "lam = -1.0", "optim.grokfast.lam", "greater than or equal to 0", "lam = -1.0"),
    ("prob", "halt_thresh = 0.5", "halt_thresh = 1.5", "model.act.halt_thresh", "less than or equal to 1",
     "halt_thresh = 1.5"),
    ("enum", 'type = "sliding_window"', 'type = "dense"', "model.attention.type", "'full'", 'type = "dense"'),
    ("steps", "step_weights = [0.5, 0.75, 1.0]", "step_weights = [0.5, 1.0]", "model.trm.step_weights",
     "t_max = 3", "step_weights = [0.5, 1.0]"),
    ("mixture", "weight = 0.2\n", "weight = 0.25\n", "data.sources", "sum to 1", "[[data.sources]]"),
    ("keep", "keep_last_n = 3", "keep_last_n = 0", "checkpoint.keep_last_n", "greater than 0", "keep_last_n = 0"),
    ("window", "sw_window = 1024", "sw_window = 4096", "model.attention.sw_window", "data.filters.max_length",
     "sw_window = 4096"),
]


@pytest.mark.parametrize("name,old,new,key,fragment,needle", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_value_is_located(tmp_path, run_cli, name, old, new, key, fragment, needle):
    path = _variant(tmp_path, f"{name}.toml", old, new)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    text = str(err.value)
    assert f"{name}.toml:{_line_of(path, needle)}: {key}" in text, text
    assert fragment in text
    code, out, errtext = run_cli("check", str(path), cwd=tmp_path)
    assert code == 2 and f"{key}" in errtext and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.toml"]  # nothing written


def test_multiline_strings_do_not_shift_error_locations(tmp_path):
    """A `[`, `{` or `key =` inside a multi-line string opens no value: the keys after it keep their own file
    and line (before: the bracket left the scanner inside a value, and errors fell back to the base file)."""
    shutil.copy(SPECS / "phase1.toml", tmp_path)
    child = tmp_path / "child.toml"
    child.write_text('extends = "phase1.toml"\n[logging.wandb]\nproject = """notes [draft\nlr = 5 {\n"""\n'
                     "name = 'a [b'\n[optim.grokfast]\nlam = -1.0\n")
    with pytest.raises(SpecError) as err:
        load_spec(child)
    assert f"child.toml:{_line_of(child, 'lam = -1.0')}: optim.grokfast.lam" in str(err.value), str(err.value)
    assert load_spec(child, ["optim.grokfast.lam=0.3"]).spec.logging.wandb.project == "notes [draft\nlr = 5 {\n"


def test_malformed_toml_names_file_and_line(tmp_path, run_cli):
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nname = "x"\nseed = \n')
    code, _, err = run_cli("check", str(bad))
    assert code == 2 and "bad.toml:3" in err and "malformed TOML" in err


def test_missing_and_cyclic_extends(tmp_path, run_cli):
    missing = tmp_path / "missing.toml"
    missing.write_text('# a comment\nextends = "nope.toml"\n')
    code, _, err = run_cli("check", str(missing))
    assert code == 2 and "missing.toml:2: extends" in err and "not found" in err
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    code, _, err = run_cli("spec", "show", str(tmp_path / "a.toml"))
    assert code == 2 and "cyclic extends" in err and "b.toml:1" in err


@pytest.mark.parametrize("assignment,fragment", [
    ("optim.grokfast.lamb=1", "did you mean 'lam'"),
    ("optim.grokfast.lam=abc", "valid number"),
    ("data.sources.9.weight=1", "out of range"),
    ("optim.grokfast", "expected dotted.key=value"),
    ("nosuchsection.x=1", "unknown key"),
])
def test_bad_override_is_reported(run_cli, assignment, fragment):
    code, out, err = run_cli("spec", "show", str(SPECS / "tiny.toml"), "--set", assignment)
    assert code == 2 and f"--set {assignment}" in err and fragment in err and out == ""


def test_missing_required_key_points_at_its_section(tmp_path):
    path = _variant(tmp_path, "nolr.toml", "lr = 1e-3\n", "")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert f"nolr.toml:{_line_of(path, '[optim]')}: optim.lr: required key is missing" in str(err.value)


# ------------------------------------------------------------------------------------- CLI views

def test_spec_show_prints_merged_spec_with_overrides(run_cli):
    code, out, _ = run_cli("spec", "show", str(SPECS / "tiny.toml"), "--set", "optim.grokfast.lam=0.1")
    assert code == 0
    assert "# resolved from: phase1.toml -> tiny.toml" in out and "# --set optim.grokfast.lam=0.1" in out
    assert re.search(r"^lam = 0\.1$", out, re.M) and re.search(r"^d_model = 128$", out, re.M)
    assert re.search(r"^t_max = 3$", out, re.M)  # inherited


def test_spec_diff_shows_exactly_the_changed_keys(run_cli):
    code, out, _ = run_cli("spec", "diff", str(SPECS / "tiny.toml"), str(SPECS / "tiny.toml"),
                           "--set", "optim.grokfast.lam=0.1", "--json")
    assert code == 0 and json.loads(out) == [{"key": "optim.grokfast.lam", "before": 0.3, "after": 0.1}]
    code, out, _ = run_cli("spec", "diff", str(SPECS / "phase1.toml"), str(SPECS / "tiny.toml"))
    assert code == 0 and "model.d_model" in out and "optim.grokfast.lam" not in out


def test_spec_schema_documents_every_field(run_cli):
    code, out, _ = run_cli("spec", "schema")
    schema = json.loads(out)
    assert code == 0 and set(schema["properties"]) >= {"run", "model", "optim", "data", "train"}

    def walk(node):
        for name, prop in node.get("properties", {}).items():
            yield name, prop
    undocumented = [f"{model}.{name}" for model, defn in schema["$defs"].items() for name, prop in walk(defn)
                    if "description" not in prop and "$ref" not in prop and "allOf" not in prop
                    and not any("$ref" in x for x in prop.get("anyOf", []) + prop.get("items", {}).get("anyOf", []))
                    and "$ref" not in prop.get("items", {}) and "oneOf" not in prop.get("items", {})]
    assert undocumented == []
