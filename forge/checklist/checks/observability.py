"""Observability checks (F1 logging, F2 checkpoints): can the run be watched and recorded?"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from forge.checklist.context import CheckContext
from forge.checklist.registry import Outcome, failed, passed, register


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


@register("metric_families")
def metric_families(ctx: CheckContext, families: list[str]) -> Outcome:
    """One real optimizer step of the model and optimizer built from the spec, on a short random batch,
    with logging on: the metric families the design's monitors read are emitted, with finite values."""
    import math

    import torch

    from forge.model import build_model
    from forge.optim import build_optimizer, qk_clip, set_max_logit_tracking

    spec = ctx.spec
    generator = torch.Generator().manual_seed(spec.run.seed)
    T = min(spec.data.seq_len, 2 * spec.model.memory.chunk_size if spec.model.memory.enabled else 64)
    with torch.random.fork_rng():
        torch.manual_seed(spec.run.seed)
        model = build_model(spec.model, spec.objective)
    set_max_logit_tracking(model, spec.optim.qk_clip.enabled)
    optimizer = build_optimizer(spec.optim, model)
    idx = torch.randint(0, spec.model.vocab_size, (2, T + 1), generator=generator)
    model.log_attention_stats = True
    out = model(idx[:, :-1], idx[:, 1:], act_loss_weight=spec.model.act.loss_weight)
    out.loss.backward()
    optimizer.step(collect_metrics=True)
    qk_clip(model, spec.optim.qk_clip)
    metrics = {**out.metrics, **optimizer.metrics()}
    missing = [f for f in families if not any(k.startswith(f) for k in metrics)]
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))
    measured = f"{len(metrics)} metrics: " + ", ".join(f"{f} {sum(k.startswith(f) for k in metrics)}" for f in families)
    if missing or bad:
        return failed(measured, f"families {', '.join(families)}, finite",
                      f"missing: {', '.join(missing) or 'none'}; non-finite: {', '.join(bad) or 'none'}")
    return passed(measured, f"families {', '.join(families)}, finite", f"one real step at batch 2 x {T}")
