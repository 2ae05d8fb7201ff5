"""Builders shared by tests/test_distributed.py (1 process) and tests/dist_worker.py (2 processes under torchrun):
the real Trainer on the tiny spec, set up so that every rank-dependent mechanism is exercised within 10 steps:
gradient accumulation 2, Grokfast on, QK-clip firing (low tau), ACT loss from step 0 with tokens halting, and
the batch-level coherence / diversity terms weighted up."""
from __future__ import annotations

from pathlib import Path

import torch

from forge.distributed import SINGLE, World
from forge.spec.load import load_spec
from forge.train import checkpoint as ckpt
from forge.train.components import build_components
from forge.train.live import LiveView
from forge.train.loop import Trainer
from forge.train.metrics_log import MetricsLog
from forge.train.monitors import MonitorSet
from forge.train.run_dir import RunDir

SPEC = Path(__file__).resolve().parents[1] / "specs" / "tiny.toml"
OVERRIDES = ["data.grad_accum=2", "optim.grokfast.enabled=true", "optim.qk_clip.tau=0.15",
             "model.act.warmup_steps=0", "model.act.halt_thresh=0.0068", "objective.sequence_coherence=0.5",
             "objective.diversity=0.2", "train.max_steps=10", "train.eval_every=1000", "logging.every=5",
             "checkpoint.every=5", "checkpoint.async_save=false", "data.eval.max_batches=1",
             "logging.wandb.mode=disabled", "probes.enabled=false", "merge_preview.enabled=false"]
TAU_QUIET = 1000.0     # a QK-clip threshold no natural logit of the tiny model reaches


def make_trainer(root: Path, run_id: str, world: World = SINGLE, create: bool = True,
                 extra: tuple[str, ...] = ()) -> Trainer:
    """A Trainer as forge train builds it, in root/run_id (rank 0 creates the directory)."""
    resolved = load_spec(SPEC, [*OVERRIDES, *extra])
    parts = build_components(resolved.spec, root, world=world)     # built-in corpus: no data directory
    if create and world.main:
        RunDir.create(root, run_id)
    if world.distributed:
        torch.distributed.barrier()
    run = RunDir(root / run_id)
    live = LiveView(run_id, 0, resolved.spec.train.max_steps, tty=False, quiet=True)
    log = (MetricsLog(run.metrics_path, resolved.spec, run_id, run.path, {}, live.warn)
           if world.main else None)
    return Trainer(resolved, run, parts, live, log, MonitorSet([]), world)


def latest_checkpoint(run_path: Path) -> Path:
    return ckpt.latest_valid(run_path / "checkpoints")


def param_file(out: Path, name: str, rank: int) -> Path:
    return out / f"{name}-rank{rank}.pt"


def parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in trainer.parts.model.named_parameters()}


def save_parameters(trainer: Trainer, out: Path, name: str, rank: int) -> None:
    torch.save(parameters(trainer), param_file(out, name, rank))
