"""The one place that writes to the terminal: tables for people, JSON for machines, errors on stderr."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def working(text: str):
    """Visible progress for a slow step that prints nothing itself: a spinner with the elapsed time on a
    terminal (gone when the step ends), one plain line otherwise (CI, pipes), so output starts at once."""
    if not sys.stdout.isatty():
        print_text(f"{text} ...")
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True,
                  console=console()) as progress:
        progress.add_task(_escape(text), total=None)
        yield


def render_checklist_summary(result: dict, seconds: float) -> None:
    """A passing (or --force'd) checklist at train start (its checklist.json record) in one line; the table is
    `forge check`'s."""
    counts = result["counts"]
    flagged = [r["id"] for r in result["items"] if r["status"] in ("warn", "fail")]
    verdict = "[green]passed[/]" if result["ok"] else "[bold red]failed (--force: launching anyway)[/]"
    console().print(f"checklist {_escape(result['checklist'])} {verdict} in {seconds:.1f} s: pass {counts['pass']}  "
                    f"warn {counts['warn']}  fail {counts['fail']}  skip {counts['skip']}"
                    + (f"  ({_escape(', '.join(flagged))}; forge check shows the table)" if flagged else ""))


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


def runs_table(rows: list[dict], root):
    from rich.table import Table

    if not rows:
        return f"no runs in {root}"
    table = Table(title=f"runs in {root}", title_justify="left")
    numeric = ("step", "loss", "valid ppl", "valid bpb")
    for col in ("run", "spec", "spec hash", "overrides", "status", "step", "loss", "valid ppl", "valid bpb"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for r in rows:
        style = _STATUS_STYLE.get({"finished": "pass", "failed": "fail", "interrupted": "warn"}.get(r["status"], ""), "")
        shown = _escape(r["shown_status"] or "")
        step = f"{r['step']}/{r['max_steps']}" if r["max_steps"] else str(r["step"])
        table.add_row(r["run_id"], _escape(r["spec"] or ""), r["spec_hash"] or "", _escape(" ".join(r["overrides"])),
                      f"[{style}]{shown}[/]" if style else shown, step, _fmt(r["loss"]),
                      _fmt(r["valid_perplexity"]), _fmt(r["valid_bits_per_byte"]))
    return table


def render_runs(rows: list[dict], root) -> None:
    console().print(runs_table(rows, root))


def watch_runs(read_rows, root, every: float) -> None:
    """The runs table, redrawn every `every` seconds until Ctrl-C (in place on a terminal)."""
    import time

    from rich.live import Live

    out = console()
    if not out.is_terminal:   # a pipe or a file: one table per refresh
        try:
            while True:
                out.print(runs_table(read_rows(), root))
                time.sleep(every)
        except KeyboardInterrupt:
            return
    with Live(runs_table(read_rows(), root), console=out, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(every)
                live.update(runs_table(read_rows(), root), refresh=True)
        except KeyboardInterrupt:
            return


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
