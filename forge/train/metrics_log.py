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

from forge.train.mirrors import SUMMARY_PREFIXES


HISTOGRAM_QUANTILES = [0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every readable record of a metrics.jsonl (forge.metrics.jsonl: a torn or malformed line anywhere is
    skipped, never the end of reading)."""
    from forge.metrics.jsonl import read_metric_stream

    return read_metric_stream(path).records


def truncate_after(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop the records after `step` (a resumed or healed run trains those steps again) and return them. Every
    field of a kept record stays (samples.jsonl's texts, warnings.jsonl's titles: not only the numbers); a
    record without an integer step (a mirror's warning) is kept."""
    from forge.metrics.jsonl import read_objects

    kept, dropped = [], []
    for record in read_objects(path).records:
        later = isinstance(record.get("step"), int) and record["step"] > step
        (dropped if later else kept).append(record)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
    return dropped


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class NullMetricsLog:
    """The metrics log of a rank other than 0 under DDP: rank 0 alone writes records; the others call the same
    methods and nothing happens (a null object, not a rank branch at every call)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def histograms(self, step: int, tensors: dict) -> None:
        pass

    def evaluation(self, step: int, record: dict[str, Any]) -> None:
        pass

    def tag(self, tag: str) -> None:
        pass

    def checkpoint(self, step: int, path: Path) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass

    def alert(self, title: str, text: str) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass


class MetricsLog:
    """Append-only JSONL writer plus the mirrors the spec asks for (forge/train/mirrors.py: W&B, TensorBoard).
    A mirror that cannot start or fails later is dropped: `warn` shows it once and warnings.jsonl keeps it
    (id OBS-wandb / OBS-tensorboard); the run goes on with local metrics."""

    def __init__(self, path: Path, spec, run_id: str, run_dir: Path, lineage: dict[str, Any],
                 warn: Callable[[str], None]):
        from forge.train.mirrors import wandb_settings

        self.path, self.run_dir = path, run_dir
        self._file = open(path, "a", encoding="utf-8")
        self._warn = warn
        self._step = 0
        self._summary: dict[str, Any] = {}
        self._mirrors: list = []
        settings = wandb_settings(spec.logging.wandb, run_id, spec.run.name, run_dir, lineage.get("spec_hash", ""))
        if settings is not None:
            config = {**spec.model_dump(mode="json"), "lineage": lineage}
            self._start("wandb", lambda m: m.WandbMirror(settings, config, spec.logging.wandb.log_checkpoints))
        if spec.logging.tensorboard:
            self._start("tensorboard", lambda m: m.TensorBoardMirror(run_dir / "tensorboard"))

    @property
    def mirrors(self) -> list[str]:
        return [m.name for m in self._mirrors]

    def _start(self, name: str, make) -> None:
        from forge.train import mirrors

        try:
            self._mirrors.append(make(mirrors))
        except Exception as err:
            self._failed(name, "could not start", err)

    def _failed(self, name: str, what: str, err: BaseException) -> None:
        from forge.train.run_dir import RunDir

        label = {"wandb": "W&B", "tensorboard": "TensorBoard"}[name]
        message = f"{label} {what} ({type(err).__name__}: {err}); metrics go to {self.path} only"
        self._warn(message)
        RunDir(self.run_dir).append_warning({"step": self._step, "id": f"OBS-{name}", "title": f"{label} failed",
                                             "measured": message})

    def _mirror(self, method: str, *args) -> None:
        for mirror in list(self._mirrors):
            try:
                getattr(mirror, method)(*args)
            except Exception as err:   # a mirror: the run goes on with local metrics
                self._mirrors.remove(mirror)
                self._failed(mirror.name, f"{method} failed", err)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._step = step
        record = {"step": step, **{k: _finite_or_none(float(v)) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if not self._mirrors:
            return
        constants = {k: float(v) for k, v in metrics.items() if k.startswith(SUMMARY_PREFIXES)}
        if any(self._summary.get(k) != v for k, v in constants.items()):
            self._summary.update(constants)
            self._mirror("summary", constants)
        self._mirror("log", step, {k: float(v) for k, v in metrics.items() if k not in constants})

    def histograms(self, step: int, tensors: dict) -> None:
        """logging.histograms: the distribution of every parameter, as quantiles in histograms.jsonl next
        to metrics.jsonl (one line per step) and as histograms in the mirrors. Costly (F1): off by default."""
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
        self._mirror("histograms", step, tensors)

    def evaluation(self, step: int, record: dict[str, Any]) -> None:
        """After an evaluation (its metrics logged): the run's plots, the ACT histogram, the attention heatmaps of
        this step, this step's samples and the success criteria, as images and tables in the mirrors. Read from
        the run directory, as forge report does; nothing is computed for metrics.jsonl."""
        if not self._mirrors:
            return
        self._mirror("media", step, *evaluation_media(self.run_dir, step, record))

    def tag(self, tag: str) -> None:
        """A during-training warning's id (W&B tag)."""
        self._mirror("tag", tag)

    def checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint on disk (W&B artifact when logging.wandb.log_checkpoints)."""
        self._mirror("checkpoint", step, path)

    def alert(self, title: str, text: str) -> None:
        """A heal's finding and action (forge.train.heal): a W&B alert, a TensorBoard text."""
        self._mirror("alert", self._step, title, text)

    def rewind(self, step: int) -> None:
        """Drop the records after `step` (a heal rolled back): the file is rewritten and reopened. The mirrors
        keep their history (W&B cannot rewind a run; it gets the re-trained steps after the last it has)."""
        self._file.close()
        truncate_after(self.path, step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._step = step

    def close(self, exit_code: int = 0) -> None:
        self._file.close()
        self._mirror("close", exit_code)
        self._mirrors = []


def evaluation_media(run_dir: Path, step: int, record: dict[str, Any]):
    """(images {key: png}, tables {key: (columns, rows)}) for the mirrors at an evaluation."""
    from forge.probes.suite import SAMPLES
    from forge.report.criteria import RunRecord, success_criteria
    from forge.report.probes import HALT_SHARE
    from forge.report.render import write_plots
    from forge.train.run_dir import RunDir

    rec = RunRecord.load(RunDir(run_dir))
    images = {f"plots/{p.stem}": p for p in write_plots(rec) if not p.stem.startswith("heatmaps_step-")}
    heatmap = run_dir / "plots" / f"heatmaps_step-{step:07d}.png"
    if heatmap.is_file():
        images["probes/attention_heatmaps"] = heatmap
    tables = {"report/success_criteria": (["criterion", "measured", "target", "status"],
                                          [[c.name, c.measured, c.target, c.status] for c in success_criteria(rec)])}
    shares = sorted((int(m.group(1)), v) for k, v in record.items() if (m := HALT_SHARE.match(k)))
    if shares:
        tables["act/halting_histogram"] = (["outer steps used", "share of tokens"], [[t + 1, v] for t, v in shares])
    samples = [json.loads(line) for line in (run_dir / SAMPLES).read_text(encoding="utf-8").splitlines()
               if line.strip()] if (run_dir / SAMPLES).is_file() else []
    rows = [[s["source"], s["prompt"], s["completion"], s["avg_steps"]] for s in samples if s.get("step") == step]
    if rows:
        tables["probes/samples"] = (["source", "prompt", "completion", "ACT steps per token"], rows)
    return images, tables
