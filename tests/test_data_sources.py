"""Data sources: local JSONL / text / parquet, the built-in corpus, hub sources with and without network."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import SPECS
from forge.data import build_data
from forge.data.builtin import STDLIB_SKIP_DIRS, builtin_documents, evenly_spaced, stdlib_files
from forge.data.sources import hub_dir, open_source, pull_hub_source, pulled_info
from forge.errors import ForgeError
from forge.spec.data import BuiltinSource, HubSource, LocalSource
from forge.spec.load import load_spec

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once, whatever the machine's network


def _local(**fields) -> LocalSource:
    return LocalSource(**{"name": "src", "weight": 1.0, "type": "local", **fields})


def _hub(**fields) -> HubSource:
    return HubSource(**{"name": "gsm", "weight": 1.0, "type": "hub", "dataset": "openai/gsm8k", "config": "main",
                        "eval_split": "test", "text_template": "{question}\n{answer}", **fields})


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_local_jsonl_with_globs_fields_and_template(tmp_path):
    _write_jsonl(tmp_path / "a" / "1.jsonl", [{"text": "first", "n": 1}, {"text": "second", "n": 2}])
    _write_jsonl(tmp_path / "a" / "2.jsonl", [{"text": "third", "n": 3}])
    _write_jsonl(tmp_path / "held.jsonl", [{"text": "held out", "n": 4}])
    opened = open_source(_local(paths=["a/*.jsonl"], eval_paths=["held.jsonl"]), tmp_path, tmp_path / "cache")
    assert opened.train.batch(0, 10) == ["first", "second", "third"]      # sorted files, file order inside
    assert opened.train.take([0, 2]) == ["first", "third"]
    assert opened.eval.batch(0, 10) == ["held out"]
    qa = [{"question": "How many?", "answer": "Two.\n#### 2"}, {"question": "Why?", "answer": None}]
    _write_jsonl(tmp_path / "qa.jsonl", qa)
    opened = open_source(_local(paths=["qa.jsonl"], text_template="Q: {question}\nA: {answer}"), tmp_path,
                         tmp_path / "cache")
    assert opened.train.batch(0, 2) == ["Q: How many?\nA: Two.\n#### 2", "Q: Why?\nA: "]
    assert opened.eval is None                                            # held out by fraction instead


def test_local_text_files_are_one_document_each(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("line one\n\nline two\n")
    (tmp_path / "docs" / "a.txt").write_text("alpha\nbeta\n")
    opened = open_source(_local(paths=["docs/*.txt"], format="text"), tmp_path, tmp_path / "cache")
    assert opened.train.batch(0, 5) == ["alpha\nbeta\n", "line one\n\nline two\n"]


def test_local_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x" * 5, "y" * 7], "id": [1, 2]}), tmp_path / "part.parquet")
    opened = open_source(_local(paths=["*.parquet"], format="parquet", text_field="body"), tmp_path, tmp_path / "c")
    assert opened.train.batch(0, 2) == ["xxxxx", "yyyyyyy"]


def test_local_errors_name_the_source_and_the_fix(tmp_path):
    with pytest.raises(ForgeError, match=r"'src'.*'missing/\*\.jsonl' matches no file.*data root.*FORGE_DATA_DIR"):
        open_source(_local(paths=["missing/*.jsonl"]), tmp_path, tmp_path / "cache")
    _write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}])
    with pytest.raises(ForgeError, match=r"no field 'text' \(fields: body\); set data.sources text_field"):
        open_source(_local(paths=["d.jsonl"]), tmp_path, tmp_path / "cache")
    with pytest.raises(ForgeError, match="both in paths and eval_paths"):
        open_source(_local(paths=["*.jsonl"], eval_paths=["d.jsonl"], text_field="body"), tmp_path, tmp_path / "c")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ForgeError, match=r"cannot read .*bad.jsonl as jsonl"):
        open_source(_local(paths=["bad.jsonl"]), tmp_path, tmp_path / "cache")


def test_builtin_corpus_is_real_non_empty_and_deterministic():
    files = stdlib_files()
    assert len(files) > 300 and [rel for rel, _ in files] == sorted(rel for rel, _ in files)
    assert not any(STDLIB_SKIP_DIRS & set(rel.split("/")[:-1]) for rel, _ in files)   # no tests, no site-packages
    first, again = builtin_documents("python_stdlib", 25), builtin_documents("python_stdlib", 25)
    assert first == again and len(first) == 25
    assert [name for name, _ in first] == [files[i][0] for i in evenly_spaced(len(files), 25)]
    assert first[0][0] < first[-1][0] and first[-1][0][0] > "m"       # spread over the whole library
    for name, text in first:
        ast.parse(text, name)                                         # real Python source
    topics = builtin_documents("pydoc_topics")
    assert len(topics) > 50 and sum(len(t) for _, t in topics) > 200_000
    assert topics == builtin_documents("pydoc_topics") and [n for n, _ in topics] == sorted(n for n, _ in topics)
    assert evenly_spaced(10, 3) == [0, 3, 6] and evenly_spaced(4, None) == [0, 1, 2, 3]


def test_hub_source_without_network_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    spec = load_spec(SPECS / "phase1.toml").spec
    with pytest.raises(ForgeError) as err:
        build_data(spec.data, vocab_size=spec.model.vocab_size, seed=0, data_dir=tmp_path, cache_dir=tmp_path / "c")
    message = str(err.value)
    assert "hub source 'tinystories' (roneneldan/TinyStories)" in message and "unreachable" in message
    assert "forge data pull" in message and 'type = "local"' in message and "specs/local.toml" in message
    assert "Traceback" not in message


def test_pull_saves_the_hub_splits_and_later_runs_need_no_network(tmp_path, monkeypatch):
    """The network parts of a pull (the commit lookup, the download) are replaced by a local table;
    saving, the pulled record and the offline load afterwards are the real code."""
    import datasets

    import forge.data.sources as sources

    rows = {"train": {"question": ["q1", "q2", "q3"], "answer": ["a1", "a2", "a3"]},
            "test": {"question": ["t1"], "answer": ["b1"]}}
    monkeypatch.setattr(sources, "_hub_revision", lambda source, cache_dir: "c0ffee" * 6 + "beef")
    monkeypatch.setattr(sources, "_hub_bytes", lambda source, sha: 1000)
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config, split, revision, cache_dir: datasets.Dataset.from_dict(rows[split]))
    source = _hub()
    info = pull_hub_source(source, tmp_path)
    assert info["splits"] == {"train": 3, "test": 1} and pulled_info(source, tmp_path) == info
    assert (hub_dir(source, tmp_path) / "train").is_dir()
    monkeypatch.undo()
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    opened = open_source(source, tmp_path, tmp_path)
    assert opened.train.batch(0, 5) == ["q1\na1", "q2\na2", "q3\na3"] and opened.eval.batch(0, 5) == ["t1\nb1"]


def test_cli_pull_without_network_is_a_forge_error(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from forge.cli_data import app

    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["pull", str(SPECS / "phase1.toml")])
    assert isinstance(result.exception, ForgeError) and result.exception.exit_code == 2
    assert "tinystories" in str(result.exception) and "forge data pull" in str(result.exception)
    result = CliRunner().invoke(app, ["pull", str(SPECS / "tiny.toml")])
    assert result.exit_code == 0 and "no hub sources" in result.output


def test_builtin_source_rejects_text_fields():
    with pytest.raises(ValueError, match="plain text"):
        BuiltinSource(name="b", weight=1.0, type="builtin", corpus="pydoc_topics", text_field="body")
    with pytest.raises(ValueError, match="either text_field or text_template"):
        _local(paths=["x"], text_field="a", text_template="{a}")
    with pytest.raises(ValueError, match="plain names"):
        _local(paths=["x"], text_template="{a.__class__}")
