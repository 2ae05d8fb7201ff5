"""The data pipeline: sources -> quality/length filters -> byte-level BPE -> packed, weighted, resumable batches.

    from forge.data import build_data
    data = build_data(spec.data, vocab_size=spec.model.vocab_size, seed=spec.run.seed)
    loader = data.train_loader()                  # or data.train_loader(state) to resume
    idx, targets = loader.next_batch(step)        # (batch_size, seq_len at that step)
    for batch in data.eval_batches("tinystories"): ...   # idx, targets, target_bytes

Modules, in pipeline order: sources/builtin (documents as text), quality/filters (what is dropped),
tokenizer, prepare (cached token ids), packing, mixture, loader, build (Data, build_data), cache.
"""
from forge.data.build import Data, build_data
from forge.data.loader import EvalBatch, TrainLoader, bits_per_byte
from forge.data.tokenizer import Tokenizer

__all__ = ["Data", "EvalBatch", "Tokenizer", "TrainLoader", "bits_per_byte", "build_data"]
