"""Packing tokenised documents into fixed-length rows, with an eos token after every document.

A source's training stream is endless: epoch e is every document once, in a permutation drawn from
(seed, source name, e), each followed by eos. A position in the stream (the "cursor") therefore
names a token exactly, so a loader only has to remember one integer per source to resume. A row of
length T is the T + 1 tokens from the cursor on (inputs = first T, targets = last T); the cursor then
advances by T, so consecutive rows share one boundary token and no token is lost or repeated as a
target.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DocArray:
    """Tokenised documents stored flat: document i is tokens[offsets[i]:offsets[i + 1]] (no eos inside)."""

    tokens: np.ndarray    # 1-D token ids (uint16/uint32, often a read-only memmap)
    offsets: np.ndarray   # int64, len = documents + 1, offsets[0] = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def concat_with_eos(docs: DocArray, eos_id: int, order: np.ndarray | None = None) -> np.ndarray:
    """The documents (in `order`, default file order) joined as doc eos doc eos ..., as int64."""
    order = np.arange(len(docs)) if order is None else order
    pieces = []
    for i in order:
        pieces.append(docs.doc(i))
        pieces.append(np.array([eos_id]))
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)


class PackedStream:
    """One source's endless training stream; read(cursor, n) returns tokens [cursor, cursor + n)."""

    def __init__(self, name: str, docs: DocArray, eos_id: int, seed: int):
        if len(docs) == 0:
            raise ValueError(f"source {name!r} has no training documents")
        self.name, self.docs, self.eos_id, self.seed = name, docs, eos_id, seed
        self.epoch_tokens = docs.n_tokens + len(docs)  # every document plus its eos
        self._name_key = zlib.crc32(name.encode())     # a source keeps its order when others are added
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self._name_key, epoch]).permutation(len(self.docs))

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, end position of each document's eos within the epoch, exclusive)."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a row spans at most two epochs
                self._epochs.pop(min(self._epochs))
            order = self.permutation(epoch)
            self._epochs[epoch] = (order, np.cumsum(self.docs.lengths[order] + 1))
        return self._epochs[epoch]

    def read(self, cursor: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            epoch, pos = divmod(cursor + filled, self.epoch_tokens)
            order, ends = self._epoch(epoch)
            j = int(np.searchsorted(ends, pos, side="right"))  # the document whose span holds pos
            doc = self.docs.doc(order[j])
            offset = pos - (int(ends[j]) - len(doc) - 1)
            take = min(len(doc) - offset, n - filled)
            if take > 0:
                out[filled:filled + take] = doc[offset:offset + take]
                filled += take
            if filled < n:  # the document is exhausted: its eos comes next
                out[filled] = self.eos_id
                filled += 1
        return out


def sequential_rows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of seq_len + 1 tokens, stride seq_len: every position after the first is a
    target exactly once (held-out evaluation). Shape (rows, seq_len + 1); a short tail is left out."""
    rows = (len(stream) - 1) // seq_len
    if rows <= 0:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    index = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[index]
