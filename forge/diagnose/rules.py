"""The debugging decision tree as data: rules (checklists/diagnose.toml) evaluated on a run's record.

A rule fires when every one of its `when` conditions holds on the run's metrics (robust windowed
signals, forge.diagnose.signals), every `requires` condition holds on the run's spec, and its
`status` / `error_contains` match the run's status. A condition whose metric has too few points
makes the rule undecidable (it does not fire). Each finding carries its evidence (the numbers and
the steps they came from), a confidence, and the rule's remediations as spec changes.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, model_validator

from forge.diagnose.signals import SIGNALS, compute
from forge.errors import Problem, SpecError
from forge.spec.base import Section

PROBLEMS = ("loss-not-decreasing", "act-pathological-halting", "gate-saturation", "out-of-memory",
            "training-too-slow", "instability", "observability", "budget", "merge")

_OPS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
        "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


class Condition(Section):
    metric: str
    signal: str
    window: int = Field(5, ge=1)
    op: Literal[">", ">=", "<", "<="]
    value: Optional[float] = None
    value_key: Optional[str] = Field(None, description="Threshold read from the run's spec (dotted key) ...")
    value_offset: float = Field(0.0, description="... plus this offset (e.g. t_max - 0.1).")
    after_key: Optional[str] = Field(None, description="Only points at steps >= this spec value "
                                                       "(e.g. model.act.warmup_steps).")
    relative_to: Optional[str] = Field(None, description="Compare signal(metric) / signal(relative_to).")

    @model_validator(mode="after")
    def check(self) -> "Condition":
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown signal {self.signal!r}; known: {', '.join(SIGNALS)}")
        if (self.value is None) == (self.value_key is None):
            raise ValueError("give exactly one of value / value_key")
        return self


class SpecCondition(Section):
    key: str
    op: Literal["==", "!=", ">", ">=", "<", "<=", "set"]
    value: Any = None


class Remedy(Section):
    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> new value")
    scale: dict[str, float] = Field(default_factory=dict, description="dotted key -> factor of its current value")
    rationale: str

    @model_validator(mode="after")
    def check(self) -> "Remedy":
        if not self.set and not self.scale:
            raise ValueError("a remedy changes at least one key (set or scale)")
        return self


class Rule(Section):
    id: str = Field(pattern=r"^[A-G][1-3]-[a-z0-9-]+$")
    problem: Literal[PROBLEMS]  # type: ignore[valid-type]
    title: str
    explain: str
    when: list[Condition] = Field(default_factory=list)
    requires: list[SpecCondition] = Field(default_factory=list)
    status: Optional[Literal["running", "finished", "failed", "interrupted"]] = None
    error_contains: Optional[str] = None
    remedy: list[Remedy] = Field(default_factory=list)

    @model_validator(mode="after")
    def check(self) -> "Rule":
        if not (self.when or self.status or self.error_contains):
            raise ValueError("a rule needs `when` conditions or a status / error_contains match")
        return self


@dataclass(frozen=True)
class Evidence:
    metric: str
    signal: str
    value: float
    op: str
    threshold: float
    first_step: int
    last_step: int

    def __str__(self) -> str:
        return (f"{self.metric} {self.signal} {self.value:.4g} {self.op} {self.threshold:.4g} "
                f"(steps {self.first_step}-{self.last_step})")


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any


@dataclass(frozen=True)
class Suggestion:
    changes: tuple[Change, ...]
    rationale: str


@dataclass
class Finding:
    rule: Rule
    evidence: list[Evidence]
    confidence: float
    suggestions: list[Suggestion] = field(default_factory=list)
    note: str = ""


def load_rules(path: Path) -> list[Rule]:
    text = path.read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    rules = []
    for n, entry in enumerate(raw.get("rule", [])):
        try:
            rules.append(Rule.model_validate(entry))
        except ValidationError as err:
            e = err.errors()[0]
            raise SpecError([Problem(str(path), f"rule.{n}." + ".".join(map(str, e["loc"])), e["msg"])],
                            header="invalid diagnose rules") from None
    ids = [r.id for r in rules]
    if len(ids) != len(set(ids)):
        raise SpecError([Problem(str(path), "rule.id", "rule ids must be unique")], header="invalid diagnose rules")
    return rules


def spec_value(spec: dict, dotted: str) -> Any:
    """The value at a dotted key; None for an optional key the spec leaves unset."""
    node: Any = spec
    for part in dotted.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _series(records: list[dict], metric: str, after: int) -> list[tuple[int, float]]:
    return [(r["step"], r[metric]) for r in records if metric in r and r["step"] >= after]


def _metric_name(name: str, spec: dict) -> str:
    """`{last}` in a metric name is the last outer step (t_max - 1), e.g. loss/step_{last}."""
    return name.format(last=spec["model"]["trm"]["t_max"] - 1) if "{" in name else name


def _margin(value: float, threshold: float) -> float:
    scale = max(abs(threshold), 1e-3)
    return min(1.0, abs(value - threshold) / scale)


def evaluate_rule(rule: Rule, records: list[dict], spec: dict, status: dict) -> Finding | None:
    if rule.status and status.get("status") != rule.status:
        return None
    if rule.error_contains and rule.error_contains.lower() not in str(status.get("error", "")).lower():
        return None
    for req in rule.requires:
        current = spec_value(spec, req.key)
        if req.op == "set":
            if current is None:
                return None
        elif current is None or not _OPS[req.op](current, req.value):
            return None
    evidence = []
    for cond in rule.when:
        after = int(spec_value(spec, cond.after_key)) if cond.after_key else 0
        threshold = cond.value if cond.value is not None else float(spec_value(spec, cond.value_key)) + cond.value_offset
        metric = _metric_name(cond.metric, spec)
        got = compute(cond.signal, _series(records, metric, after), cond.window)
        if got is None:
            return None
        value, first, last = got
        if cond.relative_to:
            metric = f"{metric} / {_metric_name(cond.relative_to, spec)}"
            base = compute(cond.signal, _series(records, _metric_name(cond.relative_to, spec), after), cond.window)
            if base is None or base[0] == 0:
                return None
            value = value / base[0]
        if math.isnan(value) or not _OPS[cond.op](value, threshold):
            return None
        evidence.append(Evidence(metric, cond.signal, value, cond.op, threshold, first, last))
    margins = [_margin(e.value, e.threshold) for e in evidence]
    confidence = 0.5 + 0.5 * (sum(margins) / len(margins)) if margins else 0.9
    return Finding(rule, evidence, round(confidence, 3), _suggestions(rule, spec))


def _suggestions(rule: Rule, spec: dict) -> list[Suggestion]:
    out = []
    for remedy in rule.remedy:
        changes = [Change(k, spec_value(spec, k), v) for k, v in remedy.set.items()]
        for key, factor in remedy.scale.items():
            before = spec_value(spec, key)
            after = before * factor
            changes.append(Change(key, before, int(after) if isinstance(before, int) else after))
        changes = [c for c in changes if c.before != c.after]
        if changes:  # a remedy the spec already carries is no suggestion
            out.append(Suggestion(tuple(changes), remedy.rationale))
    return out


def diagnose(rules: list[Rule], records: list[dict], spec: dict, status: dict) -> list[Finding]:
    """Every finding, most confident first."""
    findings = [f for f in (evaluate_rule(r, records, spec, status) for r in rules) if f is not None]
    return sorted(findings, key=lambda f: -f.confidence)
