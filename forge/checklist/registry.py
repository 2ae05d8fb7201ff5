"""Named checks that checklist items call. Components register theirs; a name that a component has
not built yet is registered as pending, so the item reports `skip` with the reason, never `pass`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

Status = Literal["pass", "warn", "fail", "skip"]


@dataclass(frozen=True)
class Outcome:
    status: Status
    measured: str = ""
    expected: str = ""
    detail: str = ""
    data: Any = None  # structured evidence for --json (e.g. a per-component table)


def passed(measured: str = "", expected: str = "", detail: str = "", data: Any = None) -> Outcome:
    return Outcome("pass", measured, expected, detail, data)


def failed(measured: str = "", expected: str = "", detail: str = "", data: Any = None) -> Outcome:
    return Outcome("fail", measured, expected, detail, data)


def skipped(reason: str) -> Outcome:
    return Outcome("skip", detail=reason)


CheckFn = Callable[..., Outcome]
CHECKS: dict[str, CheckFn] = {}
PENDING: dict[str, str] = {}


def register(name: str) -> Callable[[CheckFn], CheckFn]:
    def wrap(fn: CheckFn) -> CheckFn:
        if name in CHECKS:
            raise RuntimeError(f"check {name!r} registered twice")
        CHECKS[name] = fn
        PENDING.pop(name, None)
        return fn
    return wrap


def pending(name: str, reason: str) -> None:
    """Declare a check whose component does not exist yet (the item will report skip: reason)."""
    if name not in CHECKS:
        PENDING[name] = reason


def known_checks() -> set[str]:
    _load_all()
    return set(CHECKS) | set(PENDING)


def lookup(name: str) -> CheckFn | str:
    """The check function, or the reason it cannot run yet."""
    _load_all()
    return CHECKS.get(name) or PENDING[name]


def _load_all() -> None:
    import forge.checklist.checks  # noqa: F401  (imports every check module, which registers itself)
