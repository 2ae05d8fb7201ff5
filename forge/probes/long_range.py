"""Long-range accuracy (B2): next-token accuracy on held-out rows longer than the attention window, split
at the window: positions >= sw_window have part of their context outside the window, which only the long-term
memory (and global tokens) can carry; positions below it see their whole context. A long-range accuracy
well below the short-range one says the memory path carries little past the window.
"""
from __future__ import annotations

from typing import Iterable

import torch

from forge.probes.scoring import LogitsFn


@torch.no_grad()
def range_accuracy(logits_fn: LogitsFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], window: int,
                   device) -> dict[str, float]:
    """valid/short_range_acc (positions < window) and valid/long_range_acc (positions >= window) over
    (idx, targets) batches."""
    right = {"short": 0, "long": 0}
    total = {"short": 0, "long": 0}
    for idx, targets in batches:
        correct = logits_fn(idx.to(device)).argmax(-1).cpu() == targets
        far = torch.arange(targets.shape[1]) >= window
        for name, where in (("short", ~far), ("long", far)):
            right[name] += int(correct[:, where].sum())
            total[name] += int(where.sum()) * targets.shape[0]
    return {f"valid/{name}_range_acc": right[name] / total[name] for name in right if total[name]}
