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


def render_run_end(result, run_path) -> None:
    out = console()
    style = {"finished": "green", "interrupted": "yellow"}.get(result.status, "bold red")
    out.print(f"[{style}]run {result.run_id} {result.status}[/]" + (f": {_escape(result.message)}"
                                                                    if result.message else ""))
    out.print(f"[dim]artefacts in {run_path}; next: forge report {result.run_id}"
              + (f" or forge train --resume {result.run_id}" if result.status == "interrupted" else "") + "[/]")


def render_runs(rows: list[dict], root) -> None:
    from rich.table import Table

    out = console()
    if not rows:
        out.print(f"no runs in {root}")
        return
    table = Table(title=f"runs in {root}", title_justify="left")
    for col in ("run", "spec", "status", "step", "loss", "valid ppl", "valid bpb"):
        table.add_column(col, justify="right" if col in ("step", "loss", "valid ppl", "valid bpb") else "left")
    for r in rows:
        style = _STATUS_STYLE.get({"finished": "pass", "failed": "fail", "interrupted": "warn"}.get(r["status"], ""), "")
        table.add_row(r["run_id"], _escape(r["spec"] or ""), f"[{style}]{r['status']}[/]" if style else r["status"],
                      str(r["step"]), _fmt(r["loss"]), _fmt(r["valid_perplexity"]), _fmt(r["valid_bits_per_byte"]))
    out.print(table)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"


def render_merge(run_id: str, step_a: int, step_b: int, method: str, t: float, scores: dict) -> None:
    out = console()
    fitness = scores["merge/fitness"]
    style = "green" if fitness >= 1 else "yellow" if fitness >= 0.8 else "bold red"
    out.print(f"{run_id}: {method} merge of step {step_a} and step {step_b} (t = {t})")
    out.print(f"  parents' mean perplexity {scores['merge/parent_perplexity']:.4g}, merged {scores['merge/perplexity']:.4g}"
              f"  -> fitness [{style}]{fitness:.3f}[/] (>= 1: the merge is no worse than its parents)")


def render_samples(result) -> None:
    """forge sample: each sample under its prompt, then ACT depth and speed."""
    out = console()
    out.print(f"[bold]{result.run_id}[/] step {result.step}: {len(result.samples)} sample(s)")
    for i, text in enumerate(result.samples, 1):
        out.print(f"[dim]--- sample {i}[/]\n[cyan]{_escape(result.prompt)}[/]{_escape(text)}")
    out.print(f"[dim]ACT: {result.avg_steps:.2f} of {result.t_max} steps per token; "
              f"{result.tokens_per_sec:,.0f} tokens/s ({'cached' if result.cached else 'uncached'})[/]")
