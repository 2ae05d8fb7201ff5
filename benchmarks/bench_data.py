"""Data pipeline: tokenizer training time, tokenisation throughput, time to the first batch (cold and warm).

    FORGE_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/bench_data.py [--spec specs/local.toml]
        [--threads 2] [--quick]

On the spec's local sources: the byte-level BPE trained on the first data.tokenizer.sample_bytes of the
documents (forge.data.tokenizer.train_tokenizer, vocab from the spec), then encode_batch over every
document (MB/s of UTF-8 text). Time to first batch: build_data (read, filter, train the tokenizer,
tokenise, write the cache) + the first training batch, with an empty cache directory (cold), then again
on the filled cache (warm), in this process (imports excluded). Writes benchmarks/results/data.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import setup_threads, table, write_result
from forge.checklist.context import default_data_dir
from forge.data import build_data
from forge.data.sources import local_files
from forge.data.tokenizer import train_tokenizer
from forge.spec.load import load_spec


def local_texts(spec, data_dir: Path) -> list[str]:
    texts = []
    for source in spec.data.sources:
        for path in local_files(source, data_dir):
            texts += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    return texts


def first_batch_seconds(spec, data_dir: Path, cache_dir: Path) -> float:
    start = time.perf_counter()
    data = build_data(spec.data, vocab_size=spec.model.vocab_size, seed=spec.run.seed, data_dir=data_dir,
                      cache_dir=cache_dir)
    data.train_loader().next_batch(0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/local.toml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="specs/tiny_local.toml, 200 kB tokenizer sample")
    args = parser.parse_args()
    setup_threads(args.threads)
    spec = load_spec("specs/tiny_local.toml" if args.quick else args.spec).spec
    data_dir = default_data_dir()
    texts = local_texts(spec, data_dir)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    budget = 200_000 if args.quick else spec.data.tokenizer.sample_bytes
    sample, used = [], 0
    for t in texts:
        if used >= budget:
            break
        sample.append(t)
        used += len(t.encode("utf-8"))
    start = time.perf_counter()
    tokenizer = train_tokenizer(sample, spec.model.vocab_size, spec.data.tokenizer.min_frequency)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    encode_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        cold = first_batch_seconds(spec, data_dir, Path(cache))
        warm = first_batch_seconds(spec, data_dir, Path(cache))
    res = {"spec": "specs/tiny_local.toml" if args.quick else args.spec, "vocab_size": spec.model.vocab_size,
           "tokenizer_sample_bytes": used, "tokenizer_train_s": train_s,
           "corpus_bytes": n_bytes, "corpus_tokens": n_tokens, "encode_s": encode_s,
           "encode_mb_per_s": n_bytes / encode_s / 1e6, "bytes_per_token": n_bytes / n_tokens,
           "first_batch_cold_s": cold, "first_batch_warm_s": warm}
    print(table(["measure", "value"], [
        ["tokenizer training", f"{train_s:.1f} s on {used / 1e6:.1f} MB (vocab {spec.model.vocab_size})"],
        ["tokenisation", f"{res['encode_mb_per_s']:.1f} MB/s ({n_bytes / 1e6:.1f} MB, {res['bytes_per_token']:.2f} B/token)"],
        ["first batch, cold cache", f"{cold:.1f} s"], ["first batch, warm cache", f"{warm:.2f} s"]]))
    write_result("data_quick" if args.quick else "data", {"threads": args.threads, **res})


if __name__ == "__main__":
    main()
