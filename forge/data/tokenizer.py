"""Byte-level BPE tokenizer, trained with the `tokenizers` library on a sample of the mixture.

Byte-level: text is UTF-8 bytes first, so every string round-trips exactly (decode(encode(x)) == x)
and every token stands for a whole number of bytes; `token_bytes[id]` is that number (0 for the
special tokens), which is what bits-per-byte needs. The vocabulary has exactly vocab_size entries
(the model's parameter budget depends on it): 256 byte tokens, the special tokens, then merges.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from forge.errors import ForgeError

EOS = "<|eos|>"   # ends every document in a packed stream
PAD = "<|pad|>"   # fills unused positions (never produced by packing)


class Tokenizer:
    """encode / decode / encode_batch over a trained `tokenizers.Tokenizer`."""

    def __init__(self, inner):
        self.inner = inner
        self.eos_id = inner.token_to_id(EOS)
        self.pad_id = inner.token_to_id(PAD)
        self.vocab_size = inner.get_vocab_size()
        # Byte-level tokens are strings over a 256-character alphabet, one character per byte.
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in inner.get_vocab().items():
            lengths[i] = len(token)
        lengths[[self.eos_id, self.pad_id]] = 0
        self.token_bytes = lengths

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=False)

    def save(self, path: Path) -> None:
        self.inner.save(str(path))

    @classmethod
    def load(cls, path: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as Inner  # JSON: data only, no code

        return cls(Inner.from_file(str(path)))


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Train byte-level BPE on `texts`; ForgeError if they hold too few distinct pairs for vocab_size."""
    from tokenizers import Tokenizer as Inner, decoders, models, pre_tokenizers, trainers

    inner = Inner(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    inner.train_from_iterator(texts, trainer)
    if inner.get_vocab_size() != vocab_size:
        raise ForgeError(f"the tokenizer sample yields only {inner.get_vocab_size()} tokens, but model.vocab_size "
                         f"is {vocab_size}: raise data.tokenizer.sample_bytes, lower data.tokenizer.min_frequency "
                         "or lower model.vocab_size")
    return Tokenizer(inner)
