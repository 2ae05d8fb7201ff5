"""`forge runs`: one summary row per run directory, read from its records only."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from forge.errors import ForgeError
from forge.train.metrics_log import read_metrics
from forge.train.run_dir import read_json


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


def list_runs(root: Path) -> list[dict[str, Any]]:
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
        rows.append({"run_id": run.name, "spec": Path(str(lineage.get("spec_file", ""))).name or None,
                     "status": status.get("status"), "step": status.get("step", 0),
                     "updated": status.get("updated"), "loss": _last(records, "loss/total"),
                     "valid_perplexity": _last(records, "valid/perplexity"),
                     "valid_bits_per_byte": _last(records, "valid/bits_per_byte")})
    return sorted(rows, key=lambda r: r["updated"] or "")
