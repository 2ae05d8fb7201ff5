"""A comparison's budget: the same training tokens for every variant (`tokens=N`) or the same training seconds
(`minutes=M`, measured per slice over the training steps alone: evaluation, logging and checkpoints excluded).

tokens=N: each variant is a run of the steps that consume N tokens at its own batch x sequence length (the
curriculum followed), so train.max_steps and with it the lr schedule are set to that: every variant completes
its schedule. minutes=M: the step count each reaches is unknown in advance; each variant's lr schedule follows
its train.max_steps (with a budget shorter than that the decay is cut off alike for all; give
--set train.lr_schedule=constant for a schedule that does not depend on the length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from forge.errors import Problem, SpecError


@dataclass(frozen=True)
class Budget:
    kind: str          # tokens | minutes
    amount: float

    @classmethod
    def parse(cls, text: str) -> "Budget":
        kind, sep, raw = text.partition("=")
        kind = kind.strip()
        try:
            amount = float(raw) if kind == "minutes" else int(raw.replace("_", ""))
        except ValueError:
            amount = None
        if not sep or kind not in ("tokens", "minutes") or amount is None or not math.isfinite(amount) or amount <= 0:
            raise SpecError([Problem(f"--budget {text}", kind, "expected tokens=N (a positive whole number) or "
                                     "minutes=M (positive), e.g. --budget tokens=200000")])
        return cls(kind, amount)

    @property
    def seconds(self) -> float:
        return 60.0 * self.amount

    def overrides(self, resolved) -> list[str]:
        """The budget's own --set for one variant: train.max_steps for a tokens budget."""
        if self.kind != "tokens":
            return []
        spec = resolved.spec.model_dump(mode="json")
        return [f"train.max_steps={steps_for_tokens(spec, int(self.amount))}"]

    def describe(self) -> str:
        if self.kind == "tokens":
            return f"{int(self.amount):,} training tokens per variant"
        return f"{self.amount:g} minutes of training per variant"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "amount": self.amount}


def _stages(spec: dict[str, Any]) -> list[tuple[int, int]]:
    data = spec["data"]
    return [(0, data["seq_len"])] + [(c["from_step"], c["seq_len"]) for c in data.get("curriculum") or []]


def tokens_per_step(spec: dict[str, Any], step: int) -> int:
    """Training tokens of optimizer step `step` (0-based): the global batch x the curriculum's sequence length
    then (forge.data.loader.TrainLoader.seq_len_at)."""
    length = [n for start, n in _stages(spec) if start <= step][-1]
    return spec["data"]["batch_size"] * length


def tokens_through(spec: dict[str, Any], steps: int) -> int:
    """Training tokens of the first `steps` optimizer steps."""
    stages = _stages(spec) + [(max(steps, 0), 0)]
    total = 0
    for (start, length), (nxt, _) in zip(stages, stages[1:]):
        lo, hi = min(start, steps), min(max(nxt, start), steps)
        total += (hi - lo) * length
    return total * spec["data"]["batch_size"]


def steps_for_tokens(spec: dict[str, Any], tokens: int) -> int:
    """The fewest optimizer steps that consume at least `tokens` training tokens (at least one)."""
    steps, used = 0, 0
    while used < tokens:
        used += tokens_per_step(spec, steps)
        steps += 1
    return max(steps, 1)
