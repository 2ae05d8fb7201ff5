"""The design's success-criteria table, computed from a run's records only (forge/report never
imports the training code: it reads the run directory). The rows are data: `[[criterion]]` tables of
the run's checklist (checklists/phase1.toml; tiny.toml overrides rows by id), each a pass condition
evaluated by the shared rule engine (forge.metrics.engine). A row without evidence is n/a with the
reason, never pass."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from pydantic import Field

from forge.metrics.catalogue import load_catalogue
from forge.metrics.engine import (Condition, Records, SpecCondition, all_of, evaluate, load_entries, run_spec,
                                  spec_value)
from forge.metrics.jsonl import read_metric_stream
from forge.spec.base import Section
from forge.train.run_dir import RunDir


class CriterionSpec(Section):
    id: str = Field(pattern=r"^[A-G][1-3]-[a-z0-9-]+$")
    title: str
    target: str
    design: str = Field(min_length=1, description="The design's success-table row this criterion implements.")
    when: list[Condition] = Field(min_length=1, description="Pass conditions (all must hold).")
    requires: list[SpecCondition] = Field(default_factory=list, description="Where the row applies (else n/a).")
    warn_margin: float = Field(0.1, ge=0, description="A miss within this relative distance warns.")
    severity: Literal["critical", "monitor"] = "critical"
    measured: Optional[str] = Field(None, description="Metric shown as measured [default: the first condition's].")


@dataclass(frozen=True)
class Criterion:
    name: str
    measured: float | None
    target: str
    status: str          # pass | warn | fail | n/a
    note: str = ""
    id: str = ""

    def shown(self) -> str:
        if self.measured is None:
            return "-"
        v = self.measured
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


@dataclass
class RunRecord:
    """Everything forge report reads from a run directory."""

    run: RunDir
    records: list[dict[str, Any]]
    spec: dict[str, Any]
    status: dict[str, Any]
    checklist: dict[str, Any]
    skipped: list[str]

    @classmethod
    def load(cls, run: RunDir) -> "RunRecord":
        spec = run_spec(run)
        checklist = run.read("checklist.json") if (run.path / "checklist.json").is_file() else {}
        stream = read_metric_stream(run.metrics_path)
        return cls(run, stream.records, spec, run.status() or {}, checklist, stream.problems())

    def series(self, metric: str) -> list[tuple[int, float]]:
        return [(r["step"], r[metric]) for r in self.records
                if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]

    def values(self, metric: str) -> list[float]:
        return [v for _, v in self.series(metric)]


def load_criteria(checklist: str) -> list[CriterionSpec]:
    from forge.checklist.items import checklist_dir

    return load_entries(checklist_dir() / f"{checklist}.toml", "criterion", CriterionSpec,
                        "invalid success criteria", lambda c: c.when)


def evaluate_criterion(crit: CriterionSpec, recs: Records, spec: dict) -> Criterion:
    unmet = [r for r in crit.requires if not r.holds(spec)]
    if unmet:
        return Criterion(crit.title, None, crit.target, "n/a",
                         f"does not apply: {unmet[0].key} = {spec_value(spec, unmet[0].key)!r}", crit.id)
    outcomes = [evaluate(c, recs, spec) for c in crit.when]
    state = all_of(outcomes)
    measured = next((o.value for o in outcomes if o.value is not None), None)
    if crit.measured:
        values = recs.values(crit.measured)
        measured = values[-1] if values else None
    if state == "undecidable":
        reason = "; ".join(o.text for o in outcomes if o.state == "undecidable")
        return Criterion(crit.title, measured, crit.target, "n/a", f"no evidence: {reason}", crit.id)
    if state == "holds":
        return Criterion(crit.title, measured, crit.target, "pass", crit.design, crit.id)
    missed = [o for o in outcomes if o.state == "fails"]
    near = all(o.margin <= crit.warn_margin for o in missed)
    return Criterion(crit.title, measured, crit.target, "warn" if near else "fail",
                     "; ".join(o.text for o in missed), crit.id)


def success_criteria(rec: RunRecord) -> list[Criterion]:
    checklist = rec.spec.get("run", {}).get("checklist") or "phase1"
    recs = Records(rec.records, load_catalogue())
    return [evaluate_criterion(c, recs, rec.spec) for c in load_criteria(checklist)]


PLOTS: dict[str, tuple[str, Callable[[RunRecord], list[str]]]] = {
    "loss_per_step": ("training loss per TRM step",
                      lambda r: sorted(k for k in {k for x in r.records for k in x}
                                       if k.startswith("loss/step_") and not k.endswith("_last"))),
    "valid_bpb": ("validation bits per byte", lambda r: ["valid/bits_per_byte", "valid/halt/bits_per_byte"]),
    "act_steps": ("ACT average steps", lambda r: ["act/avg_steps", "valid/halt/avg_steps"]),
    "gate_usage": ("MAG gate usage", lambda r: ["gate/y_usage", "gate/m_usage", "gate/entropy"]),
    "contributions": ("contribution probes: held-out bits/byte each part earns",
                      lambda r: ["valid/memory_contribution_bpb", "valid/recursion_gain_bpb"]),
    "gate_discrimination": ("MAG gate discrimination (held-out)",
                            lambda r: ["valid/gate/token_spread", "valid/gate/channel_spread", "valid/gate/decided_share"]),
    "grad_norms": ("gradient norms", lambda r: ["optim/grad_raw_norm", "optim/grokfast_ema_norm", "optim/grad_norm"]),
    "lr": ("learning rate", lambda r: sorted(k for k in {k for x in r.records for k in x} if k.startswith("optim/lr_"))),
    "tokens_per_sec": ("throughput (tokens/s)", lambda r: ["perf/tokens_per_sec"]),
    "probes": ("probes: reasoning (A1), long/short range (B2), position (E1)",
               lambda r: ["valid/reasoning_accuracy", "valid/long_range_acc", "valid/short_range_acc",
                          "eval/position_accuracy"]),
    "position_probe": ("position probe per distance (E1)",
                       lambda r: sorted((k for k in {k for x in r.records for k in x}
                                         if k.startswith("eval/position_accuracy/d")),
                                        key=lambda k: int(k.rsplit("/d", 1)[1]))),
    "rope_norm": ("rotary key norm (E1: QK-clip must not collapse it)", lambda r: ["attn/rope_norm",
                                                                                 "eval/attn/rope_norm"]),
}
