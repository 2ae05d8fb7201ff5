"""Build everything a run needs from its spec, one small builder per spec section (torchtitan style)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forge.spec.schema import Spec


@dataclass
class Components:
    model: torch.nn.Module
    optimizer: Any
    schedule: Any
    data: Any        # forge.data.Data: tokenizer, held-out batches
    loader: Any      # forge.data.TrainLoader: the resumable training stream
    device: torch.device
    qk_clip: Any     # forge.optim.QKClip: the model's QK-clip wiring
    precision: Any = None   # forge.train.precision.Precision: train.precision resolved on `device`


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """The spec's train.device; on CUDA the GPU of this process's local rank (one GPU per process)."""
    if setting == "cuda" and not torch.cuda.is_available():
        from forge.errors import ForgeError

        raise ForgeError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_components(spec: Spec, data_dir: Path, cache_dir: Path | None = None, world=None) -> Components:
    from forge.data import build_data
    from forge.model import build_model
    from forge.optim import QKClip, build_lr_schedule, build_optimizer
    from forge.train.precision import resolve_precision

    device = resolve_device(spec.train.device, world.local_rank if world is not None else 0)
    seed_everything(spec.run.seed)
    model = build_model(spec.model, spec.objective).to(device)
    qk_clip = QKClip(spec.optim.qk_clip, model)
    precision = resolve_precision(spec.train.precision, device, refresh=True)   # MFU's peak: best measured
    optimizer = build_optimizer(spec.optim, model, precision)     # optim.muon.ns_dtype = auto follows it
    schedule = build_lr_schedule(spec.train, optimizer)
    data = build_data(spec.data, vocab_size=spec.model.vocab_size, seed=spec.run.seed, data_dir=data_dir,
                      cache_dir=cache_dir)
    return Components(model, optimizer, schedule, data, data.train_loader(), device, qk_clip, precision)


def rng_state() -> dict[str, Any]:
    """Every random generator a step may draw from, as tensors / plain values (weights_only-safe)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
