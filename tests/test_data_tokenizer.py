"""The byte-level BPE tokenizer and the fingerprinted cache of tokenizers and token ids."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import SPECS
from forge.data import build_data
from forge.data.builtin import builtin_documents
from forge.data.tokenizer import Tokenizer, train_tokenizer
from forge.errors import ForgeError
from forge.spec.load import load_spec

TRICKY = ["Hello  world\r\n\ttabs and  double  spaces ", "naïve café — “quotes” 日本語 🙂", "",
          " leading space", "control \x00\x01 chars", "def f(x):\n    return {'a': [x ** 2]}\n", "\n\n\n", "a" * 3000]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer((t for _, t in builtin_documents("pydoc_topics")), vocab_size=600, min_frequency=2)


def test_vocab_size_is_exactly_the_models(tokenizer):
    assert tokenizer.vocab_size == 600 == len(tokenizer.token_bytes)
    assert {tokenizer.eos_id, tokenizer.pad_id} <= set(range(600)) and tokenizer.eos_id != tokenizer.pad_id
    assert tokenizer.token_bytes[tokenizer.eos_id] == tokenizer.token_bytes[tokenizer.pad_id] == 0


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_and_byte_accounting(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert int(tokenizer.token_bytes[ids].sum()) == len(text.encode("utf-8"))   # what bits-per-byte divides by
    assert tokenizer.encode_batch([text, text]) == [ids, ids]


def test_merges_compress_real_text(tokenizer):
    text = builtin_documents("pydoc_topics")[0][1]
    assert len(text.encode()) / len(tokenizer.encode(text)) > 2.0   # bytes per token: the BPE learned merges


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert all(loaded.encode(t) == tokenizer.encode(t) for t in TRICKY)
    assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (tokenizer.eos_id, tokenizer.pad_id, 600)


def test_too_small_a_sample_is_a_clear_error():
    with pytest.raises(ForgeError, match=r"only \d+ tokens, but model.vocab_size is 5000.*sample_bytes"):
        train_tokenizer(["tiny text, tiny text"], vocab_size=5000, min_frequency=2)


def _spec(tmp_path: Path, *overrides: str):
    docs = tmp_path / "data" / "topics.jsonl"
    if not docs.exists():
        docs.parent.mkdir(parents=True)
        docs.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in builtin_documents("pydoc_topics")))
    path = tmp_path / "spec.toml"
    path.write_text(f'extends = "{SPECS / "tiny.toml"}"\n[model]\nvocab_size = 512\n'
                    '[[data.sources]]\nname = "topics"\nweight = 1.0\ntype = "local"\npaths = ["topics.jsonl"]\n')
    return load_spec(path, list(overrides)).spec


def _build(tmp_path: Path, *overrides: str, vocab_size: int = 512):
    spec = _spec(tmp_path, *overrides)
    return build_data(spec.data, vocab_size=vocab_size, seed=0, data_dir=tmp_path / "data", cache_dir=tmp_path / "c")


def _entries(tmp_path: Path) -> dict[str, dict[str, int]]:
    return {kind: {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c" / kind).iterdir()}
            for kind in ("tokenizers", "tokens")}


def test_cache_hits_on_the_same_inputs_and_misses_when_one_changes(tmp_path):
    first = _build(tmp_path)
    cached = _entries(tmp_path)
    assert len(cached["tokenizers"]) == 1 and len(cached["tokens"]) == 1
    again = _build(tmp_path)                                                # hit: nothing rewritten
    assert _entries(tmp_path) == cached
    assert again.tokenizer.encode(TRICKY[1]) == first.tokenizer.encode(TRICKY[1])
    assert (again.sources[0].train.tokens == first.sources[0].train.tokens).all()

    _build(tmp_path, "data.filters.min_length=40")        # filters shape the tokens, not the tokenizer
    entries = _entries(tmp_path)
    assert entries["tokenizers"] == cached["tokenizers"] and len(entries["tokens"]) == 2

    for n, change in enumerate((["data.tokenizer.sample_bytes=100000"], ["data.tokenizer.min_frequency=3"],
                                ["data.filters.quality_score=0.5"]), start=2):
        _build(tmp_path, *change)
        assert len(_entries(tmp_path)["tokenizers"]) == n, change
    _build(tmp_path, vocab_size=520)
    assert len(_entries(tmp_path)["tokenizers"]) == 5

    docs = tmp_path / "data" / "topics.jsonl"                 # the source file changes: retrain, retokenise
    docs.write_text(docs.read_text() + json.dumps({"text": "one more document " * 40}) + "\n")
    rebuilt = _build(tmp_path)
    assert len(_entries(tmp_path)["tokenizers"]) == 6
    assert rebuilt.sources[0].meta["train"]["documents"] + rebuilt.sources[0].meta["eval"]["documents"] == \
        first.sources[0].meta["train"]["documents"] + first.sources[0].meta["eval"]["documents"] + 1


def test_an_interrupted_write_leaves_no_cache_entry(tmp_path):
    bad = _spec(tmp_path, "data.filters.max_length=100000", "data.filters.min_length=100000")  # all too short
    with pytest.raises(ForgeError, match=r"'topics' has no training documents left after the filters"):
        build_data(bad.data, vocab_size=512, seed=0, data_dir=tmp_path / "data", cache_dir=tmp_path / "c")
    assert os.listdir(tmp_path / "c" / "tokens") == []
