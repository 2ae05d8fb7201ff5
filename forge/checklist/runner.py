"""Execute a checklist against a resolved spec."""
from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Collection

from forge.checklist.context import CheckContext
from forge.checklist.items import Checklist, Item, load_checklist
from forge.checklist.registry import Outcome, lookup, skipped
from forge.errors import ForgeError
from forge.spec.load import ResolvedSpec


@dataclass(frozen=True)
class ItemResult:
    id: str
    title: str
    severity: str
    status: str          # pass | warn | fail | skip
    measured: str
    expected: str
    detail: str
    seconds: float
    data: object = None


@dataclass(frozen=True)
class ChecklistResult:
    checklist: str
    source: str
    items: list[ItemResult]

    @property
    def critical_failures(self) -> list[ItemResult]:
        return [r for r in self.items if r.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.critical_failures

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "warn": 0, "fail": 0, "skip": 0}
        for r in self.items:
            out[r.status] += 1
        return out

    def to_json(self) -> dict:
        return {"checklist": self.checklist, "source": self.source, "ok": self.ok, "counts": self.counts(),
                "items": [asdict(r) for r in self.items]}


def run_checklist(resolved: ResolvedSpec, data_dir: Path | None = None, checklist: Checklist | None = None,
                  device: str | None = None, memory_gb: float | None = None,
                  only: Collection[str] | None = None) -> ChecklistResult:
    """device / memory_gb: the device and memory budget the memory check judges for (default: the spec's
    device and its memory). only: run just these item ids (`forge check --only`), in the checklist's order; an
    id the checklist does not have is a ForgeError naming the ones it has."""
    checklist = checklist or load_checklist(resolved.spec.run.checklist)
    if only is not None:
        checklist = select_items(checklist, only)
    ctx = CheckContext(resolved, device=device, memory_gb=memory_gb)
    if data_dir is not None:
        ctx.data_dir = data_dir
    return ChecklistResult(checklist.name, checklist.source, [_run_item(item, ctx) for item in checklist.items])


def select_items(checklist: Checklist, ids: Collection[str]) -> Checklist:
    """The checklist with only the items `ids` names (a cheap check of one item: the real step and the data
    preparation of the others do not run)."""
    known = [i.id for i in checklist.items]
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ForgeError(f"checklist {checklist.name!r} ({checklist.source}) has no item {', '.join(unknown)}; "
                         f"its items: {', '.join(known)}")
    wanted = set(ids)
    return checklist.model_copy(update={"items": [i for i in checklist.items if i.id in wanted]})


def _run_item(item: Item, ctx: CheckContext) -> ItemResult:
    start = time.perf_counter()
    check = lookup(item.check)
    if isinstance(check, str):
        outcome = skipped(check)
    else:
        try:
            outcome = check(ctx, **item.params)
        except Exception as err:  # a crashing check is a failed check, reported, never a crashed CLI
            last = traceback.extract_tb(err.__traceback__)[-1]
            outcome = Outcome("fail", detail=f"check raised {type(err).__name__}: {err} "
                                             f"({Path(last.filename).name}:{last.lineno})")
    status = outcome.status
    if status == "fail" and item.severity == "monitor":
        status = "warn"
    return ItemResult(item.id, item.title, item.severity, status, outcome.measured, outcome.expected,
                      outcome.detail, round(time.perf_counter() - start, 3), outcome.data)
