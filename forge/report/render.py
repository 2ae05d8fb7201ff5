"""forge report: the success-criteria table with terminal sparklines, PNG plots in the run directory,
an optional self-contained HTML page, and side-by-side comparison of runs."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from forge.report.criteria import PLOTS, RunRecord, success_criteria
from forge.report.probes import halting_histogram, latest_samples, probe_rows, write_probe_plots
from forge.train.heal import timeline_rows

BLOCKS = "▁▂▃▄▅▆▇█"
CURVES = ("loss/total", "valid/bits_per_byte", "act/avg_steps", "gate/y_usage", "optim/grad_norm",
          "perf/tokens_per_sec")
STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "n/a": "dim"}


def sparkline(values: list[float], width: int = 40) -> str:
    if not values:
        return ""
    if len(values) > width:  # average into `width` buckets
        size = len(values) / width
        buckets = [values[int(i * size):max(int((i + 1) * size), int(i * size) + 1)] for i in range(width)]
        values = [sum(b) / len(b) for b in buckets]
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(BLOCKS[min(len(BLOCKS) - 1, int((v - lo) / span * (len(BLOCKS) - 1)))] for v in values)


def write_plots(rec: RunRecord) -> list[Path]:
    """One PNG per plot family in <run>/plots/; families with no data are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = rec.run.path / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, (title, metrics_of) in PLOTS.items():
        series = {m: rec.series(m) for m in metrics_of(rec)}
        series = {m: s for m, s in series.items() if s}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
        for metric, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=metric, marker="o" if len(points) < 12 else None, markersize=3)
        ax.set_title(f"{rec.run.run_id}: {title}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written + write_probe_plots(rec, out_dir)


def render_terminal(rec: RunRecord, plots: list[Path]) -> None:
    from rich.table import Table

    from rich.markup import escape as escape_markup

    from forge.ui import console

    out = console()
    st = rec.status
    out.print(f"[bold]report of {rec.run.run_id}[/]  status {st.get('status')}  step {st.get('step')}  "
              f"spec {rec.spec['run']['name']}")
    table = Table(title="success criteria", title_justify="left")
    for col in ("criterion", "measured", "target", "status", "note"):
        table.add_column(col, justify="right" if col == "measured" else "left")
    for c in success_criteria(rec):
        table.add_row(c.name, c.shown(), c.target, f"[{STYLE[c.status]}]{c.status}[/]", c.note)
    out.print(table)
    curves = Table(title="curves", title_justify="left", show_header=True)
    for col in ("metric", "first", "last", "trend"):
        curves.add_column(col)
    for metric in CURVES:
        values = rec.values(metric)
        if values:
            curves.add_row(metric, f"{values[0]:.4g}", f"{values[-1]:.4g}", sparkline(values))
    out.print(curves)
    _render_probes(out, rec)
    heals = timeline_rows(rec.run)
    if heals:
        table = Table(title="heal timeline (train.heal; lineage.json)", title_justify="left")
        for col in ("step", "finding", "rolled back to", "patch", "outcome"):
            table.add_column(col)
        for row in heals:
            table.add_row(*(escape_markup(cell) for cell in row))
        out.print(table)
    warnings = rec.run.warnings()   # the monitors' and the mirrors' (OBS-wandb, OBS-tensorboard): warnings.jsonl
    for wid in dict.fromkeys(w["id"] for w in warnings):
        first = next(w for w in warnings if w["id"] == wid)
        out.print(f"[yellow]warning[/] {escape_markup(wid)} (step {first.get('step')}, "
                  f"{sum(w['id'] == wid for w in warnings)}x): {escape_markup(str(first.get('measured', '')))}")
    if plots:
        out.print(f"[dim]plots: {', '.join(str(p) for p in plots)}[/]")


def _render_probes(out, rec: RunRecord) -> None:
    """Probe metrics, the ACT histogram as bars, and the samples of the last evaluation."""
    from rich.markup import escape
    from rich.table import Table

    rows = probe_rows(rec)
    if rows:
        table = Table(title="probes (at evaluations)", title_justify="left")
        for col in ("metric", "detects", "first", "last", "trend"):
            table.add_column(col)
        for metric, why, values in rows:
            table.add_row(metric, why, f"{values[0]:.4g}", f"{values[-1]:.4g}", sparkline(values))
        out.print(table)
    hist = halting_histogram(rec)
    if hist is not None:
        step, shares = hist
        out.print(f"[bold]ACT halting histogram[/] (held-out tokens, step {step})")
        for t, share in enumerate(shares):
            out.print(f"  {t + 1} step{'s' if t else ' '} {'█' * round(40 * share):<40} {share:6.1%}")
    step, samples = latest_samples(rec)
    if samples:
        out.print(f"[bold]samples at step {step}[/] (prompt in cyan)")
        for s in samples:
            out.print(f"[dim]{escape(s['source'])}, {s['avg_steps']:.2f} steps/token:[/] "
                      f"[cyan]{escape(s['prompt'])}[/]{escape(s['completion'])}")


def render_comparison(recs: list[RunRecord]) -> None:
    from rich.table import Table

    from forge.ui import console

    table = Table(title="success criteria, side by side", title_justify="left")
    table.add_column("criterion")
    for rec in recs:
        table.add_column(rec.run.run_id, justify="right")
    rows = [success_criteria(rec) for rec in recs]
    for i, first in enumerate(rows[0]):
        table.add_row(first.name, *[f"[{STYLE[r[i].status]}]{r[i].shown()}[/]" for r in rows])
    console().print(table)


def write_html(rec: RunRecord, plots: list[Path]) -> Path:
    """One self-contained page (images inlined) next to the run's records."""
    rows = "".join(f"<tr><td>{html.escape(c.name)}</td><td class=num>{html.escape(c.shown())}</td>"
                   f"<td>{html.escape(c.target)}</td><td class={c.status.replace('/', '')}>{c.status}</td>"
                   f"<td>{html.escape(c.note)}</td></tr>" for c in success_criteria(rec))
    images = "".join(f'<figure><img alt="{p.stem}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{p.stem}</figcaption></figure>'
                     for p in plots)
    probe_table = "".join(f"<tr><td>{html.escape(m)}</td><td>{html.escape(why)}</td><td class=num>{v[0]:.4g}</td>"
                          f"<td class=num>{v[-1]:.4g}</td></tr>" for m, why, v in probe_rows(rec))
    sample_step, samples = latest_samples(rec)
    sample_html = "".join(f"<p><b>{html.escape(s['source'])}</b> ({s['avg_steps']:.2f} steps/token)</p>"
                          f"<pre><span class=prompt>{html.escape(s['prompt'])}</span>{html.escape(s['completion'])}</pre>"
                          for s in samples)
    heal_rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                        for row in timeline_rows(rec.run))
    heal_html = (f"<h2>Heal timeline</h2><table><tr><th>step</th><th>finding</th><th>rolled back to</th><th>patch</th>"
                 f"<th>outcome</th></tr>{heal_rows}</table>" if heal_rows else "")
    st = rec.status
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>forge report {html.escape(rec.run.run_id)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}.num{{text-align:right}}.pass{{color:#080}}.warn{{color:#b80}}
.fail{{color:#c00;font-weight:bold}}.na{{color:#888}}figure{{display:inline-block;margin:8px}}img{{max-width:520px}}
pre{{white-space:pre-wrap;background:#f6f6f6;padding:6px}}.prompt{{color:#06c}}</style>
</head><body><h1>forge report: {html.escape(rec.run.run_id)}</h1>
<p>status <b>{html.escape(str(st.get('status')))}</b> at step {st.get('step')} &middot; spec {html.escape(rec.spec['run']['name'])}</p>
<h2>Success criteria</h2><table><tr><th>criterion</th><th>measured</th><th>target</th><th>status</th><th>note</th></tr>{rows}</table>
{heal_html}
<h2>Probes</h2><table><tr><th>metric</th><th>detects</th><th>first</th><th>last</th></tr>{probe_table}</table>
<h2>Samples{f" at step {sample_step}" if sample_step is not None else ""}</h2>{sample_html or "<p>none</p>"}
<h2>Curves, ACT histogram, attention heatmaps</h2>{images}</body></html>"""
    path = rec.run.path / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
