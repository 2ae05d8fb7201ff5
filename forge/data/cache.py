"""Where prepared data lives, and the fingerprints that decide when it is stale.

Layout under the cache root ($FORGE_CACHE_DIR, default .cache/forge under the working directory):

    hub/<dataset>/<config>/<revision>/<split>/   a pulled hub split (datasets.save_to_disk) + pulled.json
    hf/                                          datasets' Arrow cache of local files
    tokenizers/<fingerprint>.json                a trained tokenizer (tokenizers' JSON: data, no code)
    tokens/<fingerprint>/                        one source's token ids (train and eval) and its stats

A fingerprint hashes everything an artefact depends on (inputs, settings, the preprocessing code),
so a second run reuses it and changing any input rebuilds it. Entries are written to a temporary
directory and renamed into place: a crash never leaves a half-written entry behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from forge.data.packing import DocArray

# The modules whose code shapes prepared tokens: editing one of them invalidates the caches.
PREPROCESSING_MODULES = ("builtin", "sources", "quality", "filters", "tokenizer", "prepare")


def default_cache_dir() -> Path:
    """$FORGE_CACHE_DIR, else .cache/forge under the working directory."""
    return Path(os.environ.get("FORGE_CACHE_DIR", Path(".cache") / "forge"))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (pydantic models are dumped first)."""
    def plain(x: Any) -> Any:
        return x.model_dump(mode="json") if hasattr(x, "model_dump") else x

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def code_version() -> str:
    """Hash of the preprocessing code itself (PREPROCESSING_MODULES)."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in PREPROCESSING_MODULES:
        digest.update((here / f"{name}.py").read_bytes())
    return digest.hexdigest()[:12]


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `final`; rename it to `final` when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # another process finished the same entry first: same inputs, same content
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it to `final` when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class DocWriter:
    """Appends tokenised documents to <dir>/<split>.tokens.bin (+ offsets at close), batch by batch,
    so a large source never has to fit in memory as Python lists."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype):
        self.directory, self.split, self.dtype = directory, split, dtype
        self._file = open(directory / f"{split}.tokens.bin", "wb")
        self._lengths: list[int] = []

    def add(self, docs: Sequence[Sequence[int]]) -> None:
        if docs:
            self._file.write(np.concatenate([np.asarray(d, dtype=self.dtype) for d in docs]).tobytes())
            self._lengths.extend(len(d) for d in docs)

    def close(self) -> None:
        self._file.close()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        np.save(self.directory / f"{self.split}.offsets.npy", offsets)


def load_docs(directory: Path, split: str, dtype: np.dtype) -> DocArray:
    """The documents DocWriter wrote, token ids memory-mapped (read-only)."""
    offsets = np.load(directory / f"{split}.offsets.npy")
    path = directory / f"{split}.tokens.bin"
    tokens = np.memmap(path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype=dtype)
    return DocArray(tokens, offsets)
