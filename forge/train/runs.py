"""`forge runs`: one summary row per run directory, read from its records only."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from forge.train.metrics_log import read_metrics
from forge.train.run_dir import read_json


def _last(records: list[dict], key: str) -> float | None:
    for record in reversed(records):
        if isinstance(record.get(key), (int, float)):
            return record[key]
    return None


def list_runs(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(root.glob("*/status.json")) if root.is_dir() else []:
        run = path.parent
        status = read_json(path)
        lineage = read_json(run / "lineage.json") if (run / "lineage.json").is_file() else {}
        records = read_metrics(run / "metrics.jsonl")
        rows.append({"run_id": run.name, "spec": Path(lineage.get("spec_file", "")).name or None,
                     "status": status.get("status"), "step": status.get("step", 0),
                     "updated": status.get("updated"), "loss": _last(records, "loss/total"),
                     "valid_perplexity": _last(records, "valid/perplexity"),
                     "valid_bits_per_byte": _last(records, "valid/bits_per_byte")})
    return sorted(rows, key=lambda r: r["updated"] or "")
