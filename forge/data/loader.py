"""Batches: training (mixture + packing + sequence-length curriculum, resumable) and held-out eval.

Training: each optimizer step takes one global batch of batch_size rows; each row is drawn from
one source (mixture.py) at that source's cursor in its packed stream (packing.py). The loader's
whole position is a few integers per source (state_dict), so a resumed run sees exactly the
batches it would have seen. grad_accum splits the global batch into equal micro-batches: the data
does not depend on grad_accum.

Evaluation: a source's held-out documents in file order, packed the same way, cut into
non-overlapping rows; the same batches every time. Each batch carries the number of UTF-8 bytes
every target token stands for, so bits per byte compares models with different tokenizers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from forge.data.mixture import MixtureSchedule
from forge.data.packing import DocArray, PackedStream, concat_with_eos, sequential_rows
from forge.errors import ForgeError
from forge.spec.data import CurriculumStage

STATE_FORMAT = "forge.data.TrainLoader/1"


class TrainLoader:
    def __init__(self, streams: Sequence[PackedStream], weights: Sequence[float], batch_size: int,
                 grad_accum: int, seq_len: int, curriculum: Sequence[CurriculumStage], seed: int):
        self.streams, self.names = list(streams), [s.name for s in streams]
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.stages = [(0, seq_len)] + [(c.from_step, c.seq_len) for c in curriculum]
        self.schedule = MixtureSchedule(weights)
        self.cursors = [0] * len(self.streams)
        self.batches = 0
        self.skip: set[tuple[int, int]] = set()   # (global batch, micro-batch) positions never trained on

    def seq_len_at(self, step: int) -> int:
        """The curriculum's sequence length at this optimizer step (the latest stage that has begun)."""
        return [length for start, length in self.stages if start <= step][-1]

    def _rows(self, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's next n rows of `length` tokens: (idx, targets), targets shifted by one."""
        rows = np.empty((n, length + 1), dtype=np.int64)
        for r in range(n):
            i = self.schedule.next_source()
            rows[r] = self.streams[i].read(self.cursors[i], length + 1)
            self.cursors[i] += length
        block = torch.from_numpy(rows)
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next global batch: (idx, targets), LongTensors (batch_size, seq_len_at(step)); targets are
        idx shifted by one. Call once per optimizer step, in order."""
        self.batches += 1
        return self._rows(self.batch_size, self.seq_len_at(step))

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """next_batch(step) split into grad_accum equal micro-batches. A micro-batch at a position in `skip`
        (set aside by a heal: forge.train.heal) is replaced by the mixture's next rows, so the run never trains
        on it and the stream stays a function of the loader state and the skip list (resumable)."""
        batch = self.batches
        idx, targets = self.next_batch(step)
        micro = list(zip(idx.chunk(self.grad_accum), targets.chunk(self.grad_accum)))
        for m in sorted(m for b, m in self.skip if b == batch and m < len(micro)):
            micro[m] = self._rows(len(micro[m][0]), idx.shape[1])
        return micro

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Target tokens drawn from each source so far (the realised mixture)."""
        return dict(zip(self.names, self.cursors))

    def state_dict(self) -> dict:
        """Plain Python values only (checkpoints load with weights_only=True)."""
        return {"format": STATE_FORMAT, "seed": self.seed, "batches": self.batches,
                "rows": dict(zip(self.names, self.schedule.rows)), "cursors": dict(zip(self.names, self.cursors)),
                "epoch_tokens": {s.name: s.epoch_tokens for s in self.streams}}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if state.get("format") != STATE_FORMAT:
            raise ForgeError(f"data loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        for key, what in (("seed", "run.seed"), ("epoch_tokens", "the sources, filters or tokenizer")):
            if state[key] != mine[key]:
                raise ForgeError(f"cannot resume the data loader: {what} changed since the checkpoint "
                                 f"({key}: saved {state[key]}, now {mine[key]}); the run would not see the "
                                 "batches it would have seen")
        self.batches = int(state["batches"])
        self.schedule.rows = [int(state["rows"][n]) for n in self.names]
        self.cursors = [int(state["cursors"][n]) for n in self.names]


@dataclass(frozen=True)
class EvalBatch:
    """Held-out rows; target_bytes[b, t] = UTF-8 bytes that targets[b, t] stands for (0 for eos)."""

    idx: torch.Tensor
    targets: torch.Tensor
    target_bytes: torch.Tensor

    @property
    def n_bytes(self) -> int:
        return int(self.target_bytes.sum())


def eval_batches(name: str, docs: DocArray, eos_id: int, token_bytes: np.ndarray, seq_len: int,
                 batch_size: int, max_batches: int) -> list[EvalBatch]:
    """At most max_batches batches of held-out rows (the last may be smaller), deterministic."""
    rows = sequential_rows(concat_with_eos(docs, eos_id), seq_len)[: batch_size * max_batches]
    if len(rows) == 0:
        raise ForgeError(f"data source {name!r}: its held-out split has {docs.n_tokens} tokens, fewer than one "
                         f"row of seq_len {seq_len}; hold out more (data.eval.fraction or eval files)")
    block = torch.from_numpy(rows)
    nbytes = torch.from_numpy(token_bytes)[block[:, 1:]]
    return [EvalBatch(block[i:i + batch_size, :-1].contiguous(), block[i:i + batch_size, 1:].contiguous(),
                      nbytes[i:i + batch_size].contiguous())
            for i in range(0, len(rows), batch_size)]


def bits_per_byte(token_nats: torch.Tensor, target_bytes: torch.Tensor) -> float:
    """Cross-entropy in bits per UTF-8 byte: the per-target nats (any shape) summed over targets that
    stand for text (target_bytes > 0; eos is left out), divided by ln 2 times the bytes they stand for."""
    text = target_bytes > 0
    n_bytes = int(target_bytes[text].sum())
    if n_bytes == 0:
        raise ValueError("no target stands for text (every target is eos): bits per byte is undefined")
    return float(token_nats[text].sum()) / (math.log(2) * n_bytes)
