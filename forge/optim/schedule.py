"""Learning-rate schedule: linear warmup from 0, then cosine / linear decay to min_lr_ratio, or constant.

The schedule computes one factor per optimizer step and multiplies every group's own base lr by it
(Muon, AdamW and every lr override alike), through the optimizer's set_lr_factor: the lr written is
the lr the next step() applies.
"""
from __future__ import annotations

import math
from typing import Any

from forge.spec.training import TrainSpec


def lr_factor(step: int, spec: TrainSpec) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps  # reaches 1 on the last warmup step, never applies lr 0
    if spec.lr_schedule == "constant":
        return 1.0
    decay_steps = max(1, spec.max_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / decay_steps)
    if spec.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * shape


class LrSchedule:
    """Call step() after each optimizer step; the factor for the next step is then in place."""

    def __init__(self, spec: TrainSpec, optimizer: Any):
        self.spec = spec
        self.optimizer = optimizer
        self.step_count = 0
        self._apply()

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def factor(self) -> float:
        return lr_factor(self.step_count, self.spec)

    def _apply(self) -> None:
        self.optimizer.set_lr_factor(self.factor())

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def build_lr_schedule(spec: TrainSpec, optimizer: Any) -> LrSchedule:
    """The schedule of [train] (lr_schedule, warmup_steps, max_steps, min_lr_ratio) over `optimizer`."""
    return LrSchedule(spec, optimizer)
