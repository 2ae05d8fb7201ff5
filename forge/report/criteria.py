"""The design's success-criteria table, computed from a run's records only (forge/report never
imports the training code: it reads the run directory)."""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from forge.diagnose.signals import spikes
from forge.train.metrics_log import read_metrics
from forge.train.run_dir import RunDir


@dataclass(frozen=True)
class Criterion:
    name: str
    measured: float | None
    target: str
    status: str          # pass | warn | fail | n/a
    note: str = ""

    def shown(self) -> str:
        if self.measured is None:
            return "-"
        v = self.measured
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


@dataclass
class RunRecord:
    """Everything forge report reads from a run directory."""

    run: RunDir
    records: list[dict[str, Any]]
    spec: dict[str, Any]
    status: dict[str, Any]
    checklist: dict[str, Any]

    @classmethod
    def load(cls, run: RunDir) -> "RunRecord":
        spec = tomllib.loads((run.path / "spec.toml").read_text(encoding="utf-8"))
        checklist = run.read("checklist.json") if (run.path / "checklist.json").is_file() else {}
        return cls(run, read_metrics(run.metrics_path), spec, run.status() or {}, checklist)

    def series(self, metric: str) -> list[tuple[int, float]]:
        return [(r["step"], r[metric]) for r in self.records
                if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]

    def values(self, metric: str) -> list[float]:
        return [v for _, v in self.series(metric)]

    def tail_mean(self, metric: str, n: int = 5) -> float | None:
        vals = self.values(metric)[-n:]
        return sum(vals) / len(vals) if vals else None

    def last(self, metric: str) -> float | None:
        vals = self.values(metric)
        return vals[-1] if vals else None


def _band(value: float | None, low: float | None, high: float | None, warn_margin: float = 0.1) -> str:
    if value is None:
        return "n/a"
    inside = (low is None or value >= low) and (high is None or value <= high)
    if inside:
        return "pass"
    near = ((low is None or value >= low * (1 - warn_margin)) and
            (high is None or value <= high * (1 + warn_margin)))
    return "warn" if near else "fail"


def _budget(rec: RunRecord) -> tuple[float | None, str, str]:
    item = next((i for i in rec.checklist.get("items", []) if i["id"] == "B1-param-budget"), None)
    count = rec.last("config/param_count")
    if item is None or item["status"] == "skip" or not isinstance(item.get("data"), dict):
        return count, "design budget (see checklist)", "n/a" if count is None else "warn"
    measured = item["data"].get("total", count)
    return measured, item.get("expected", ""), "pass" if item["status"] == "pass" else "fail"


def success_criteria(rec: RunRecord) -> list[Criterion]:
    rows: list[Criterion] = []
    measured, target, status = _budget(rec)
    rows.append(Criterion("parameter budget", measured, target or "25M +/- 1M", status))
    losses = rec.values("loss/total")
    n_spikes = spikes(losses) if len(losses) >= 5 else None
    rows.append(Criterion("loss smoothness (spikes)", n_spikes, "0 spikes (robust z > 5)",
                          "n/a" if n_spikes is None else ("pass" if n_spikes == 0 else "warn")))
    halt_steps = rec.last("valid/halt/avg_steps")
    steps = halt_steps if halt_steps is not None else rec.tail_mean("act/avg_steps")
    t_max = rec.spec["model"]["trm"]["t_max"]
    rows.append(Criterion("ACT avg steps (eval, halting)", steps, f"2-4 (t_max {t_max})", _band(steps, 2.0, 4.0)))
    entropy = rec.tail_mean("gate/entropy")
    rows.append(Criterion("gate entropy (nats)", entropy, "> 0.5", _band(entropy, 0.5, None)))
    y_usage = rec.tail_mean("gate/y_usage")
    rows.append(Criterion("gate y usage", y_usage, "0.30-0.70", _band(y_usage, 0.3, 0.7)))
    clips = rec.values("optim/qk_clip_count")
    peak_clips = max(clips) if clips else None
    rows.append(Criterion("QK-clip count per step (max)", peak_clips, "< 100", _band(peak_clips, None, 99)))
    ts_ppl = rec.last("valid/tinystories/perplexity")
    ppl = ts_ppl if ts_ppl is not None else rec.last("valid/perplexity")
    rows.append(Criterion("valid perplexity" + (" (TinyStories)" if ts_ppl is not None else " (all sources)"),
                          ppl, "< 20", _band(ppl, None, 20.0)))
    bpb = rec.last("valid/bits_per_byte")
    first_bpb = rec.values("valid/bits_per_byte")[:1]
    rows.append(Criterion("valid bits per byte", bpb, "falling",
                          "n/a" if bpb is None or not first_bpb else ("pass" if bpb < first_bpb[0] else "fail"),
                          f"first eval {first_bpb[0]:.4g}" if first_bpb else ""))
    speed = rec.tail_mean("perf/tokens_per_sec")
    device = "GPU > 5000 tok/s" if str(rec.spec["train"]["device"]) == "cuda" else "CPU: reported"
    rows.append(Criterion("training speed (tokens/s)", speed, device,
                          "n/a" if speed is None else (_band(speed, 5000, None) if "GPU" in device else "pass")))
    memory = rec.last("perf/peak_memory_gb")
    rows.append(Criterion("peak memory (GB)", memory, "< 6", _band(memory, None, 6.0)))
    fitness = rec.last("merge/fitness")
    rows.append(Criterion("merge fitness vs parents", fitness, ">= 1 (merge no worse than parents)",
                          "n/a" if fitness is None else ("pass" if fitness >= 1 else "warn" if fitness >= 0.8 else "fail")))
    return rows


PLOTS: dict[str, tuple[str, Callable[[RunRecord], list[str]]]] = {
    "loss_per_step": ("training loss per TRM step",
                      lambda r: sorted(k for k in {k for x in r.records for k in x}
                                       if k.startswith("loss/step_") and not k.endswith("_last"))),
    "valid_bpb": ("validation bits per byte", lambda r: ["valid/bits_per_byte", "valid/halt/bits_per_byte"]),
    "act_steps": ("ACT average steps", lambda r: ["act/avg_steps", "valid/halt/avg_steps"]),
    "gate_usage": ("MAG gate usage", lambda r: ["gate/y_usage", "gate/m_usage", "gate/entropy"]),
    "grad_norms": ("gradient norms", lambda r: ["optim/grad_raw_norm", "optim/grad_ema_norm", "optim/grad_norm"]),
    "lr": ("learning rate", lambda r: sorted(k for k in {k for x in r.records for k in x} if k.startswith("optim/lr_"))),
    "tokens_per_sec": ("throughput (tokens/s)", lambda r: ["perf/tokens_per_sec"]),
    "probes": ("probes: reasoning (A1), long/short range (B2), position (E1)",
               lambda r: ["valid/reasoning_accuracy", "valid/long_range_acc", "valid/short_range_acc",
                          "eval/position_accuracy"]),
    "position_probe": ("position probe per distance (E1)",
                       lambda r: sorted((k for k in {k for x in r.records for k in x}
                                         if k.startswith("eval/position_accuracy/d")),
                                        key=lambda k: int(k.rsplit("/d", 1)[1]))),
    "rope_norm": ("rotary key norm (E1: QK-clip must not collapse it)", lambda r: ["attn/rope_norm",
                                                                                 "eval/attn/rope_norm"]),
}
