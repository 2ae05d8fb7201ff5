"""build_data: the [data] section -> tokenizer, resumable training loader, held-out eval batches."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from forge.data.cache import default_cache_dir
from forge.data.loader import EvalBatch, TrainLoader, eval_batches
from forge.data.mixture import shares
from forge.data.packing import PackedStream
from forge.data.prepare import PreparedSource, prepare
from forge.data.tokenizer import Tokenizer
from forge.spec.data import DataSpec


class Data:
    """Everything the trainer and the checks need from the data pipeline."""

    def __init__(self, spec: DataSpec, tokenizer: Tokenizer, sources: list[PreparedSource], seed: int):
        self.spec, self.tokenizer, self.sources, self.seed = spec, tokenizer, sources, seed
        self._eval: dict[tuple[str, int], list[EvalBatch]] = {}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def micro_batch_size(self) -> int:
        return self.spec.batch_size // self.spec.grad_accum

    def fingerprints(self) -> dict:
        """What the prepared data was built from (forge.data.cache fingerprints): the tokenizer's, and per source
        its input's (files, hub commit or built-in corpus) and its training token count."""
        tokenizer = {s.meta.get("tokenizer_fingerprint") for s in self.sources}
        return {"tokenizer": tokenizer.pop() if len(tokenizer) == 1 else sorted(map(str, tokenizer)),
                "sources": {s.name: {"input": s.meta.get("source_fingerprint"), "train_tokens": s.meta["train"]["tokens"]}
                            for s in self.sources}}

    def source(self, name: str) -> PreparedSource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"no data source {name!r} (sources: {', '.join(self.names)})")

    def train_loader(self, state: Optional[dict] = None) -> TrainLoader:
        """A loader at the start of the stream, or at `state` (TrainLoader.state_dict of a checkpoint)."""
        eos = self.tokenizer.eos_id
        loader = TrainLoader([PackedStream(s.name, s.train, eos, self.seed) for s in self.sources],
                             [s.weight for s in self.sources], self.spec.batch_size, self.spec.grad_accum,
                             self.spec.seq_len, self.spec.curriculum, self.seed)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    def eval_batches(self, name: str, seq_len: Optional[int] = None) -> list[EvalBatch]:
        """The held-out batches of one source (micro-batch rows, at most data.eval.max_batches), always the
        same; seq_len defaults to data.seq_len."""
        seq_len = seq_len or self.spec.seq_len
        if (name, seq_len) not in self._eval:
            self._eval[(name, seq_len)] = eval_batches(name, self.source(name).eval, self.tokenizer.eos_id,
                                                       self.tokenizer.token_bytes, seq_len, self.micro_batch_size,
                                                       self.spec.eval.max_batches)
        return self._eval[(name, seq_len)]

    @property
    def bytes_per_token(self) -> dict[str, float]:
        """UTF-8 bytes per (non-eos) token of each source's held-out documents."""
        return {s.name: s.meta["eval"]["bytes"] / s.meta["eval"]["tokens"] for s in self.sources}

    def mixture_report(self, n_batches: int) -> dict:
        """The first n_batches training batches of a fresh loader: tokens per source with the realised
        share next to the spec's weight, and the loader's time per batch."""
        loader = self.train_loader()
        start = time.perf_counter()
        for step in range(n_batches):
            loader.next_batch(step)
        seconds = time.perf_counter() - start
        tokens = loader.tokens_per_source
        realised = shares(tokens)
        return {"batches": n_batches, "loader_ms_per_batch": 1000 * seconds / max(n_batches, 1),
                "sources": {s.name: {"tokens": tokens[s.name], "share": realised[s.name], "target": s.weight}
                            for s in self.sources}}

    def report(self) -> list[dict]:
        """Per source: documents read, dropped by each filter, kept, tokens, bytes (train and eval)."""
        return [{"name": s.name, "weight": s.weight, "train": s.meta["train"], "eval": s.meta["eval"],
                 "bytes_per_token": self.bytes_per_token[s.name]} for s in self.sources]


def build_data(spec: DataSpec, vocab_size: int, seed: int, data_dir: Optional[Path] = None,
               cache_dir: Optional[Path] = None) -> Data:
    """Prepare (or load from the cache) the tokenizer and every source; data_dir defaults to
    $FORGE_DATA_DIR or data/, cache_dir to $FORGE_CACHE_DIR or .cache/forge."""
    from forge.checklist.context import default_data_dir

    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tokenizer, sources = prepare(spec, vocab_size, data_dir, cache_dir)
    return Data(spec, tokenizer, sources, seed)
