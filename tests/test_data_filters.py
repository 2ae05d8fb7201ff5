"""Filters: the quality score, min/max length, the held-out split, and the counts of what each dropped."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import SPECS
from forge.data import build_data
from forge.data.builtin import builtin_documents
from forge.data.filters import FilterCounts, held_out_mask, length_filter, split_long, text_hash
from forge.data.quality import RATIO_ONE, RATIO_ZERO, cleanliness, compressibility, quality_score
from forge.spec.load import load_spec

THRESHOLD = load_spec(SPECS / "phase1.toml").spec.data.filters.quality_score

PARAGRAPH = ("The operations in the following table are defined on mutable sequence types. "
             "Most of them return None, so that a chain of calls cannot be written by mistake.\n")
REPEATED = PARAGRAPH * 40                                               # boilerplate, over and over
GARBAGE = random.Random(0).randbytes(4000).decode("latin-1")          # a binary file read as text


def test_real_documents_pass_and_junk_fails():
    real = [t for _, t in builtin_documents("pydoc_topics")] + [t for _, t in builtin_documents("python_stdlib", 60)]
    scores = [quality_score(t) for t in real if t.strip()]
    assert min(scores) > THRESHOLD
    assert quality_score(REPEATED) < THRESHOLD and compressibility(REPEATED) < 0.2
    assert quality_score(GARBAGE) < THRESHOLD and cleanliness(GARBAGE) == 0.0
    assert quality_score("") == 0.0
    assert all(0.0 <= quality_score(t) <= 1.0 for t in (REPEATED, GARBAGE, PARAGRAPH, "x"))


def test_real_shared_documents_pass(data_dir):
    root = data_dir
    failing = [(path.name, n) for path in sorted(root.glob("*/*.jsonl"))
               for n, line in enumerate(path.read_text().splitlines())
               if quality_score(json.loads(line)["text"]) <= THRESHOLD]
    assert failing == []


def test_compressibility_is_the_documented_linear_map():
    import zlib

    for text in (PARAGRAPH * 3, PARAGRAPH * 8, REPEATED):
        raw = text.encode()
        ratio = len(zlib.compress(raw, 6)) / len(raw)
        assert compressibility(text) == pytest.approx(min(1, max(0, (ratio - RATIO_ZERO) / (RATIO_ONE - RATIO_ZERO))))
    assert cleanliness("tab\tnew\nline\r\x0c") == 1.0 and cleanliness("\ufffd" + "a" * 49) == pytest.approx(0.8)


def test_length_filter_drops_short_and_cuts_long_without_losing_a_token():
    docs = [list(range(5)), list(range(100, 130)), list(range(200, 270)), list(range(300, 310))]
    counts = FilterCounts()
    pieces = length_filter(["a", "bb", "ccc", "dddd"], docs, 10, 32, counts)
    assert [len(p) for p in pieces] == [30, 32, 32, 6, 10]
    assert sum(pieces, []) == sum(docs[1:], [])                 # order and every token kept
    assert (counts.dropped_min_length, counts.split_pieces, counts.kept) == (1, 2, 5)
    assert (counts.tokens, counts.bytes) == (110, 9)
    assert split_long(list(range(64)), 32) == [list(range(32)), list(range(32, 64))]


def test_held_out_split_is_by_text_hash():
    texts = [f"document number {i}" for i in range(20000)]
    hashes = np.array([text_hash(t) for t in texts], dtype=np.uint64)
    held = held_out_mask(hashes, 0.05)
    assert abs(held.mean() - 0.05) < 0.006
    assert (held_out_mask(hashes[::-1], 0.05) == held[::-1]).all()          # independent of order
    assert text_hash("same text") == text_hash("same text") != text_hash("same text.")


def test_build_reports_what_each_filter_dropped(tmp_path):
    topics = [t for _, t in builtin_documents("pydoc_topics")]
    short, long_doc = "too short", "\n".join(topics[:40])
    train = [*topics[40:60], REPEATED, GARBAGE, short, long_doc, topics[60]]
    held = [topics[60], *topics[61:70]]                              # topics[60] is in both: an overlap
    for name, docs in (("train.jsonl", train), ("eval.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(f'extends = "{SPECS / "tiny.toml"}"\n[model]\nvocab_size = 512\n[[data.sources]]\n'
                         'name = "s"\nweight = 1.0\ntype = "local"\npaths = ["train.jsonl"]\n'
                         'eval_paths = ["eval.jsonl"]\n')
    spec = load_spec(spec_path).spec
    data = build_data(spec.data, vocab_size=512, seed=0, data_dir=tmp_path, cache_dir=tmp_path / "c")
    counts = data.sources[0].meta["train"]
    assert counts["documents"] == len(train)
    assert (counts["dropped_quality"], counts["dropped_overlap"], counts["dropped_min_length"]) == (2, 1, 1)
    lengths = [len(ids) for ids in data.tokenizer.encode_batch([*topics[40:60], long_doc])]
    assert lengths[-1] > 20 * spec.data.filters.max_length
    assert counts["split_pieces"] == sum(-(-n // spec.data.filters.max_length) - 1 for n in lengths)
    assert counts["kept"] == 21 + counts["split_pieces"] == len(data.sources[0].train)
    assert counts["tokens"] == sum(lengths) == data.sources[0].train.n_tokens
    held_counts = data.sources[0].meta["eval"]
    assert held_counts["documents"] == len(held)
    assert held_counts["dropped_quality"] == held_counts["dropped_min_length"] == 0
    assert held_counts["kept"] == len(held) + held_counts["split_pieces"] == len(data.sources[0].eval)
    kept_text = [data.tokenizer.decode(data.sources[0].train.doc(i)) for i in range(len(data.sources[0].train))]
    assert REPEATED not in kept_text and GARBAGE not in kept_text and topics[60] not in kept_text
