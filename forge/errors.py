"""Domain errors. The CLI maps each to a one-line-per-problem message and an exit code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

_MISSING = object()


class ForgeError(Exception):
    """Bad input from the user (spec, CLI argument, data, checkpoint): exit code 2, no traceback."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located as precisely as we can."""

    where: str                 # "specs/tiny.toml:14", "--set", "specs/tiny.toml"
    key: str                   # dotted key path, "" for the whole file
    message: str               # what was expected
    value: Any = _MISSING      # the value given, when there was one

    def render(self) -> str:
        given = "" if self.value is _MISSING else f" = {_short(self.value)}"
        subject = f"{self.where}: {self.key}{given}" if self.key else self.where
        return f"{subject}: {self.message}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SpecError(ForgeError):
    def __init__(self, problems: list[Problem], header: Optional[str] = None):
        self.problems = problems
        self.header = header or ("invalid spec" if len(problems) == 1 else f"invalid spec ({len(problems)} problems)")
        super().__init__(self.header + "\n" + "\n".join("  " + p.render() for p in problems))
