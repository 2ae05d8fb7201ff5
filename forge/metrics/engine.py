"""The one rule engine: conditions over a metrics stream, read the same way by the live monitors
(forge/train/monitors.py), `forge diagnose` (forge/diagnose/rules.py) and the success criteria
(forge/report/criteria.py).

A condition applies a signal (forge.metrics.signals) to a window of one metric's logged series and
compares it with a threshold (a number, or a value of the run's spec). Its outcome is three-valued:
`holds`, `fails`, or `undecidable` with the reason (metric never logged, window not reached, spec key
unset). A conjunction holds when all hold, fails when any fails, and is undecidable otherwise.

Counters (catalogue kind `counter`) are read as increments between logged steps, so one NaN burst
early in a run is not "non-finite now"; derived metrics (kind `derived`) are a counter's rate.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from forge.metrics.catalogue import Catalogue
from forge.metrics.signals import SIGNALS, compute, mean
from forge.spec.base import Section

OPS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
       "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


def spec_value(spec: dict, dotted: str) -> Any:
    """The value at a dotted key of a (resolved, JSON-dumped) spec; None for a key it leaves unset."""
    node: Any = spec
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


class SpecCondition(Section):
    key: str
    op: Literal["==", "!=", ">", ">=", "<", "<=", "set"]
    value: Any = None

    def holds(self, spec: dict) -> bool:
        current = spec_value(spec, self.key)
        if self.op == "set":
            return current is not None
        return current is not None and OPS[self.op](current, self.value)


class Condition(Section):
    metric: str = ""
    metrics: list[str] = Field(default_factory=list, description="signal 'disorder': the series to compare")
    signal: str
    window: int = Field(5, ge=1, description="Logged points the signal reads (run-level signals: each end).")
    op: Literal[">", ">=", "<", "<=", "inside", "outside"]
    value: Optional[float] = None
    range: Optional[list[float]] = Field(None, min_length=2, max_length=2,
                                         description="op inside / outside: [low, high]")
    value_key: Optional[str] = Field(None, description="Threshold read from the run's spec (dotted key) ...")
    value_offset: float = Field(0.0, description="... plus this offset (e.g. t_max - 0.1).")
    after_key: Optional[str] = Field(None, description="Only points at steps >= this spec value "
                                                       "(e.g. model.act.warmup_steps).")
    after_step: int = Field(0, ge=0, description="Only points at steps >= this step.")
    relative_to: Optional[str] = Field(None, description="Compare signal(metric) / signal(relative_to).")
    direction: Literal["decreasing", "increasing"] = "decreasing"

    @model_validator(mode="after")
    def check(self) -> "Condition":
        if self.signal not in (*SIGNALS, "disorder"):
            raise ValueError(f"unknown signal {self.signal!r}; known: {', '.join(SIGNALS)}, disorder")
        if (self.signal == "disorder") != bool(self.metrics) or (not self.metrics) != bool(self.metric):
            raise ValueError("give `metric`, or `metrics` (two or more) with signal 'disorder'")
        if self.op in ("inside", "outside"):
            if self.range is None or self.range[0] > self.range[1]:
                raise ValueError(f"op {self.op!r} needs range = [low, high]")
        elif (self.value is None) == (self.value_key is None):
            raise ValueError("give exactly one of value / value_key")
        return self

    def names(self) -> list[str]:
        return [n for n in (self.metric, *self.metrics, self.relative_to or "") if n]


@dataclass(frozen=True)
class Outcome:
    state: Literal["holds", "fails", "undecidable"]
    text: str                    # evidence (holds / fails) or the reason (undecidable)
    value: float | None = None
    threshold: float | None = None
    margin: float = 0.0          # relative distance from the threshold, 0..1
    first: int | None = None     # the steps of the window the signal read (a heal's onset: forge.train.heal)
    last: int | None = None

    def __str__(self) -> str:
        return self.text


class Records:
    """A metrics stream (records with a step), read through the catalogue."""

    def __init__(self, records: list[dict], catalogue: Catalogue):
        self.records, self.catalogue = records, catalogue
        self._cache: dict[str, list[tuple[int, float | None]]] = {}

    def upto(self, step: int) -> "Records":
        return Records([r for r in self.records if r["step"] <= step], self.catalogue)

    @property
    def steps(self) -> list[int]:
        return [r["step"] for r in self.records]

    def raw(self, name: str) -> list[tuple[int, float | None]]:
        if name not in self._cache:
            entry = self.catalogue.entry(name)
            if entry is not None and entry.kind == "derived" and not any(name in r for r in self.records):
                self._cache[name] = [(s, None if v is None else v * entry.per_steps / gap)
                                     for s, v, gap in self._increments(entry.rate_of)]
            elif entry is not None and entry.kind == "counter":
                self._cache[name] = [(s, v) for s, v, _ in self._increments(name)]
            else:
                self._cache[name] = [(r["step"], r[name]) for r in self.records if name in r]
        return self._cache[name]

    def _increments(self, counter: str) -> list[tuple[int, float | None, int]]:
        """(step, increase since the previous logged point, steps between them); a counter starts at 0."""
        out, prev_step, prev = [], 0, 0.0
        for r in self.records:
            if r.get(counter) is None:
                continue
            v = r[counter]
            out.append((r["step"], v - prev if v >= prev else v, max(1, r["step"] - prev_step)))
            prev_step, prev = r["step"], v
        return out

    def series(self, name: str, after: int = 0) -> list[tuple[int, float | None]]:
        return [(s, v) for s, v in self.raw(name) if s >= after]

    def values(self, name: str) -> list[float]:
        return [v for _, v in self.raw(name) if v is not None and math.isfinite(v)]


def run_spec(run) -> dict:
    """The resolved spec a run directory (forge.train.run_dir.RunDir) holds, migrated to the current run format,
    with train.device the device its last launch actually used where the spec said "auto"."""
    spec = run.spec_data()
    launches = run.launches(check=False)
    device = launches[-1].get("device") if launches else None
    if spec.get("train", {}).get("device") == "auto" and device in ("cpu", "cuda"):
        spec["train"]["device"] = device
    return spec


def metric_name(name: str, spec: dict) -> str:
    """`{last}` in a metric name is the last outer step (t_max - 1), e.g. loss/step_{last}."""
    if "{last}" in name:
        t_max = spec_value(spec, "model.trm.t_max") or 1
        return name.replace("{last}", str(int(t_max) - 1))
    return name


def _margin(value: float, threshold: float) -> float:
    return min(1.0, abs(value - threshold) / max(abs(threshold), 1e-3))


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def evaluate(cond: Condition, recs: Records, spec: dict) -> Outcome:
    after = cond.after_step
    if cond.after_key:
        got = spec_value(spec, cond.after_key)
        if got is None:
            return Outcome("undecidable", f"the spec has no {cond.after_key}")
        after = max(after, int(got))
    if cond.op in ("inside", "outside"):
        threshold: Any = cond.range
    elif cond.value is not None:
        threshold = cond.value
    else:
        got = spec_value(spec, cond.value_key)
        if not isinstance(got, (int, float)):
            return Outcome("undecidable", f"the spec has no number at {cond.value_key}")
        threshold = float(got) + cond.value_offset
    if cond.signal == "disorder":
        return _disorder(cond, recs, spec, after)
    metric = metric_name(cond.metric, spec)
    series = recs.series(metric, after)
    got = compute(cond.signal, series, cond.window)
    if got is None:
        return Outcome("undecidable", _missing(metric, series, cond, after))
    value, first, last = got
    shown = metric
    if cond.relative_to:
        base_name = metric_name(cond.relative_to, spec)
        base_series = recs.series(base_name, after)
        base = compute(cond.signal, base_series, cond.window)
        if base is None:
            return Outcome("undecidable", _missing(base_name, base_series, cond, after))
        if base[0] == 0:
            return Outcome("undecidable", f"{base_name} {cond.signal} is 0 (no ratio)")
        value, shown = value / base[0], f"{metric} / {base_name}"
    if math.isnan(value):
        return Outcome("undecidable", f"{shown} {cond.signal} is NaN")
    return _compare(f"{shown} {cond.signal}", value, cond.op, threshold, first, last)


def _compare(what: str, value: float, op: str, threshold: Any, first: int, last: int) -> Outcome:
    steps = f"(steps {first}-{last})"
    if op in ("inside", "outside"):
        low, high = threshold
        inside = low <= value <= high
        holds = inside if op == "inside" else not inside
        edge = low if abs(value - low) < abs(value - high) else high
        return Outcome("holds" if holds else "fails",
                       f"{what} {_fmt(value)} {'in' if inside else 'outside'} [{_fmt(low)}, {_fmt(high)}] {steps}",
                       value, edge, _margin(value, edge), first, last)
    holds = OPS[op](value, threshold)
    negated = {">": "<=", ">=": "<", "<": ">=", "<=": ">"}[op]
    return Outcome("holds" if holds else "fails",
                   f"{what} {_fmt(value)} {op if holds else negated} {_fmt(threshold)} {steps}",
                   value, threshold, _margin(value, threshold), first, last)


def _missing(metric: str, series: list, cond: Condition, after: int) -> str:
    need = 2 * cond.window if cond.signal in ("improvement", "growth") else cond.window
    since = f" from step {after}" if after else ""
    if not series:
        return f"{metric} not logged{since}"
    return f"{metric}: {len(series)} logged point(s){since}, the signal needs {need}"


def _disorder(cond: Condition, recs: Records, spec: dict, after: int) -> Outcome:
    """holds (value 1) when the window means of `metrics` are NOT strictly ordered in `direction`."""
    names = [metric_name(n, spec) for n in cond.metrics]
    means = []
    for name in names:
        series = [(s, v) for s, v in recs.series(name, after) if v is not None and math.isfinite(v)][-cond.window:]
        if len(series) < cond.window:
            return Outcome("undecidable", _missing(name, series, cond, after))
        means.append(mean([v for _, v in series]))
    pairs = list(zip(means, means[1:]))
    ordered = all(a > b for a, b in pairs) if cond.direction == "decreasing" else all(a < b for a, b in pairs)
    shown = ", ".join(f"{n} {_fmt(v)}" for n, v in zip(names, means))
    out = _compare("disorder", 0.0 if ordered else 1.0, cond.op, cond.value, 0, 0)
    text = f"window means {shown}: {'' if ordered else 'not '}{cond.direction}"
    return Outcome(out.state, text, out.value, out.threshold, 1.0)


def all_of(outcomes: list[Outcome]) -> Literal["holds", "fails", "undecidable"]:
    if any(o.state == "fails" for o in outcomes):
        return "fails"
    if any(o.state == "undecidable" for o in outcomes):
        return "undecidable"
    return "holds"


# ------------------------------------------------------------------------- checklist tables
@dataclass(frozen=True)
class Table:
    """One `[[table]]` entry of a checklist file, after `extends` (same id overrides field by field)."""

    entry: dict
    path: Path
    line: int | None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line else str(self.path)


def read_tables(path: Path, table: str, seen: tuple[Path, ...] = ()) -> list[Table]:
    """Entries of `[[table]]` in a checklist file and the files it extends, merged by id."""
    from forge.errors import Problem, SpecError
    from forge.spec.load import key_lines

    if path.resolve() in seen:
        raise SpecError([Problem(str(path), "extends", "cyclic checklist extends")], header="invalid checklist")
    text = path.read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    merged: dict[str, Table] = {}
    if "extends" in raw:
        merged = {t.entry["id"]: t for t in read_tables(path.parent / raw["extends"], table, (*seen, path.resolve()))}
    lines = key_lines(text)
    for n, entry in enumerate(raw.get(table, [])):
        line = lines.get((table, n, "id")) or lines.get((table, n))
        base = merged.get(entry.get("id"))
        merged[entry.get("id")] = Table({**(base.entry if base else {}), **entry}, path, line)
    return list(merged.values())


def load_entries(path: Path, table: str, model: type, header: str, conditions) -> list:
    """The validated `[[table]]` entries of a checklist file (extends followed). A schema error, or a
    metric that a condition (`conditions(entry)`) names and the catalogue does not declare, is an error
    at the entry's file and line."""
    from pydantic import ValidationError

    from forge.errors import Problem, SpecError
    from forge.metrics.catalogue import load_catalogue

    catalogue = load_catalogue()
    out = []
    for n, t in enumerate(read_tables(path, table)):
        try:
            entry = model.model_validate(t.entry)
        except ValidationError as err:
            e = err.errors()[0]
            raise SpecError([Problem(t.where, f"{table}.{n}." + ".".join(map(str, e["loc"])), e["msg"])],
                            header=header) from None
        for cond in conditions(entry):
            for name in cond.names():
                catalogue.check(name, t.where, f"{table} {entry.id}")
        out.append(entry)
    return out
