"""The spec's document filters, the held-out split, and the count of what each one dropped.

In order, per document:
  1. quality: drop when quality_score(text) <= filters.quality_score (forge/data/quality.py).
  2. held out: with no explicit eval split, a document goes to eval when hash(text) < eval.fraction
     (a 64-bit BLAKE2 hash as a fraction of 2^64): fixed, independent of order and seed, and identical
     texts always land on the same side. With an explicit eval split, a training document whose text
     also appears in the eval split is dropped ("overlap"), so eval stays unseen.
  3. min_length: drop documents shorter than filters.min_length tokens.
  4. max_length: cut documents longer than filters.max_length tokens into max_length pieces (the last
     piece keeps the remainder: no token is lost); each piece is then packed as a document.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from forge.data.quality import quality_score


@dataclass
class FilterCounts:
    """What happened to one split of one source (reported by `forge check` and `forge data stats`)."""

    documents: int = 0          # read from the source
    dropped_quality: int = 0
    dropped_overlap: int = 0    # training documents identical to a held-out one
    dropped_min_length: int = 0
    split_pieces: int = 0       # extra pieces created by cutting long documents
    kept: int = 0               # documents (pieces) packed
    tokens: int = 0             # tokens packed (eos separators not included)
    bytes: int = 0              # UTF-8 bytes of the documents kept

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def held_out_mask(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """True for documents whose hash falls below `fraction` of the hash range."""
    return hashes < np.uint64(int(fraction * 2**64))


def quality_mask(texts: list[str], threshold: float) -> np.ndarray:
    return np.array([quality_score(t) > threshold for t in texts], dtype=bool)


def split_long(ids: list[int], max_length: int) -> list[list[int]]:
    return [ids[i:i + max_length] for i in range(0, len(ids), max_length)] or [ids]


def length_filter(texts: list[str], token_lists: list[list[int]], min_length: int, max_length: int,
                  counts: FilterCounts) -> list[list[int]]:
    """Apply min_length (drop) then max_length (cut) to tokenised texts, updating counts; returns the
    pieces to pack."""
    pieces: list[list[int]] = []
    for text, ids in zip(texts, token_lists):
        if len(ids) < min_length:
            counts.dropped_min_length += 1
            continue
        cut = split_long(ids, max_length)
        counts.split_pieces += len(cut) - 1
        counts.kept += len(cut)
        counts.tokens += len(ids)
        counts.bytes += len(text.encode("utf-8", "surrogatepass"))
        pieces.extend(cut)
    return pieces
