"""The one place that writes to the terminal: tables for people, JSON for machines, errors on stderr."""
from __future__ import annotations

import json
import sys
from typing import Any

_STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def console(stderr: bool = False):
    """A rich console; when output is not a terminal (CI, pipes) lines are not wrapped at 80 columns."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    wide = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, width=wide, soft_wrap=stderr)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_error(message: str, hint: str | None = None) -> None:
    out = console(stderr=True)
    out.print(f"[bold red]error:[/] {_escape(message)}")
    if hint:
        out.print(f"[dim]{_escape(hint)}[/]")


def print_text(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def render_checklist(result, spec_path: str, spec_hash: str) -> None:
    from rich.table import Table

    table = Table(title=f"checklist {result.checklist} for {spec_path} (spec {spec_hash[:12]})",
                  title_justify="left", expand=False)
    for col, kw in (("id", {"style": "bold", "no_wrap": True}), ("status", {"no_wrap": True}),
                    ("item", {}), ("measured", {}), ("expected", {}), ("detail", {"style": "dim"})):
        table.add_column(col, **kw)
    for r in result.items:
        style = _STATUS_STYLE[r.status]
        table.add_row(_escape(r.id), f"[{style}]{r.status}[/]", _escape(r.title), _escape(r.measured),
                      _escape(r.expected), _escape(r.detail))
    out = console()
    out.print(table)
    for r in result.items:
        if isinstance(r.data, dict) and r.data and all(isinstance(v, (int, float)) for v in r.data.values()):
            _render_breakdown(out, r.id, r.data)
    counts = result.counts()
    verdict = "[bold green]ready[/]" if result.ok else "[bold red]not ready: a critical item failed[/]"
    out.print(f"{verdict}  pass {counts['pass']}  warn {counts['warn']}  fail {counts['fail']}  "
              f"skip {counts['skip']}")


def _render_breakdown(out, title: str, data: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{title} breakdown", title_justify="left")
    table.add_column("component")
    table.add_column("value", justify="right")
    for key, value in data.items():
        table.add_row(_escape(str(key)), f"{value:,}" if isinstance(value, int) else f"{value:.4g}")
    out.print(table)


def render_diff(changes, left: str, right: str) -> None:
    from rich.table import Table

    from forge.spec.render import MISSING

    out = console()
    if not changes:
        out.print(f"{left} and {right} resolve to the same spec")
        return
    table = Table(title=f"{len(changes)} keys differ", title_justify="left")
    table.add_column("key", style="bold")
    table.add_column(left)
    table.add_column(right)
    for c in changes:
        table.add_row(_escape(c.key), "[dim](unset)[/]" if c.before is MISSING else _escape(repr(c.before)),
                      "[dim](unset)[/]" if c.after is MISSING else _escape(repr(c.after)))
    out.print(table)
