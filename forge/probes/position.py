"""Position probe (E1): does the model find a token at a given distance?

Each item is held-out text with a marked pair planted in it:

    filler[:prefix]  A  B  filler ... (d - 2 tokens) ...  A   -> the answer is B

A is a token that occurs nowhere else in the item, B is a token of the held-out text; the two A's are d
positions apart. Predicting B means attending (or remembering) exactly d tokens back: an induction-style
copy that needs working position information (rotary keys that QK-clip must not break, E1) and, beyond
the attention window, the memory or the global tokens. Chance is about 1 / vocabulary.
eval/position_accuracy/d{d} per distance, eval/position_accuracy their mean (scored by scoring.py).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from forge.probes.scoring import Item

PREFIX = 8    # filler tokens before the first A, so that the pair does not sit at position 0


def position_items(stream: np.ndarray, distances: Sequence[int], n_per_distance: int, vocab_size: int,
                   excluded: Sequence[int], generator: torch.Generator) -> list[Item]:
    """n_per_distance items per distance from a held-out token stream (tiled when too short); `excluded`
    ids (eos, pad) are never drawn as A or B."""
    items = []
    for d in distances:
        length = PREFIX + d - 2
        for _ in range(n_per_distance):
            offset = int(torch.randint(0, max(1, len(stream) - length), (1,), generator=generator))
            filler = np.resize(stream[offset:], length) if len(stream) - offset < length else stream[offset:offset + length]
            filler = [int(t) for t in filler]
            b = _draw(stream, set(excluded), generator)
            a = _draw_absent(vocab_size, set(filler) | set(excluded) | {b}, generator)
            prompt = filler[:PREFIX] + [a, b] + filler[PREFIX:] + [a]
            items.append(Item(tuple(prompt), (b,), f"d{d}"))
    return items


def _draw(stream: np.ndarray, excluded: set[int], generator: torch.Generator) -> int:
    while True:
        token = int(stream[int(torch.randint(0, len(stream), (1,), generator=generator))])
        if token not in excluded:
            return token


def _draw_absent(vocab_size: int, present: set[int], generator: torch.Generator) -> int:
    while True:
        token = int(torch.randint(0, vocab_size, (1,), generator=generator))
        if token not in present:
            return token
