"""Diagnose one run directory: its metrics, checklist warnings, status, spec and checkpoints."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from forge.checklist.items import checklist_dir
from forge.diagnose.rules import Finding, diagnose, load_rules
from forge.train import checkpoint as ckpt
from forge.train.metrics_log import read_metrics
from forge.train.run_dir import RunDir


@dataclass
class Diagnosis:
    run_id: str
    status: dict
    findings: list[Finding]
    warnings: list[dict] = field(default_factory=list)
    steps_logged: int = 0

    @property
    def healthy(self) -> bool:
        return not self.findings


def run_facts(run: RunDir, last_step: int) -> dict:
    """Facts of the run directory itself, as a metrics record (F2: checkpoints that fail to verify)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        invalid = sum(1 for p in ckpt.list_checkpoints(run.checkpoints) if ckpt.verify(p) is not None)
    return {"step": last_step, "run/invalid_checkpoints": invalid}


def diagnose_run(run: RunDir) -> Diagnosis:
    records = read_metrics(run.metrics_path)
    spec = run.spec_data()
    status = run.status() or {}
    last_step = records[-1]["step"] if records else 0
    rules = load_rules(checklist_dir() / "diagnose.toml")
    findings = diagnose(rules, [*records, run_facts(run, last_step)], spec, status)
    return Diagnosis(run.run_id, status, findings, run.warnings(), len(records))
