"""Mirrors of the metrics stream in the tools users already watch: W&B and TensorBoard.

metrics.jsonl stays the record (forge/train/metrics_log.py); a mirror gets the same scalars (time series to
the history, scalars that are not, like config/param_count, to the summary), and at each evaluation images
(report plots, ACT histogram, attention heatmaps) and tables (samples, halting histogram, success criteria).
A mirror that raises is dropped by MetricsLog, which says so and records it in warnings.jsonl.

W&B settings: the spec's [logging.wandb] gives defaults and the standard WANDB_* environment variables win
(WANDB_MODE, WANDB_DIR, WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, WANDB_RUN_GROUP, WANDB_JOB_TYPE; WANDB_TAGS
adds tags; WANDB_DISABLED=true means disabled), so a W&B user's habits keep working. The W&B run id is the
forge run id: a resumed run continues its W&B run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SUMMARY_PREFIXES = ("config/",)   # constants of the run, not time series: W&B summary, TensorBoard text


def wandb_settings(wandb_spec, run_id: str, run_name: str, run_dir: Path, spec_hash: str,
                   env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments of wandb.init: the spec's values where the environment sets nothing. None when W&B
    is disabled (by the spec or by WANDB_MODE / WANDB_DISABLED)."""
    env = os.environ if env is None else env
    mode = env.get("WANDB_MODE") or wandb_spec.mode
    if mode == "dryrun":   # W&B's old name for offline
        mode = "offline"
    if mode == "disabled" or env.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return None
    extra_tags = [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {"mode": mode, "id": run_id, "resume": "allow",
            "dir": env.get("WANDB_DIR") or str(run_dir),
            "project": env.get("WANDB_PROJECT") or wandb_spec.project,
            "entity": env.get("WANDB_ENTITY") or wandb_spec.entity,
            "name": env.get("WANDB_NAME") or wandb_spec.name or run_id,
            "group": env.get("WANDB_RUN_GROUP") or wandb_spec.group or run_name,
            "job_type": env.get("WANDB_JOB_TYPE") or wandb_spec.job_type,
            "tags": list(dict.fromkeys([f"spec:{spec_hash[:12]}", *wandb_spec.tags, *extra_tags]))}


class WandbMirror:
    name = "wandb"
    open_runs = 0     # W&B runs open in this process (forge compare trains several at once)

    def __init__(self, settings: dict[str, Any], config: dict[str, Any], log_checkpoints: bool):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.log_checkpoints = log_checkpoints
        # create_new: a second run in the process (forge compare) is its own run, not the first one returned
        self.run = wandb.init(**settings, config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True, reinit="create_new"))
        WandbMirror.open_runs += 1
        self.last_step = -1

    def _behind(self, step: int) -> bool:
        """A step before the last one logged: a heal rolled the run back, and a W&B history cannot rewind
        (the alert says so); the re-trained steps are logged from the last step W&B has on."""
        if step < self.last_step:
            return True
        self.last_step = step
        return False

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self._behind(step):
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def histograms(self, step: int, tensors: dict) -> None:
        if self._behind(step):
            return
        self.run.log({f"hist/{n}": self.wandb.Histogram(t.detach().float().cpu().numpy()) for n, t in tensors.items()},
                     step=step)

    def media(self, step: int, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list]]]) -> None:
        if self._behind(step):
            return
        logged: dict[str, Any] = {k: self.wandb.Image(str(p)) for k, p in images.items()}
        for key, (columns, rows) in tables.items():
            logged[key] = self.wandb.Table(columns=columns, data=rows)
        self.run.log(logged, step=step)

    def tag(self, tag: str) -> None:
        if tag not in self.run.tags:
            self.run.tags = (*self.run.tags, tag)

    def alert(self, step: int, title: str, text: str) -> None:
        self.run.alert(title=title, text=f"step {step}: {text}")

    def checkpoint(self, step: int, path: Path) -> None:
        if not self.log_checkpoints:
            return
        artifact = self.wandb.Artifact(f"{self.run.id}-model", type="model", metadata={"step": step})
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)
        WandbMirror.open_runs -= 1
        if not WandbMirror.open_runs:   # the W&B service flushes the runs' files now, not at interpreter exit
            self.wandb.teardown()


class TensorBoardMirror:
    name = "tensorboard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.writer.add_text(key, str(value))

    def histograms(self, step: int, tensors: dict) -> None:
        for name, t in tensors.items():
            self.writer.add_histogram(f"hist/{name}", t.detach().float().cpu(), global_step=step)

    def media(self, step: int, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list]]]) -> None:
        import matplotlib.image

        for key, path in images.items():
            pixels = matplotlib.image.imread(str(path))[..., :3]     # RGBA floats in [0, 1] -> RGB
            self.writer.add_image(key, pixels, global_step=step, dataformats="HWC")
        for key, (columns, rows) in tables.items():   # a markdown table (TensorBoard renders it)
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |"
                      for row in rows]
            self.writer.add_text(key, "\n".join(lines), global_step=step)
        self.writer.flush()

    def tag(self, tag: str) -> None:
        self.writer.add_text("warnings", tag)

    def alert(self, step: int, title: str, text: str) -> None:
        self.writer.add_text("heal", f"{title}: {text}", global_step=step)
        self.writer.flush()

    def checkpoint(self, step: int, path: Path) -> None:
        pass   # TensorBoard has no artifacts: the checkpoints are in the run directory

    def close(self, exit_code: int) -> None:
        self.writer.close()
