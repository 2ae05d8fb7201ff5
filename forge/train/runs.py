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


def _planned_steps(run: Path) -> int | None:
    """train.max_steps of the run's resolved spec (read as TOML: no validation needed for one number)."""
    import tomllib

    try:
        return tomllib.loads((run / "spec.toml").read_text(encoding="utf-8"))["train"]["max_steps"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return None


def list_runs(root: Path) -> list[dict[str, Any]]:
    """One row per run: its status as a person reads it ("stopped at --max-steps" for a run that finished
    before train.max_steps), the newest step (a running run's last logged step, which status.json only
    records at checkpoints), the spec file, hash and --set overrides, the last loss and validation scores."""
    rows = []
    for path in sorted(root.glob("*/status.json")) if root.is_dir() else []:
        run = path.parent
        status = read_json(path)
        lineage = read_json(run / "lineage.json") if (run / "lineage.json").is_file() else {}
        records = read_metrics(run / "metrics.jsonl")
        step = max([status.get("step", 0), *(r["step"] for r in records[-1:] if isinstance(r.get("step"), int))])
        planned = _planned_steps(run)
        state = status.get("status")
        shown = "stopped at --max-steps" if state == "finished" and planned and step < planned else state
        rows.append({"run_id": run.name, "spec": Path(lineage.get("spec_file", "")).name or None,
                     "spec_hash": (lineage.get("spec_hash") or "")[:12] or None,
                     "overrides": list(lineage.get("overrides", [])), "status": state, "shown_status": shown,
                     "step": step, "max_steps": planned,
                     "updated": status.get("updated"), "loss": _last(records, "loss/total"),
                     "valid_perplexity": _last(records, "valid/perplexity"),
                     "valid_bits_per_byte": _last(records, "valid/bits_per_byte")})
    return sorted(rows, key=lambda r: r["updated"] or "")
