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


def environment_error(err: BaseException) -> str:
    """One line for an OSError, UnicodeError or MemoryError that reached the CLI: what, where, what to do."""
    if isinstance(err, MemoryError):
        return ("out of memory: reduce the model (model.*), data.batch_size or data.seq_len, or free memory; "
                "checkpoints written so far are intact")
    if isinstance(err, UnicodeError):
        return (f"cannot decode a file as UTF-8 ({err}): spec, data and run-directory files must be UTF-8 text; "
                "run again with FORGE_DEBUG=1 to see which file")
    import errno

    path = " -> ".join(str(p) for p in (err.filename, getattr(err, "filename2", None)) if p)
    hints = {"ENOSPC": "free disk space", "EROFS": "the filesystem is read-only: use a writable run.output_dir",
             "EACCES": "fix the permissions", "EPERM": "fix the permissions",
             "EISDIR": "a directory is where a file is expected: remove or rename it",
             "ENOTDIR": "a file is where a directory is expected: remove or rename it",
             "ENOENT": "check the path"}
    hint = hints.get(errno.errorcode.get(err.errno or 0, ""), "check the path, free space and permissions")
    return f"{err.strerror or type(err).__name__}{': ' + path if path else ''} ({hint})"
