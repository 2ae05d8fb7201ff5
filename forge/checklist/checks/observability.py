"""Observability checks (F1 logging, F2 checkpoints): can the run be watched and recorded?"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from forge.checklist.context import CheckContext
from forge.checklist.registry import Outcome, failed, passed, register, skipped


@register("wandb_ready")
def wandb_ready(ctx: CheckContext) -> Outcome:
    """W&B starts in the mode the run will use (the spec's, or WANDB_MODE's: forge.train.mirrors): offline, a
    real offline W&B run is started and finished in a temporary directory; online, an API key must be
    configured (nothing is started: that would create a run on the server, so the start itself is `skip`);
    disabled, there is nothing to start (`skip`). The run still logs locally if W&B fails (warnings.jsonl)."""
    from forge.train.mirrors import wandb_settings

    settings = wandb_settings(ctx.spec.logging.wandb, "forge-check", ctx.spec.run.name, Path("."), "")
    if settings is None:
        return skipped("W&B disabled (logging.wandb.mode or WANDB_MODE/WANDB_DISABLED): nothing to start")
    mode = settings["mode"]
    if importlib.util.find_spec("wandb") is None:
        return failed("wandb not installed", f"wandb importable for mode {mode}", "pip install wandb")
    version = importlib.metadata.version("wandb")
    if mode == "offline":
        return _start_offline(settings, version)
    has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    if not has_key:
        return failed(f"wandb {version}, {mode}, no API key", "WANDB_API_KEY or `wandb login`",
                      "set WANDB_API_KEY, run `wandb login`, or --set logging.wandb.mode=offline")
    return skipped(f"wandb {version}, {mode}: API key found; not started before the run (it would create a W&B "
                   "run on the server)")


def _start_offline(settings: dict, version: str) -> Outcome:
    import tempfile
    import time

    import wandb

    from forge.train.mirrors import WandbMirror

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="forge-wandb-check-") as tmp:
        try:
            # create_new, and no teardown while runs of this process are open: forge compare checks a variant
            # while the earlier variants' W&B runs are live, and either would finish them
            run = wandb.init(**{**settings, "dir": tmp, "id": f"forge-check-{os.getpid()}", "resume": None},
                             settings=wandb.Settings(console="off", x_disable_stats=True, silent=True,
                                                     reinit="create_new"))
            run.finish()
        except Exception as err:
            return failed(f"wandb {version}, offline: {type(err).__name__}: {err}", "an offline run starts",
                          "the run would log to metrics.jsonl only")
        finally:
            if not WandbMirror.open_runs:
                wandb.teardown()
    return passed(f"wandb {version}, offline run started and finished in {time.perf_counter() - t0:.1f} s",
                  "an offline run starts", f"the run's W&B files go under {settings['dir']}/wandb (WANDB_DIR)"
                  if settings["dir"] != "." else "the run's W&B files go under <run dir>/wandb")


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
    from forge.optim import QKClip, build_optimizer

    spec = ctx.spec
    generator = torch.Generator().manual_seed(spec.run.seed)
    # 8 memory chunks: the memory's state grows from chunk to chunk, and an unstable inner update shows only after
    # a few of them (the MLP memory at phase1 width reads inf at chunk 8 on random tokens, finite at chunk 2)
    T = min(spec.data.seq_len, 8 * spec.model.memory.chunk_size if spec.model.memory.enabled else 64)
    with torch.random.fork_rng():
        torch.manual_seed(spec.run.seed)
        model = build_model(spec.model, spec.objective)
    clip = QKClip(spec.optim.qk_clip, model)
    optimizer = build_optimizer(spec.optim, model)
    idx = torch.randint(0, spec.model.vocab_size, (2, T + 1), generator=generator)
    model.log_attention_stats = True
    out = model(idx[:, :-1], idx[:, 1:], act_loss_weight=spec.model.act.loss_weight)
    out.loss.backward()
    clip.after_step(optimizer.step(collect_metrics=True))
    metrics = {**out.metrics, **optimizer.metrics()}
    # a family of a part the spec switches off (memory/gate, TRM/ACT) is not expected: an ablation emits no gate/
    part_on = {"gate/": spec.model.memory.enabled, "memory/": spec.model.memory.enabled, "act/": spec.model.trm.enabled}
    absent = [f for f in families if not part_on.get(f, True)]
    families = [f for f in families if f not in absent]
    missing = [f for f in families if not any(k.startswith(f) for k in metrics)]
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))
    measured = f"{len(metrics)} metrics: " + ", ".join(f"{f} {sum(k.startswith(f) for k in metrics)}" for f in families)
    if absent:
        measured += f" ({', '.join(absent)}: part off in the spec)"
    if missing or bad:
        return failed(measured, f"families {', '.join(families)}, finite",
                      f"missing: {', '.join(missing) or 'none'}; non-finite: {', '.join(bad) or 'none'}")
    return passed(measured, f"families {', '.join(families)}, finite", f"one real step at batch 2 x {T}")
