"""The during-training checklist: monitors (data in checklists/<name>.toml, `[[monitor]]` tables)
evaluated on the metrics stream as the run goes, with the shared rule engine (forge.metrics.engine):
each reads logged records only, over a window of the most recent logging steps, so a single noisy
step never fires it. `forge diagnose` evaluates the same monitors over the whole run.

Kinds (each compiles to one engine condition that holds when the monitor warns):
    range       mean of `metric` over the window outside [min, max] (either bound optional)
    decreasing  trend (least-squares) of `metric` over the window is not below 0
    no_spike    latest value more than `z` standard deviations above the window before it
    ordered     window means of `metrics` (a list) not strictly decreasing (or increasing) in list order
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from forge.metrics.catalogue import load_catalogue
from forge.metrics.engine import Condition, Records, load_entries
from forge.metrics.engine import evaluate as evaluate_condition
from forge.spec.base import Section


class Monitor(Section):
    id: str = Field(pattern=r"^([A-G][1-3]|OBS|PERF)-[a-z0-9-]+$")
    title: str
    kind: Literal["range", "decreasing", "no_spike", "ordered"]
    metric: Optional[str] = None
    metrics: list[str] = Field(default_factory=list)
    direction: Literal["decreasing", "increasing"] = "decreasing"
    window: int = Field(5, ge=2)
    min: Optional[float] = None
    max: Optional[float] = None
    z: float = 4.0
    after_step: int = Field(0, ge=0, description="Evaluate only from this step on (e.g. after ACT warmup).")

    @model_validator(mode="after")
    def check_fields(self) -> "Monitor":
        if self.kind == "ordered" and len(self.metrics) < 2:
            raise ValueError("kind 'ordered' needs `metrics` with at least two names")
        if self.kind != "ordered" and not self.metric:
            raise ValueError(f"kind {self.kind!r} needs `metric`")
        if self.kind == "range" and self.min is None and self.max is None:
            raise ValueError("kind 'range' needs `min` and/or `max`")
        return self

    @property
    def condition(self) -> Condition:
        """The engine condition that holds when this monitor warns."""
        common = dict(window=self.window, after_step=self.after_step)
        if self.kind == "ordered":
            return Condition(metrics=self.metrics, signal="disorder", direction=self.direction, op=">", value=0,
                             **common)
        if self.kind == "decreasing":
            return Condition(metric=self.metric, signal="trend", op=">=", value=0, **common)
        if self.kind == "no_spike":
            return Condition(metric=self.metric, signal="zlast", op=">", value=self.z, **common)
        if self.min is not None and self.max is not None:
            return Condition(metric=self.metric, signal="mean", op="outside", range=[self.min, self.max], **common)
        if self.min is not None:
            return Condition(metric=self.metric, signal="mean", op="<", value=self.min, **common)
        return Condition(metric=self.metric, signal="mean", op=">", value=self.max, **common)


@dataclass(frozen=True)
class MonitorWarning:
    step: int
    id: str
    title: str
    measured: str


def load_monitors(name: str) -> list[Monitor]:
    """`[[monitor]]` tables of checklists/<name>.toml (extends followed; same id overrides); every metric
    they name must be in the catalogue."""
    from forge.checklist.items import checklist_dir

    return load_entries(checklist_dir() / f"{name}.toml", "monitor", Monitor, "invalid monitors",
                        lambda m: [m.condition])


def evaluate(m: Monitor, history: list[dict[str, Any]] | Records) -> str | None:
    """The evidence when the monitor warns; None when healthy or not decidable yet."""
    recs = history if isinstance(history, Records) else Records(history, load_catalogue())
    out = evaluate_condition(m.condition, recs, {})
    return out.text if out.state == "holds" else None


class MonitorSet:
    """Feeds logged records to every monitor; returns the warnings that are new at this step."""

    def __init__(self, monitors: list[Monitor]):
        self.monitors = monitors
        self.history: list[dict[str, Any]] = []
        self.active: set[str] = set()
        self._catalogue = load_catalogue() if monitors else None

    def observe(self, record: dict[str, Any]) -> list[MonitorWarning]:
        self.history.append(record)
        recs = Records(self.history, self._catalogue) if self.monitors else None
        fired = []
        for m in self.monitors:
            measured = evaluate(m, recs)
            if measured is None:
                self.active.discard(m.id)
            elif m.id not in self.active:  # report when it starts firing, not at every step
                self.active.add(m.id)
                fired.append(MonitorWarning(record["step"], m.id, m.title, measured))
        return fired
