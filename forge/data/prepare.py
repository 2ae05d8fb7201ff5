"""Turn the spec's sources into a trained tokenizer and cached token ids (training and held-out).

Cold, per source: read the texts, score and split them (filters.py), sample the training side for
the tokenizer, tokenise in batches (`encode_batch` runs in parallel in Rust) and write the ids to
the cache. Warm: fingerprints only (local files: sizes and times, no text is parsed; the built-in
corpus: its documents' hash), then memory-mapped ids.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from forge.data.cache import (DocWriter, atomic_dir, atomic_file, code_version, fingerprint, load_docs,
                              token_dtype, write_json)
from forge.data.filters import FilterCounts, held_out_mask, length_filter, quality_mask, text_hash
from forge.data.packing import DocArray
from forge.data.sources import OpenedSource, Texts, open_source, source_fingerprint
from forge.data.tokenizer import Tokenizer, train_tokenizer
from forge.errors import ForgeError
from forge.spec.data import DataSpec, Source

BATCH_DOCS = 1024      # documents per read/score/tokenise batch
SAMPLE_TEXT_CHARS = 4000


@dataclass(frozen=True)
class PreparedSource:
    name: str
    weight: float
    train: DocArray
    eval: DocArray
    meta: dict          # counts per split ("train"/"eval"), sample_text, fingerprints


@dataclass
class _Scanned:
    """One source's texts with, per document, whether it is trained on / held out."""

    opened: OpenedSource
    train_keep: np.ndarray
    train_bytes: np.ndarray
    eval_texts: Texts
    eval_keep: np.ndarray
    counts: dict[str, FilterCounts]   # "train" / "eval"


def prepare(spec: DataSpec, vocab_size: int, data_dir: Path,
            cache_dir: Path) -> tuple[Tokenizer, list[PreparedSource]]:
    """The tokenizer and every source's token ids, from the cache when their fingerprints match."""
    cache_dir = Path(cache_dir)
    version = code_version()
    source_fps = {s.name: source_fingerprint(s, data_dir, cache_dir) for s in spec.sources}
    tokenizer_fp = fingerprint("tokenizer", spec.tokenizer, vocab_size, spec.filters.quality_score,
                               spec.eval.fraction, [[s.name, s.weight, source_fps[s.name]] for s in spec.sources],
                               version)
    scanned: dict[str, _Scanned] = {}

    def scan(source: Source) -> _Scanned:
        if source.name not in scanned:
            scanned[source.name] = _scan(source, spec, data_dir, cache_dir)
        return scanned[source.name]

    tokenizer_path = cache_dir / "tokenizers" / f"{tokenizer_fp}.json"
    if tokenizer_path.is_file():
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        budget = spec.tokenizer.sample_bytes
        sample = (text for s in spec.sources for text in _tokenizer_sample(scan(s), budget * s.weight))
        tokenizer = train_tokenizer(sample, vocab_size, spec.tokenizer.min_frequency)
        with atomic_file(tokenizer_path) as tmp:
            tokenizer.save(tmp)

    dtype = token_dtype(vocab_size)
    prepared = []
    for source in spec.sources:
        tokens_fp = fingerprint("tokens", tokenizer_fp, source_fps[source.name], spec.filters, spec.eval.fraction,
                                version)
        directory = cache_dir / "tokens" / tokens_fp
        if not (directory / "meta.json").is_file():
            with atomic_dir(directory) as tmp:
                meta = _tokenize(scan(source), tokenizer, spec, tmp, dtype)
                write_json(tmp / "meta.json", {**meta, "source": source.name, "dtype": dtype.name,
                                               "tokenizer_fingerprint": tokenizer_fp,
                                               "source_fingerprint": source_fps[source.name]})
        meta = _read_meta(directory)
        prepared.append(PreparedSource(source.name, source.weight, load_docs(directory, "train", dtype),
                                       load_docs(directory, "eval", dtype), meta))
    return tokenizer, prepared


def _read_meta(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())


def _scan_texts(texts: Texts, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document: passes the quality filter, 64-bit text hash, UTF-8 bytes."""
    ok, hashes, sizes = [], [], []
    for start in range(0, len(texts), BATCH_DOCS):
        batch = texts.batch(start, start + BATCH_DOCS)
        ok.append(quality_mask(batch, threshold))
        hashes.append(np.array([text_hash(t) for t in batch], dtype=np.uint64))
        sizes.append(np.array([len(t.encode("utf-8", "surrogatepass")) for t in batch], dtype=np.int64))
    if not ok:
        return np.zeros(0, bool), np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate(ok), np.concatenate(hashes), np.concatenate(sizes)


def _scan(source: Source, spec: DataSpec, data_dir: Path, cache_dir: Path) -> _Scanned:
    opened = open_source(source, data_dir, cache_dir)
    threshold = spec.filters.quality_score
    ok, hashes, sizes = _scan_texts(opened.train, threshold)
    train, held = FilterCounts(), FilterCounts()
    if opened.eval is not None:
        eval_ok, eval_hashes, _ = _scan_texts(opened.eval, threshold)
        overlap = np.isin(hashes, eval_hashes)
        train_keep, eval_texts, eval_keep = ok & ~overlap, opened.eval, eval_ok
        train.documents, held.documents = len(ok), len(eval_ok)
        train.dropped_quality, held.dropped_quality = int((~ok).sum()), int((~eval_ok).sum())
        train.dropped_overlap = int((ok & overlap).sum())
    else:
        out = held_out_mask(hashes, spec.eval.fraction)
        if ok.any() and not (out & ok).any():  # a tiny source: hold out its lowest-hash good document
            out = out.copy()
            out[np.flatnonzero(ok)[np.argmin(hashes[ok])]] = True
        train_keep, eval_texts, eval_keep = ok & ~out, opened.train, ok & out
        train.documents, held.documents = int((~out).sum()), int(out.sum())
        train.dropped_quality, held.dropped_quality = int((~ok & ~out).sum()), int((~ok & out).sum())
    return _Scanned(opened, train_keep, sizes, eval_texts, eval_keep, {"train": train, "eval": held})


def _tokenizer_sample(scanned: _Scanned, budget_bytes: float) -> Iterator[str]:
    """Training documents evenly spaced over the source, up to budget_bytes (deterministic, no seed)."""
    candidates = np.flatnonzero(scanned.train_keep)
    sizes = scanned.train_bytes[candidates]
    stride = max(1, math.ceil(sizes.sum() / budget_bytes)) if len(candidates) else 1
    chosen, sizes = candidates[::stride], sizes[::stride]
    chosen = chosen[: max(1, int(np.searchsorted(np.cumsum(sizes), budget_bytes, side="right")))]
    for start in range(0, len(chosen), BATCH_DOCS):
        yield from scanned.opened.train.take(chosen[start:start + BATCH_DOCS].tolist())


def _tokenize(scanned: _Scanned, tokenizer: Tokenizer, spec: DataSpec, directory: Path, dtype: np.dtype) -> dict:
    """Write the kept documents of both splits as token ids; returns the meta record (counts, sample)."""
    filters, opened = spec.filters, scanned.opened
    outputs = {split: (keep, DocWriter(directory, split, dtype), scanned.counts[split])
               for split, keep in (("train", scanned.train_keep), ("eval", scanned.eval_keep))}
    # Held out by fraction, both splits come from the training texts: read them once.
    passes = ([(opened.train, ["train", "eval"])] if scanned.eval_texts is opened.train
              else [(opened.train, ["train"]), (scanned.eval_texts, ["eval"])])
    sample_text = ""
    for texts, splits in passes:
        for start in range(0, len(texts), BATCH_DOCS):
            batch = None
            for split in splits:
                keep, writer, counts = outputs[split]
                mask = keep[start:start + BATCH_DOCS]
                if not mask.any():
                    continue
                batch = batch if batch is not None else texts.batch(start, start + BATCH_DOCS)
                chosen = [t for t, k in zip(batch, mask) if k]
                encoded = tokenizer.encode_batch(chosen)
                writer.add(length_filter(chosen, encoded, filters.min_length, filters.max_length, counts))
                if split == "train" and not sample_text:
                    sample_text = next((t for t, ids in zip(chosen, encoded) if len(ids) >= filters.min_length), "")
    for split, (_, writer, counts) in outputs.items():
        writer.close()
        if counts.kept == 0:
            raise ForgeError(f"data source {opened.name!r} has no {'training' if split == 'train' else 'held-out'} "
                             f"documents left after the filters ({_describe(counts)}); lower data.filters."
                             "min_length / quality_score or add documents")
    return {"train": scanned.counts["train"].as_dict(), "eval": scanned.counts["eval"].as_dict(),
            "sample_text": sample_text[:SAMPLE_TEXT_CHARS]}


def _describe(counts: FilterCounts) -> str:
    return (f"{counts.documents} read, dropped: quality {counts.dropped_quality}, overlap with eval "
            f"{counts.dropped_overlap}, shorter than min_length {counts.dropped_min_length}")
