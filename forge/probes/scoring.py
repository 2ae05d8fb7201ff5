"""The one scoring path of the exact-match probes (reasoning, position): an item is a prompt and the answer
that must follow it; the model gets it right when its greedy prediction at every answer position is the
answer token, fed the prompt and the answer so far (teacher forcing).

For a causal model this is exactly "greedy generation from the prompt produces the answer": position t's
prediction depends only on tokens <= t, and those are the prompt and the correct answer prefix. One forward
per batch of items replaces a generation loop. The answer ends with a terminator (eos or a newline), so
"18" does not match "180".

Anything that maps token ids (B, T) to next-token logits (B, T, V) can be scored: the real model
(`full_depth_logits`), or a reference such as a lookup oracle, through this same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Item:
    prompt: tuple[int, ...]
    answer: tuple[int, ...]      # includes its terminator
    kind: str                    # group name in the metrics (e.g. "gsm8k", "arithmetic", "d100")


def full_depth_logits(model) -> LogitsFn:
    """The model's final-step logits (every outer step runs), in eval mode, without gradients."""
    @torch.no_grad()
    def logits(idx: torch.Tensor) -> torch.Tensor:
        return model(idx, return_logits=True).logits
    return logits


@torch.no_grad()
def exact_match(logits_fn: LogitsFn, items: Sequence[Item], pad_id: int, device, batch_size: int) -> list[bool]:
    """Per item: does the greedy prediction reproduce the whole answer? Items are right-padded (padding lies
    after every scored position, so causality keeps it invisible) and scored batch_size at a time."""
    results: list[bool] = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        width = max(len(it.prompt) + len(it.answer) - 1 for it in batch)
        idx = torch.full((len(batch), width), pad_id, dtype=torch.long)
        scored = torch.zeros(len(batch), width, dtype=torch.bool)
        wanted = torch.zeros(len(batch), width, dtype=torch.long)
        for row, it in enumerate(batch):
            seq = it.prompt + it.answer[:-1]           # the last answer token is predicted, never fed
            idx[row, :len(seq)] = torch.tensor(seq)
            first = len(it.prompt) - 1                 # the position that predicts answer[0]
            scored[row, first:first + len(it.answer)] = True
            wanted[row, first:first + len(it.answer)] = torch.tensor(it.answer)
        predicted = logits_fn(idx.to(device)).argmax(-1).cpu()
        right = (predicted == wanted) | ~scored
        results.extend(bool(r) for r in right.all(dim=1))
    return results


def accuracy_by_kind(items: Sequence[Item], correct: Sequence[bool]) -> dict[str, float]:
    """Share of exact matches per item kind, and over all items ("all")."""
    kinds: dict[str, list[bool]] = {}
    for it, ok in zip(items, correct):
        kinds.setdefault(it.kind, []).append(ok)
    out = {kind: sum(v) / len(v) for kind, v in kinds.items()}
    out["all"] = sum(correct) / len(correct) if correct else 0.0
    return out
