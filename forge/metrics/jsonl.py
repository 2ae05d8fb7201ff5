"""Robust reading of the run's JSONL streams (metrics.jsonl, warnings.jsonl).

A line that is blank, not JSON, not a JSON object, or (for metrics) without an integer "step" is
skipped and counted, never a traceback and never the end of reading: the lines after it are read.
In a metrics record, a value that is not a number (or null for a non-finite value) is dropped and
counted. Every reader of these files goes through here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Stream:
    """The records of one JSONL file and what was skipped on the way (line number, why)."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def problems(self) -> list[str]:
        return [f"{self.path.name}:{n}: {why}" for n, why in self.skipped]


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def read_objects(path: Path) -> Stream:
    """Every JSON object line of `path` (a missing file is an empty stream)."""
    lined, skipped = _objects(path)
    return Stream(path, [obj for _, obj in lined], skipped)


def _objects(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    lined: list[tuple[int, dict]] = []
    skipped: list[tuple[int, str]] = []
    if not path.is_file():
        return lined, skipped
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()          # the newline that ends the last record
    for n, line in enumerate(lines, 1):
        if not line.strip():
            skipped.append((n, "blank line"))
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            torn = n == len(lines) and not line.endswith("}")
            skipped.append((n, "torn last line (a kill mid-write)" if torn else f"not JSON ({err.msg})"))
            continue
        if not isinstance(obj, dict):
            skipped.append((n, f"a JSON {type(obj).__name__}, not an object"))
            continue
        lined.append((n, obj))
    return lined, skipped


def read_metric_stream(path: Path) -> Stream:
    """metrics.jsonl: records with an integer step and numeric (or null) values."""
    lined, skipped = _objects(path)
    out = Stream(path, skipped=skipped)
    for n, record in lined:
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            out.skipped.append((n, f"no integer step ({step!r})"))
            continue
        bad = [k for k, v in record.items() if not _number(v)]
        for key in bad:
            out.skipped.append((n, f"{key} = {record[key]!r} is not a number (value dropped)"))
        out.records.append({k: v for k, v in record.items() if k not in bad})
    out.skipped.sort()
    return out
