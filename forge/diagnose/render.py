"""forge diagnose output: the verdict table (every rule: fired / undecidable / clear / n/a with its
evidence) and the findings with their remedies, for the terminal and as JSON."""
from __future__ import annotations

from forge.diagnose.rules import PROBLEMS

STYLE = {"fired": "bold red", "undecidable": "yellow", "clear": "green", "n/a": "dim"}
VERDICT_STYLE = {"healthy": "bold green", "unhealthy": "bold red", "undecidable": "bold yellow"}
MEANING = {"healthy": "every applicable rule and monitor is clear",
           "unhealthy": "a rule or monitor fired (findings below, most severe first)",
           "undecidable": "no rule fired, but the evidence does not decide every rule (listed above)"}


def _verdict_json(v) -> dict:
    return {"rule": v.rule.id, "state": v.state, "problem": v.rule.problem, "severity": v.rule.severity,
            "title": v.rule.title, "confidence": v.confidence, "evidence": [o.text for o in v.evidence],
            "recovered": v.recovered or None, "already_applied": v.applied,
            "remedies": [{"rationale": s.rationale,
                          "changes": [{"key": c.key, "before": c.before, "after": c.after} for c in s.changes]}
                         for s in v.suggestions]}


def diagnosis_json(result, written=None) -> dict:
    return {"run_id": result.run_id, "verdict": result.verdict, "exit_code": result.exit_code,
            "healthy": result.healthy, "status": result.status, "steps_logged": result.steps_logged,
            "problems": {p: [f.rule.id for f in result.findings if f.rule.problem == p] for p in PROBLEMS},
            "findings": [_verdict_json(v) for v in result.findings],
            "undecidable": [_verdict_json(v) for v in result.undecided],
            "rules": [_verdict_json(v) for v in result.verdicts],
            "warnings": result.warnings, "skipped_lines": result.skipped,
            "written": None if written is None else {"spec": str(written.spec_path), "patch": str(written.path)}}


def render_diagnosis(result, written=None, show_all: bool = False) -> None:
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    from forge.ui import console

    out = console()
    status = result.status.get("status", "none") if result.status is not None else "none (a metrics file)"
    out.print(f"[bold]diagnosis of {escape(result.run_id)}[/] (status {status}, {result.steps_logged} logged steps)")
    if result.skipped:
        out.print(f"[yellow]{len(result.skipped)} unreadable line(s) skipped[/]: "
                  + escape("; ".join(result.skipped[:5])) + (" ..." if len(result.skipped) > 5 else ""))
    if result.warnings:
        out.print(f"[yellow]{len(result.warnings)} during-training warning(s)[/]: " + escape(", ".join(
            f"{w.get('id')} at step {w.get('step')}" for w in result.warnings[:8])))
    table = Table(title="rules and monitors", title_justify="left")
    for col in ("verdict", "severity", "rule", "evidence"):
        table.add_column(col)
    for v in result.verdicts:
        if v.state == "n/a" and not show_all:
            continue
        note = f" [dim](recovered: {escape(v.recovered)})[/]" if v.recovered else ""
        table.add_row(f"[{STYLE[v.state]}]{v.state}[/]", v.rule.severity, v.rule.id, escape(v.reason) + note)
    out.print(table)
    for n, f in enumerate(result.findings, 1):
        lines = [f"[dim]{escape(' '.join(f.rule.explain.split()))}[/]", ""]
        lines += [f"evidence: {escape(o.text)}" for o in f.evidence]
        for k, sug in enumerate(f.suggestions, 1):
            diff = ", ".join(f"{c.key}: {c.before!r} -> {c.after!r}" for c in sug.changes)
            lines.append(f"remedy {k}: [bold]{escape(diff)}[/]  [dim]({escape(sug.rationale)})[/]")
        lines += [f"[dim]already in the spec chain: {escape(a)}[/]" for a in f.applied]
        if not f.suggestions:
            lines.append("[dim]no remedy as a spec change: see the explanation[/]")
        out.print(Panel("\n".join(lines), title=f"{n}. {f.rule.severity} {escape(f'[{f.rule.problem}]')} "
                                                f"{f.rule.id}: {escape(f.rule.title)}",
                        subtitle=f"confidence {f.confidence:.2f}", title_align="left"))
    out.print(f"[{VERDICT_STYLE[result.verdict]}]{result.verdict}[/]: {MEANING[result.verdict]} "
              f"(exit {result.exit_code})")
    if written is not None:
        out.print(f"[green]wrote {written.spec_path}[/] (patch record {written.path}); "
                  f"next: forge train {written.spec_path}")
    elif result.findings:
        out.print("[dim]dry run: --apply writes the top finding's first remedy as a patched spec "
                  "(--finding ID / --remedy N choose another)[/]")
