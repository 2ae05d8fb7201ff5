"""The during-training checklist: monitors (data in checklists/<name>.toml, `[[monitor]]` tables)
evaluated on the metrics stream as the run goes. Each monitor reads logged records only, over a
window of the most recent logging steps, so a single noisy step never fires it.

Kinds:
    range       mean of `metric` over the window lies in [min, max] (either bound optional)
    decreasing  least-squares slope of `metric` over the window is < 0
    no_spike    latest value is not more than `z` standard deviations above the window's mean
    ordered     mean values of `metrics` (a list) are strictly decreasing (or increasing) in list order
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, model_validator

from forge.errors import Problem, SpecError
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


@dataclass(frozen=True)
class MonitorWarning:
    step: int
    id: str
    title: str
    measured: str


def load_monitors(name: str) -> list[Monitor]:
    """`[[monitor]]` tables of checklists/<name>.toml (extends followed; same id overrides)."""
    from forge.checklist.items import checklist_dir

    def read(path, seen=()) -> dict[str, dict]:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        out: dict[str, dict] = read(path.parent / raw["extends"], (*seen, path)) if "extends" in raw else {}
        for entry in raw.get("monitor", []):
            out[entry["id"]] = {**out.get(entry["id"], {}), **entry}
        return out

    path = checklist_dir() / f"{name}.toml"
    monitors = []
    for n, entry in enumerate(read(path).values()):
        try:
            monitors.append(Monitor.model_validate(entry))
        except ValidationError as err:
            e = err.errors()[0]
            raise SpecError([Problem(str(path), f"monitor.{n}." + ".".join(map(str, e["loc"])), e["msg"])],
                            header="invalid monitors") from None
    return monitors


class MonitorSet:
    """Feeds logged records to every monitor; returns the warnings that are new at this step."""

    def __init__(self, monitors: list[Monitor]):
        self.monitors = monitors
        self.history: list[dict[str, Any]] = []
        self.active: set[str] = set()

    def observe(self, record: dict[str, Any]) -> list[MonitorWarning]:
        self.history.append(record)
        fired = []
        for m in self.monitors:
            measured = evaluate(m, self.history)
            if measured is None:
                self.active.discard(m.id)
            elif m.id not in self.active:  # report when it starts firing, not at every step
                self.active.add(m.id)
                fired.append(MonitorWarning(record["step"], m.id, m.title, measured))
        return fired


def _series(history: list[dict], metric: str, window: int, after: int) -> list[float]:
    values = [r[metric] for r in history if r.get("step", 0) >= after and isinstance(r.get(metric), (int, float))]
    return values[-window:]


def evaluate(m: Monitor, history: list[dict[str, Any]]) -> str | None:
    """None when healthy (or not enough data yet), else the measured evidence."""
    if m.kind == "ordered":
        series = [_series(history, name, m.window, m.after_step) for name in m.metrics]
        if any(len(s) < m.window for s in series):
            return None
        means = [sum(s) / len(s) for s in series]
        pairs = zip(means, means[1:])
        ok = all(a > b for a, b in pairs) if m.direction == "decreasing" else all(a < b for a, b in pairs)
        return None if ok else ", ".join(f"{n}={v:.4g}" for n, v in zip(m.metrics, means))
    values = _series(history, m.metric, m.window, m.after_step)
    if len(values) < m.window:
        return None
    if m.kind == "range":
        mean = sum(values) / len(values)
        low = m.min is not None and mean < m.min
        high = m.max is not None and mean > m.max
        return f"{m.metric} mean {mean:.4g} over {len(values)} logs" if (low or high) else None
    if m.kind == "decreasing":
        slope = _slope(values)
        return None if slope < 0 else f"{m.metric} slope {slope:+.3g}/log over {len(values)} logs"
    # no_spike: the latest value against the window before it
    before, latest = values[:-1], values[-1]
    mean = sum(before) / len(before)
    std = math.sqrt(sum((v - mean) ** 2 for v in before) / len(before))
    if std == 0 or (latest - mean) / std <= m.z:
        return None
    return f"{m.metric} {latest:.4g} is {(latest - mean) / std:.1f} sd above its window mean {mean:.4g}"


def _slope(values: list[float]) -> float:
    n = len(values)
    xm, ym = (n - 1) / 2, sum(values) / n
    return sum((i - xm) * (v - ym) for i, v in enumerate(values)) / sum((i - xm) ** 2 for i in range(n))
