"""Observability checks (F1 logging, F2 checkpoints): can the run be watched and recorded?"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from forge.checklist.context import CheckContext
from forge.checklist.registry import Outcome, failed, passed, pending, register


@register("wandb_ready")
def wandb_ready(ctx: CheckContext) -> Outcome:
    """W&B can start in the spec's mode: installed; offline -> the run directory is writable;
    online -> an API key is configured. (The run still logs locally if W&B fails; see forge train.)"""
    mode = ctx.spec.logging.wandb.mode
    if mode == "disabled":
        return passed("mode disabled", "offline|online|disabled", "W&B disabled: metrics go to metrics.jsonl only")
    if importlib.util.find_spec("wandb") is None:
        return failed("wandb not installed", f"wandb importable for mode {mode}", "pip install wandb")
    version = importlib.metadata.version("wandb")
    if mode == "offline":
        out = Path(ctx.spec.run.output_dir)
        probe = out if out.exists() else next((p for p in out.resolve().parents if p.exists()), Path("."))
        if not os.access(probe, os.W_OK):
            return failed(f"{probe} not writable", "writable output_dir", f"wandb {version}, mode offline")
        return passed(f"wandb {version}, offline", "initialisable", f"offline files go under {out}/<run-id>/wandb")
    has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    if not has_key:
        return failed(f"wandb {version}, online, no API key", "WANDB_API_KEY or `wandb login`",
                      "set WANDB_API_KEY, run `wandb login`, or --set logging.wandb.mode=offline")
    return passed(f"wandb {version}, online", "initialisable", "API key found")


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


pending("metric_families", "needs forge train (issue #6): the metric stream of a real step")
