"""One metrics stream: metrics.jsonl in the run directory (always), mirrored to W&B when it can start.

Everything else (live view, during-training monitors, forge diagnose, forge report) reads this
stream; training code never calls them directly.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable


HISTOGRAM_QUANTILES = [0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every readable record of a metrics.jsonl (forge.metrics.jsonl: a torn or malformed line anywhere is
    skipped, never the end of reading)."""
    from forge.metrics.jsonl import read_metric_stream

    return read_metric_stream(path).records


def truncate_after(path: Path, step: int) -> None:
    """Drop records after `step` (a resumed run replays them from its checkpoint)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class MetricsLog:
    """Append-only JSONL writer plus an optional W&B mirror. `warn` reports a problem once."""

    def __init__(self, path: Path, wandb_spec, run_id: str, run_dir: Path, config: dict[str, Any],
                 warn: Callable[[str], None]):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._warn = warn
        self._wandb = None
        if wandb_spec.mode != "disabled":
            self._wandb = self._start_wandb(wandb_spec, run_id, run_dir, config)

    def _start_wandb(self, wandb_spec, run_id: str, run_dir: Path, config: dict[str, Any]):
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            return wandb.init(project=wandb_spec.project, name=wandb_spec.name, entity=wandb_spec.entity,
                              mode=wandb_spec.mode, id=run_id, resume="allow", dir=str(run_dir),
                              config=config, settings=wandb.Settings(console="off", x_disable_stats=True))
        except Exception as err:  # W&B is a mirror: the run goes on with local metrics
            self._warn(f"W&B could not start ({type(err).__name__}: {err}); metrics go to {self.path} only")
            return None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _finite_or_none(float(v)) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            try:
                self._wandb.log(metrics, step=step)
            except Exception as err:
                self._warn(f"W&B logging failed ({type(err).__name__}: {err}); continuing with local metrics")
                self._wandb = None

    def histograms(self, step: int, tensors: dict) -> None:
        """logging.histograms: the distribution of every parameter, as quantiles in histograms.jsonl next
        to metrics.jsonl (one line per step) and as W&B histograms when W&B runs. Costly (F1): off by default."""
        import torch

        q = torch.tensor(HISTOGRAM_QUANTILES)
        summary = {}
        for name, t in tensors.items():
            flat = t.detach().float().flatten()
            if flat.numel() > 1_000_000:  # torch.quantile's input limit: an evenly strided sample
                flat = flat[:: flat.numel() // 1_000_000 + 1]
            summary[name] = [round(float(v), 6) for v in torch.quantile(flat, q)]
        with open(self.path.with_name("histograms.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "quantiles": HISTOGRAM_QUANTILES, "params": summary}) + "\n")
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"hist/{n}": wandb.Histogram(t.detach().float().cpu().numpy())
                             for n, t in tensors.items()}, step=step)

    def close(self, exit_code: int = 0) -> None:
        self._file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish(exit_code=exit_code)
            except Exception as err:
                self._warn(f"W&B finish failed ({type(err).__name__}: {err})")
            self._wandb = None
