"""The comparison view of several runs, from their run directories only: `forge compare`'s result and
`forge report A B ...`.

Per run: final and best held-out bits/byte (valid/bits_per_byte, full depth) overall and per source, steps,
training tokens (forge.compare.budget.tokens_through: batch x the curriculum's sequence lengths), training seconds
(measured by forge compare; for other runs summed from the logged throughput: each logging window's tokens over
its perf/tokens_per_sec, i.e. the time of the training steps alone), tokens/s, the spec diff against the first
run, and `forge diagnose`'s verdict.

Runs of one group (the seeds of a variant under --seeds N) are summarised together: the mean over the seeds,
and as noise the standard deviation across them. A group of one run takes as noise the standard deviation of
its last NOISE_EVALS evaluations. Groups are ranked by final bits/byte (lower is better); the difference to the
reference (the first group) is shown with the larger of the two noises: a difference within it is not evidence.
"""
from __future__ import annotations

import html
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forge.compare.budget import tokens_through
from forge.compare.plan import spec_diff
from forge.errors import ForgeError

METRIC = "valid/bits_per_byte"
NOISE_EVALS = 3
IGNORED_IN_DIFF = ("logging.wandb.group",)


@dataclass
class RunView:
    name: str
    run_id: str
    group: str
    status: str
    steps: int
    tokens: int
    train_seconds: float | None
    final: float | None
    best: float | None
    per_source_final: dict[str, float]
    per_source_best: dict[str, float]
    curve: list[dict[str, float]]          # per evaluation: step, tokens, seconds (None if unknown), bpb
    verdict: str
    spec: dict[str, Any] = field(repr=False)

    @property
    def tokens_per_sec(self) -> float | None:
        return self.tokens / self.train_seconds if self.train_seconds else None

    def last_evals_sd(self) -> float | None:
        values = [p["bpb"] for p in self.curve[-NOISE_EVALS:]]
        return statistics.stdev(values) if len(values) >= 2 else None


@dataclass
class GroupView:
    name: str
    runs: list[RunView]
    diff: list[str]
    rank: int = 0
    delta: float | None = None        # final bpb minus the reference's (negative: better)
    delta_noise: float | None = None

    def mean(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        return sum(values) / len(values) if values else None

    @property
    def final(self) -> float | None:
        return self.mean("final")

    @property
    def noise(self) -> float | None:
        finals = [r.final for r in self.runs if r.final is not None]
        if len(self.runs) > 1:
            return statistics.stdev(finals) if len(finals) >= 2 else None
        return self.runs[0].last_evals_sd()

    def per_source(self, which: str) -> dict[str, float]:
        sources = dict.fromkeys(s for r in self.runs for s in getattr(r, which))
        return {s: statistics.fmean(getattr(r, which)[s] for r in self.runs if s in getattr(r, which))
                for s in sources}


@dataclass
class View:
    title: str
    groups: list[GroupView]              # ranked
    reference: str
    notes: list[str]

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(s for g in self.groups for s in g.per_source("per_source_final")))

    def to_json(self) -> dict[str, Any]:
        def run_json(r: RunView) -> dict[str, Any]:
            out = {k: v for k, v in asdict(r).items() if k != "spec"}
            return {**out, "tokens_per_sec": r.tokens_per_sec}
        return {"title": self.title, "metric": METRIC, "reference": self.reference, "notes": self.notes,
                "ranking": [{"rank": g.rank, "name": g.name, "final_bits_per_byte": g.final,
                             "best_bits_per_byte": g.mean("best"), "delta_vs_reference": g.delta,
                             "noise": g.noise, "delta_noise": g.delta_noise, "seeds": len(g.runs),
                             "per_source_final": g.per_source("per_source_final"),
                             "per_source_best": g.per_source("per_source_best"), "spec_diff": g.diff,
                             "runs": [run_json(r) for r in g.runs]} for g in self.groups]}


# ------------------------------------------------------------------------------------------------ reading
def _source_of(key: str) -> str | None:
    """valid/<source>/bits_per_byte -> source (not valid/halt/..., valid/<probe>/...)."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "valid" and parts[2] == "bits_per_byte" and parts[1] != "halt":
        return parts[1]
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def read_run(run, name: str | None = None, group: str | None = None, train_seconds: float | None = None) -> RunView:
    """A RunView from a run directory (forge.train.run_dir.RunDir). train_seconds: the measured figure where
    the caller has it (forge compare); else summed from the logged throughput."""
    from forge.diagnose.run import diagnose_run
    from forge.metrics.engine import run_spec
    from forge.metrics.jsonl import read_metric_stream

    spec = run_spec(run)
    records = sorted(read_metric_stream(run.metrics_path).records, key=lambda r: r.get("step", 0))
    status = run.status() or {}
    seconds, prev_tokens, last_tps, known = 0.0, 0, None, True
    curve, per_final, per_best = [], {}, {}
    for r in records:
        step = r.get("step", 0)
        tokens = tokens_through(spec, step)
        tps = r.get("perf/tokens_per_sec")
        last_tps = tps if _finite(tps) and tps > 0 else last_tps
        if last_tps is None:
            known = False
        else:
            seconds += (tokens - prev_tokens) / last_tps
        prev_tokens = tokens
        if _finite(r.get(METRIC)):
            curve.append({"step": step, "tokens": tokens, "seconds": seconds if known else None, "bpb": r[METRIC]})
            for key, value in r.items():
                source = _source_of(key)
                if source and _finite(value):
                    per_final[source] = value
                    per_best[source] = min(value, per_best.get(source, value))
    steps = max([status.get("step", 0) if isinstance(status.get("step"), int) else 0]
                + [r.get("step", 0) for r in records[-1:]])
    if train_seconds is None and known and records:
        train_seconds = seconds
    elif train_seconds is not None and curve and known and seconds > 0:
        # the logged throughput's time axis scaled to the measured total: the same shape, the exact seconds
        scale = train_seconds / seconds
        for point in curve:
            point["seconds"] *= scale
    try:
        verdict = diagnose_run(run).verdict
    except Exception as err:   # a run the diagnosis cannot read still has its figures compared
        verdict = f"not diagnosed ({type(err).__name__})"
    finals = [p["bpb"] for p in curve]
    return RunView(name or run.run_id, run.run_id, group or name or run.run_id, str(status.get("status")), steps,
                   tokens_through(spec, steps), train_seconds, finals[-1] if finals else None,
                   min(finals) if finals else None, per_final, per_best, curve, verdict, spec)


def build_view(runs: list[RunView], title: str, notes: list[str] | None = None) -> View:
    groups: dict[str, list[RunView]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    ref_spec = runs[0].spec
    views = [GroupView(name, members, [d for d in spec_diff(ref_spec, members[0].spec)
                                       if not d.startswith(IGNORED_IN_DIFF)])
             for name, members in groups.items()]
    reference = views[0]
    for g in views:
        if g.final is not None and reference.final is not None:
            g.delta = g.final - reference.final
            noises = [n for n in (g.noise, reference.noise) if n is not None]
            g.delta_noise = max(noises) if noises else None
    ranked = sorted(views, key=lambda g: (g.final is None, g.final if g.final is not None else 0.0))
    for i, g in enumerate(ranked):
        g.rank = i + 1
    notes = list(notes or [])
    if any(len(g.runs) > 1 for g in views):
        notes.append("noise: standard deviation of the final bits/byte across seeds")
    else:
        notes.append(f"noise: standard deviation of bits/byte over each run's last {NOISE_EVALS} evaluations")
    return View(title, ranked, reference.name, notes)


# ------------------------------------------------------------------------------------------------ terminal
def _f(value: float | None, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def _delta(g: GroupView, reference: str) -> str:
    if g.name == reference:
        return "reference"
    if g.delta is None:
        return "-"
    noise = f" ± {g.delta_noise:.4f}" if g.delta_noise is not None else ""
    return f"{g.delta:+.4f}{noise}"


def _verdicts(g: GroupView) -> str:
    verdicts = [r.verdict for r in g.runs]
    return verdicts[0] if len(set(verdicts)) == 1 else ", ".join(verdicts)


def render_terminal(view: View) -> None:
    from rich.markup import escape
    from rich.table import Table

    from forge.ui import console

    out = console()
    table = Table(title=view.title, title_justify="left")
    sources = view.sources
    columns = ["#", "variant", "final bpb", "best bpb", "vs reference", *[f"{s} bpb" for s in sources],
               "steps", "tokens", "tok/s", "train s", "status", "diagnose"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("variant", "status", "diagnose", "vs reference") else "right")
    for g in view.groups:
        per_source = g.per_source("per_source_final")
        seeds = f" (x{len(g.runs)})" if len(g.runs) > 1 else ""
        table.add_row(str(g.rank), escape(g.name + seeds), _f(g.final), _f(g.mean("best")),
                      _delta(g, view.reference), *[_f(per_source.get(s)) for s in sources],
                      _f(g.mean("steps"), "{:,.0f}"), _f(g.mean("tokens"), "{:,.0f}"),
                      _f(g.mean("tokens_per_sec"), "{:,.0f}"), _f(g.mean("train_seconds"), "{:.1f}"),
                      ",".join(dict.fromkeys(r.status for r in g.runs)), escape(_verdicts(g)))
    out.print(table)
    for g in view.groups:
        if g.name != view.reference:
            out.print(f"spec diff {escape(g.name)} vs {escape(view.reference)}: "
                      f"{escape('; '.join(g.diff) or 'none')}")
    for note in view.notes:
        out.print(f"[dim]{escape(note)}[/]")


# ------------------------------------------------------------------------------------------------ html
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _svg(view: View, axis: str, label: str, width: int = 520, height: int = 300) -> str:
    """Bits/byte against `axis` (tokens | seconds), one polyline per run, coloured by group; inline SVG."""
    lines = [(gi, r, [(p[axis], p["bpb"]) for p in r.curve if p[axis] is not None])
             for gi, g in enumerate(view.groups) for r in g.runs]
    points = [pt for _, _, pts in lines for pt in pts]
    if not points:
        return f"<p>no evaluations with a known {html.escape(label)}</p>"
    x0, x1 = 0.0, max(x for x, _ in points) or 1.0
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 == y0 else (y0 - 0.03 * (y1 - y0), y1 + 0.03 * (y1 - y0))
    left, right, top, bottom = 56, 12, 12, 40
    w, h = width - left - right, height - top - bottom

    def sx(x): return left + (x - x0) / (x1 - x0) * w
    def sy(y): return top + (1 - (y - y0) / (y1 - y0)) * h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-size="11" font-family="sans-serif">',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for i in range(5):
        yv, xv = y0 + (y1 - y0) * i / 4, x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3f}</text>')
        parts.append(f'<text x="{sx(xv):.1f}" y="{top + h + 14}" text-anchor="middle">{xv:,.0f}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle">{html.escape(label)}</text>')
    for gi, r, pts in lines:
        colour = COLOURS[gi % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{path}">'
                     f'<title>{html.escape(r.name)}</title></polyline>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{colour}"/>' for x, y in pts]
    parts.append("</svg>")
    return "".join(parts)


def write_html(view: View, path: Path) -> Path:
    """One self-contained page (inline SVG and CSS; nothing fetched)."""
    e = html.escape
    sources = view.sources
    head = "".join(f"<th>{e(c)}</th>" for c in ["#", "variant", "final bpb", "best bpb", "vs reference",
                                                 *[f"{s} final / best" for s in sources], "steps", "tokens",
                                                 "tok/s", "train s", "status", "diagnose", "spec diff"])
    rows = []
    for gi, g in enumerate(view.groups):
        final, best = g.per_source("per_source_final"), g.per_source("per_source_best")
        seeds = f" (x{len(g.runs)})" if len(g.runs) > 1 else ""
        cells = [str(g.rank), f'<span style="color:{COLOURS[gi % len(COLOURS)]}">&#9632;</span> {e(g.name + seeds)}',
                 _f(g.final), _f(g.mean("best")), e(_delta(g, view.reference)),
                 *[f"{_f(final.get(s))} / {_f(best.get(s))}" for s in sources],
                 _f(g.mean("steps"), "{:,.0f}"), _f(g.mean("tokens"), "{:,.0f}"),
                 _f(g.mean("tokens_per_sec"), "{:,.0f}"), _f(g.mean("train_seconds"), "{:.1f}"),
                 e(",".join(dict.fromkeys(r.status for r in g.runs))), e(_verdicts(g)),
                 e("; ".join(g.diff)) or "-"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    runs = "".join(f"<li>{e(r.name)}: run <code>{e(r.run_id)}</code></li>" for g in view.groups for r in g.runs)
    notes = "".join(f"<p class=note>{e(n)}</p>" for n in view.notes)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(view.title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:nth-child(2),td:last-child{{text-align:left}}
figure{{display:inline-block;margin:8px}}.note{{color:#666}}</style></head><body>
<h1>{e(view.title)}</h1><p>{METRIC} (held-out bits per byte at full depth; lower is better), reference
<b>{e(view.reference)}</b></p>
<table><tr>{head}</tr>{"".join(rows)}</table>{notes}
<h2>Curves</h2><figure>{_svg(view, "tokens", "training tokens")}<figcaption>bits/byte vs training tokens</figcaption></figure>
<figure>{_svg(view, "seconds", "training seconds")}<figcaption>bits/byte vs training seconds</figcaption></figure>
<h2>Runs</h2><ul>{runs}</ul></body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def comparison_view(path: Path, record: dict[str, Any]) -> View:
    """The view of a comparison (runs/<id>/comparison.json): its variants' runs, with the seconds it measured."""
    from forge.compare.budget import Budget
    from forge.train.run_dir import RunDir

    runs = [read_run(RunDir(path.parent / v["run_id"]), v["name"], v.get("group"), v["train_seconds"])
            for v in record["variants"] if (path.parent / v["run_id"] / "lineage.json").is_file()]
    if not runs:
        raise ForgeError(f"comparison {record['id']} has no variant run yet: continue it with "
                         f"forge compare --resume {record['id']}")
    budget = Budget(**record["budget"])
    held_out = ("every variant scored on the same held-out batches" if record.get("same_held_out_batches")
                else "the variants' data settings differ: not the same held-out batches (bits/byte still "
                     "compares across tokenizers)")
    notes = [f"{budget.describe()}, {record['order']}; {held_out}",
             f"machine: {record['machine'].get('processor') or record['machine'].get('platform')}, "
             f"{record['machine'].get('cpu_count')} CPUs, torch {record['machine'].get('torch')}"]
    return build_view(runs, f"forge compare {record['id']} ({record['status']})", notes)

