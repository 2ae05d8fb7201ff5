"""The probes in forge report: metric table, samples, the ACT halting histogram and attention-heatmap
overviews, all read from the run directory (metrics.jsonl, samples.jsonl, heatmaps/step-*/)."""
from __future__ import annotations

import math
import re
from pathlib import Path

from forge.metrics.jsonl import read_objects
from forge.report.criteria import RunRecord

# (metric, what it detects); per-distance position metrics are appended from the records
PROBE_METRICS = (("valid/reasoning_accuracy", "A1 objective mismatch"),
                 ("valid/long_range_acc", "B2 memory past the window"),
                 ("valid/short_range_acc", "B2 reference: within the window"),
                 ("eval/position_accuracy", "E1 position tracking"),
                 ("attn/rope_norm", "E1 rotary keys (training)"),
                 ("eval/attn/rope_norm", "E1 rotary keys (held-out)"),
                 ("eval/attn/entropy", "B2 attention entropy"),
                 ("eval/attn/sink_count", "E2 heads with a sink"),
                 ("eval/sample_avg_steps", "C1 ACT steps while sampling"))
# the contribution probes (forge/train/evaluate.py): what each part earns on held-out data
CONTRIBUTIONS = (("valid/memory_contribution_bpb", "C1 memory: bits/byte without it - with it"),
                 ("valid/recursion_gain_bpb", "C2 recursion: bits/byte step 0 - last step"),
                 ("valid/gate/token_spread", "C1 gate: std of g over tokens"),
                 ("valid/gate/channel_spread", "C1 gate: std of g over channels"),
                 ("valid/gate/decided_share", "C1 gate: share of g outside [0.1, 0.9]"))
HALT_SHARE = re.compile(r"^valid/halt/share_step(\d+)$")


def probe_rows(rec: RunRecord) -> list[tuple[str, str, list[float]]]:
    """(metric, what it detects, values over evaluations) for every probe metric the run logged."""
    keys = {k for r in rec.records for k in r}
    distances = sorted((k for k in keys if k.startswith("eval/position_accuracy/d")),
                       key=lambda k: int(k.rsplit("/d", 1)[1]))
    per_source = sorted(k for k in keys if k.startswith("valid/reasoning_accuracy/"))
    contributions = []
    for metric, why in CONTRIBUTIONS:
        contributions += [(metric, why), *((k, f"{why.split(':')[0]}, {k.rsplit('/', 1)[1]}") for k in sorted(keys)
                                           if k.startswith(metric + "/"))]
    wanted = [*PROBE_METRICS[:4], *((k, "E1 at distance " + k.rsplit("/d", 1)[1]) for k in distances),
              *((k, "A1 items of " + k.rsplit("/", 1)[1]) for k in per_source), *PROBE_METRICS[4:], *contributions]
    return [(m, why, rec.values(m)) for m, why in wanted if rec.values(m)]


def latest_samples(rec: RunRecord) -> tuple[int | None, list[dict]]:
    """The samples written at the last evaluation (step, records)."""
    path = rec.run.path / "samples.jsonl"
    if not path.is_file():
        return None, []
    rows = [r for r in read_objects(path).records if isinstance(r.get("step"), int)]
    if not rows:
        return None, []
    step = rows[-1]["step"]
    return step, [r for r in rows if r["step"] == step]


def halting_histogram(rec: RunRecord) -> tuple[int, list[float]] | None:
    """(step, share of held-out tokens per outer step) at the last evaluation that logged it."""
    for record in reversed(rec.records):
        shares = {int(m.group(1)): v for k, v in record.items() if (m := HALT_SHARE.match(k))}
        if shares and all(isinstance(v, (int, float)) and math.isfinite(v) for v in shares.values()):
            return record["step"], [shares[t] for t in sorted(shares)]
    return None


def write_probe_plots(rec: RunRecord, out_dir: Path) -> list[Path]:
    """plots/act_histogram.png (C1) and plots/heatmaps_step-NNNNNNN.png (one grid per saved step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    hist = halting_histogram(rec)
    if hist is not None:
        step, shares = hist
        evals = [(r["step"], [r[k] for k in sorted((k for k in r if HALT_SHARE.match(k)),
                                                   key=lambda k: int(HALT_SHARE.match(k).group(1)))])
                 for r in rec.records if any(HALT_SHARE.match(k) for k in r)]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
        left.bar([str(t + 1) for t in range(len(shares))], shares, color="tab:blue")
        left.set(title=f"halting step per token (step {step})", xlabel="outer steps used", ylabel="share", ylim=(0, 1))
        steps = [s for s, _ in evals]
        for t in range(len(shares)):
            right.plot(steps, [v[t] for _, v in evals], marker="o", markersize=3, label=f"{t + 1} steps")
        right.set(title="over evaluations", xlabel="step", ylim=(0, 1))
        right.legend(fontsize=8)
        fig.suptitle(f"{rec.run.run_id}: ACT histogram (C1)", fontsize=10)
        fig.tight_layout()
        path = out_dir / "act_histogram.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    for step_dir in sorted((rec.run.path / "heatmaps").glob("step-*")):
        written.append(_heatmap_grid(plt, rec.run.run_id, step_dir, out_dir / f"heatmaps_{step_dir.name}.png"))
    return written


def _heatmap_grid(plt, run_id: str, step_dir: Path, path: Path) -> Path:
    """One figure: a row per layer, a column per head, from <run>/heatmaps/step-N/<layer>_head<h>.png."""
    maps: dict[str, dict[int, Path]] = {}
    for png in step_dir.glob("*_head*.png"):
        layer, head = png.stem.rsplit("_head", 1)
        maps.setdefault(layer, {})[int(head)] = png
    layers = sorted(maps, key=lambda n: (not n.startswith("backbone"), int(re.sub(r"\D", "", n) or 0)))
    n_heads = max(len(h) for h in maps.values())
    fig, axes = plt.subplots(len(layers), n_heads, figsize=(1.8 * n_heads, 1.8 * len(layers)), dpi=100,
                             squeeze=False)
    for row, layer in enumerate(layers):
        for h in range(n_heads):
            ax = axes[row][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h in maps[layer]:
                ax.imshow(plt.imread(maps[layer][h]))
            if row == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(layer, fontsize=8)
    fig.suptitle(f"{run_id}: attention at {step_dir.name} (sqrt p; query down, key across)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
