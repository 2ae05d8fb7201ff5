"""`forge runs`: one summary row per run directory, read from its records only."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from forge.errors import ForgeError
from forge.train.metrics_log import read_metrics
from forge.train.run_dir import RunDir, read_json


def _last(records: list[dict], key: str) -> float | None:
    for record in reversed(records):
        if isinstance(record.get(key), (int, float)):
            return record[key]
    return None


def _record(path: Path) -> dict | None:
    """A run's JSON record, or None where it is missing, unreadable or not an object."""
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except ForgeError:
        return None
    return record if isinstance(record, dict) else None


def _planned_steps(run: Path) -> int | None:
    """train.max_steps of the run's resolved spec (no validation needed for one number); None if unreadable."""
    try:
        steps = RunDir(run).spec_data()["train"]["max_steps"]
    except (ForgeError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None


def list_runs(root: Path) -> list[dict[str, Any]]:
    """One row per run: its status as a person reads it ("stopped at --max-steps" for a run that finished
    before train.max_steps), the newest step (a running run's last logged step, which status.json only
    records at checkpoints), the spec file, hash and --set overrides, the last loss and validation scores."""
    rows = []
    for path in sorted(root.glob("*/status.json")) if root.is_dir() else []:
        run = path.parent
        # one unreadable run must not hide the others
        status = _record(path) or {"status": "unreadable"}
        lineage = _record(run / "lineage.json") or {}
        try:
            records = read_metrics(run / "metrics.jsonl")
        except (OSError, UnicodeError, ValueError):
            records = []
        steps = [s for s in (status.get("step", 0), *(r.get("step") for r in records[-1:])) if isinstance(s, int)]
        step = max(steps, default=0)
        planned = _planned_steps(run)
        state = status.get("status")
        shown = "stopped at --max-steps" if state == "finished" and planned and step < planned else state
        rows.append({"run_id": run.name, "spec": Path(str(lineage.get("spec_file", ""))).name or None,
                     "spec_hash": (str(lineage.get("spec_hash") or ""))[:12] or None,
                     "overrides": list(lineage.get("overrides", [])), "status": state, "shown_status": shown,
                     "step": step, "max_steps": planned,
                     "updated": status.get("updated"), "loss": _last(records, "loss/total"),
                     "valid_perplexity": _last(records, "valid/perplexity"),
                     "valid_bits_per_byte": _last(records, "valid/bits_per_byte")})
    return sorted(rows, key=lambda r: r["updated"] or "")
