"""The debugging decision tree as data: rules (checklists/diagnose.toml) evaluated on a run's record
with the shared rule engine (forge.metrics.engine).

Every rule ends in one verdict:
    fired        all its `when` conditions hold on the run's metrics (or its status matches)
    clear        some condition fails: the evidence says this failure mode is absent
                 (`recovered` when it would have fired earlier in the run: a spike that passed)
    undecidable  no condition fails but some cannot be evaluated: the reason says why
    n/a          its `requires` do not hold on the run's spec (the branch does not exist here)
Findings (fired) rank by the design's severity (critical before monitor), then confidence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from forge.errors import Problem, SpecError
from forge.metrics.catalogue import load_catalogue
from forge.metrics.engine import (Condition, Outcome, Records, SpecCondition, all_of, evaluate, load_entries,
                                  spec_value)
from forge.spec.base import Section
from forge.spec.render import Change   # a remedy changes spec keys as a spec diff does

PROBLEMS = ("loss-not-decreasing", "act-pathological-halting", "gate-saturation", "part-unused", "out-of-memory",
            "training-too-slow", "instability", "observability", "budget", "merge", "run")
STATES = ("fired", "undecidable", "clear", "n/a")
RUN_STATUSES = ("running", "finished", "failed", "interrupted", "stale")


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
    id: str = Field(pattern=r"^([A-G][1-3]|RUN|OBS|PERF)-[a-z0-9-]+$")
    problem: Literal[PROBLEMS]  # type: ignore[valid-type]
    severity: Literal["critical", "monitor"] = Field(description="The design's criticality: critical findings "
                                                                  "rank before monitor findings.")
    title: str
    explain: str
    when: list[Condition] = Field(default_factory=list)
    requires: list[SpecCondition] = Field(default_factory=list)
    status: list[Literal[RUN_STATUSES]] = Field(default_factory=list)  # type: ignore[valid-type]
    error_contains: Optional[str] = None
    error_lacks: Optional[str] = None
    on_spec: bool = Field(False, description="Fires whenever `requires` hold (a spec-only finding).")
    monitor: bool = Field(False, description="A during-training monitor evaluated over the whole run: ranks "
                                             "after the tree's rules of the same severity.")
    remedy: list[Remedy] = Field(default_factory=list)

    @model_validator(mode="after")
    def check(self) -> "Rule":
        if not (self.when or self.status or self.on_spec):
            raise ValueError("a rule needs `when` conditions, a `status` match or on_spec = true")
        return self


@dataclass(frozen=True)
class Suggestion:
    changes: tuple[Change, ...]
    rationale: str


@dataclass
class Verdict:
    rule: Rule
    state: str                       # fired | clear | undecidable | n/a
    evidence: list[Outcome] = field(default_factory=list)
    confidence: float = 0.0
    suggestions: list[Suggestion] = field(default_factory=list)
    recovered: str = ""              # clear now; fired earlier (steps)
    applied: list[str] = field(default_factory=list)   # remedies the spec already carries

    @property
    def reason(self) -> str:
        return "; ".join(o.text for o in self.evidence)

    def rank(self) -> tuple:
        return STATES.index(self.state), self.rule.severity != "critical", self.rule.monitor, -self.confidence


def load_rules(path: Path) -> list[Rule]:
    rules = load_entries(path, "rule", Rule, "invalid diagnose rules", lambda r: r.when)
    ids = [r.id for r in rules]
    if len(ids) != len(set(ids)):
        raise SpecError([Problem(str(path), "rule.id", "rule ids must be unique")], header="invalid diagnose rules")
    return rules


def _status_outcome(rule: Rule, status: dict) -> Outcome:
    name = status.get("status")
    if name is None:
        return Outcome("undecidable", "no run status (status.json)")
    error = str(status.get("error") or "")
    matches = (name in rule.status and (rule.error_contains is None or rule.error_contains.lower() in error.lower())
               and (rule.error_lacks is None or rule.error_lacks.lower() not in error.lower()))
    shown = f"status {name}" + (f" at step {status['step']}" if status.get("step") is not None else "")
    shown += f": {error[:200]}" if error else ""
    return Outcome("holds" if matches else "fails", shown, margin=1.0)


def evaluate_rule(rule: Rule, recs: Records, spec: dict, status: dict | None) -> Verdict:
    """status None: a plain metrics file, which has no run status (status rules are n/a)."""
    if rule.status and status is None:
        return Verdict(rule, "n/a", [Outcome("fails", "no run status: a plain metrics file")])
    if not all(req.holds(spec) for req in rule.requires):
        unmet = [r for r in rule.requires if not r.holds(spec)]
        return Verdict(rule, "n/a", [Outcome("fails", f"spec: {unmet[0].key} = {spec_value(spec, unmet[0].key)!r}")])
    outcomes = [_status_outcome(rule, status)] if rule.status else []
    outcomes += [evaluate(c, recs, spec) for c in rule.when]
    if rule.on_spec:
        outcomes.append(Outcome("holds", "spec: " + ", ".join(f"{r.key} = {spec_value(spec, r.key)!r}"
                                                               for r in rule.requires), margin=1.0))
    state = {"holds": "fired", "fails": "clear", "undecidable": "undecidable"}[all_of(outcomes)]
    if state == "clear":   # the failing condition is the evidence; undecidable ones say what else is missing
        outcomes = [o for o in outcomes if o.state == "fails"][:1]
    elif state == "undecidable":
        outcomes = [o for o in outcomes if o.state == "undecidable"]
    confidence = 0.5 + 0.5 * sum(o.margin for o in outcomes) / len(outcomes) if state == "fired" else 0.0
    suggestions, applied = _suggestions(rule, spec)
    return Verdict(rule, state, outcomes, round(confidence, 3), suggestions, applied=applied)


def _cutoffs(recs: Records, points: int = 40) -> list[tuple[int, Records]]:
    """The run as it stood at up to `points` earlier logged steps."""
    steps = recs.steps[:-1]
    return [(s, recs.upto(s)) for s in steps[::max(1, len(steps) // points)]]


def _recovered(rule: Rule, cutoffs: list[tuple[int, Records]], spec: dict, status: dict) -> str:
    """A rule that is clear now but would have fired earlier in the run: a spike that recovered is
    reported as such, not as a persistent fault."""
    if not rule.when or rule.status:
        return ""
    hits = [s for s, recs in cutoffs if evaluate_rule(rule, recs, spec, status).state == "fired"]
    return f"fired at steps {hits[0]}-{hits[-1]}, clear since" if hits else ""


def _suggestions(rule: Rule, spec: dict) -> tuple[list[Suggestion], list[str]]:
    out, applied = [], []
    for remedy in rule.remedy:
        changes = [Change(k, spec_value(spec, k), v) for k, v in remedy.set.items()]
        for key, factor in remedy.scale.items():
            before = spec_value(spec, key)
            if isinstance(before, (int, float)):
                after = before * factor
                changes.append(Change(key, before, int(after) if isinstance(before, int) else after))
        if changes and all(c.before == c.after for c in changes):
            applied.append(remedy.rationale)      # the spec chain already carries it: no suggestion
            continue
        changes = [c for c in changes if c.before != c.after]
        if changes:
            out.append(Suggestion(tuple(changes), remedy.rationale))
    return out, applied


def diagnose(rules: list[Rule], records: list[dict] | Records, spec: dict, status: dict) -> list[Verdict]:
    """Every rule's verdict: findings first (critical, then most confident), then undecidable, clear, n/a."""
    recs = records if isinstance(records, Records) else Records(records, load_catalogue())
    verdicts, cutoffs = [], _cutoffs(recs)
    for rule in rules:
        v = evaluate_rule(rule, recs, spec, status)
        if v.state == "clear":
            v.recovered = _recovered(rule, cutoffs, spec, status)
        verdicts.append(v)
    return sorted(verdicts, key=Verdict.rank)


def findings(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.state == "fired"]
