"""Diagnose one run directory, or a plain metrics JSONL written by any trainer that follows the design.

Evidence: the metrics (robustly read: skipped lines are counted and shown), the run's status (a
"running" run whose lock no process holds is `stale`), warnings.jsonl, checkpoint verification, and
every rule of checklists/diagnose.toml plus the monitors of the run's checklist. The verdict is
`healthy` only when every applicable rule and monitor is clear; `unhealthy` when one fired;
otherwise `undecidable` (with the list of what could not be decided).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from forge.checklist.items import checklist_dir
from forge.diagnose.rules import Rule, Verdict, diagnose, findings, load_rules
from forge.errors import ForgeError
from forge.metrics.catalogue import load_catalogue
from forge.metrics.engine import Records, run_spec
from forge.metrics.jsonl import Stream, read_metric_stream, read_objects
from forge.train.monitors import load_monitors
from forge.train.run_dir import RunDir

EXIT_CODES = {"healthy": 0, "unhealthy": 1, "undecidable": 3}   # 2: bad input (every forge command)


@dataclass
class Diagnosis:
    run_id: str
    status: dict
    verdicts: list[Verdict]
    warnings: list[dict] = field(default_factory=list)
    steps_logged: int = 0
    skipped: list[str] = field(default_factory=list)     # unreadable lines of metrics/warnings.jsonl

    @property
    def findings(self) -> list[Verdict]:
        return findings(self.verdicts)

    @property
    def undecided(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.state == "undecidable"]

    @property
    def verdict(self) -> str:
        if self.findings:
            return "unhealthy"
        return "undecidable" if self.undecided or not self.steps_logged else "healthy"

    @property
    def healthy(self) -> bool:
        return self.verdict == "healthy"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


def run_status(run: RunDir) -> dict:
    status = dict(run.status() or {})
    if status.get("status") == "running" and not run.lock_held():
        status["status"] = "stale"
        status["recorded"] = "running"
    return status


def run_facts(run: RunDir, last_step: int) -> dict:
    """Facts of the run directory itself, as a metrics record: checkpoints that fail to verify (F2) and, where
    the last launch recorded its precision (forge.train.precision), how much slower its matmuls ran than fp32
    would have (F1: bf16 on a device that only emulates it)."""
    from forge.train import checkpoint as ckpt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        invalid = sum(1 for p in ckpt.list_checkpoints(run.checkpoints) if ckpt.verify(p) is not None)
    facts = {"step": last_step, "run/invalid_checkpoints": invalid}
    launches = run.launches(check=False)
    precision = launches[-1].get("precision") if launches else None
    if isinstance(precision, dict) and isinstance(precision.get("bf16_speedup"), (int, float)) \
            and precision["bf16_speedup"] > 0:
        facts["run/precision_slowdown"] = 1 / precision["bf16_speedup"] if precision.get("resolved") == "bf16" else 1.0
    return facts


def _monitor_rules(checklist: str) -> list[Rule]:
    """The run's during-training monitors as rules (severity monitor) for the same engine."""
    out = []
    for m in load_monitors(checklist):
        out.append(Rule(id=m.id,
                        problem="observability", severity="monitor", title=f"monitor: {m.title}",
                        explain=f"The during-training monitor {m.id} of checklists/{checklist}.toml.",
                        when=[m.condition], monitor=True))
    return out


def _with_warnings(verdicts: list[Verdict], warned: list[dict]) -> None:
    """A monitor that warned during training and is clear now recovered: say so."""
    by_id: dict[str, list[dict]] = {}
    for w in warned:
        by_id.setdefault(str(w.get("id")), []).append(w)
    for v in verdicts:
        hits = by_id.get(v.rule.id)
        if hits and v.state == "clear" and not v.recovered:
            v.recovered = f"warned during training at step {hits[0].get('step')}, clear since"


def diagnose_records(stream: Stream, spec: dict, status: dict | None, checklist: str | None, run_id: str,
                     warned: list[dict] = (), skipped: list[str] = ()) -> Diagnosis:
    rules = load_rules(checklist_dir() / "diagnose.toml")
    if checklist:
        rules += _monitor_rules(checklist)
    verdicts = diagnose(rules, Records(stream.records, load_catalogue()), spec, status)
    _with_warnings(verdicts, list(warned))
    steps = sum(1 for r in stream.records if not set(r) <= {"step", "run/invalid_checkpoints"})
    return Diagnosis(run_id, status, verdicts, list(warned), steps, [*stream.problems(), *skipped])


def diagnose_run(run: RunDir) -> Diagnosis:
    stream = read_metric_stream(run.metrics_path)
    spec = run_spec(run)
    last_step = stream.records[-1]["step"] if stream.records else 0
    stream.records.append(run_facts(run, last_step))
    warned = read_objects(run.path / "warnings.jsonl")
    return diagnose_records(stream, spec, run_status(run), spec.get("run", {}).get("checklist"), run.run_id,
                            warned.records, warned.problems())


def diagnose_file(path: Path, spec_path: Path | None) -> Diagnosis:
    """A plain metrics JSONL (the design's names or forge's) with the spec it ran (default: the design's
    Phase 1 spec, specs/phase1.toml). It has no run status: status rules are n/a."""
    from forge.spec.load import load_spec

    if not path.is_file():
        raise ForgeError(f"{path}: no such metrics file")
    stream = read_metric_stream(path)
    catalogue = load_catalogue()
    stream.records = [catalogue.from_design(r) for r in stream.records]
    resolved = load_spec(spec_path or checklist_dir().parent / "specs" / "phase1.toml")  # default: the design's
    return diagnose_records(stream, resolved.spec.model_dump(mode="json"), None, resolved.spec.run.checklist,
                            path.name)
