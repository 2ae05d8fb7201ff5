"""[train], [checkpoint], [logging], [merge_preview]: how the run executes and what it records."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveInt

from forge.spec.base import Section


class TrainSpec(Section):
    max_steps: PositiveInt = Field(description="Optimizer steps of the run.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(description="Decay after warmup.")
    warmup_steps: int = Field(ge=0, description="Linear lr warmup from 0 over this many steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of the peak (cosine/linear).")
    eval_every: PositiveInt = Field(description="Evaluate on the held-out split every N steps (and at the end).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present, else CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 where the device computes it natively (CUDA with bf16; a CPU with AVX-512 "
                            "BF16 / AMX, per torch's capability queries and a measured bf16/fp32 matmul ratio, "
                            "cached per machine), else fp32; the resolved precision is shown at start and "
                            "recorded in environment.json. bf16: forward and backward under bf16 autocast "
                            "(weights, gradients and the optimizer stay fp32; QK-clip's max logit is scored in "
                            "fp32): on the project's AVX-512 BF16 EPYC 0.48x the fp32 phase1 step; on a CPU "
                            "without native bf16 (AVX2) over 100x slower, so an explicit bf16 there fails the "
                            "checklist (CFG-precision). fp32: never autocast.")
    max_nonfinite_in_a_row: PositiveInt = Field(10, description="Stop the run (status failed) after this many "
                                                                "consecutive non-finite steps (loss, gradient "
                                                                "or update; each one is undone).")
    gradient_checkpointing: Literal["off", "backbone", "backbone_and_trm"] = Field(
        "off", description="Recompute activations in the backward pass instead of storing them (OOM mitigation): "
                           "backbone blocks, or also every application of the TRM refiner. Same loss and "
                           "gradients; less memory, more compute (phase1 on CPU, batch 1 x 512: backbone "
                           "saves 30% of the stored activations for +4% step time, backbone_and_trm 79% for +24%).")
    cuda_empty_cache_every: int = Field(0, ge=0, description="On CUDA, call torch.cuda.empty_cache() every N steps "
                                                             "(fragmentation / OOM mitigation); 0 = never.")


class CheckpointSpec(Section):
    every: PositiveInt = Field(description="Save a checkpoint every N steps (and at the end).")
    keep_last_n: PositiveInt = Field(description="Checkpoints kept on disk (>= 1).")
    async_save: bool = Field(False, description="Write checkpoints in a background thread (atomicity kept).")


class WandbSpec(Section):
    project: str = Field(min_length=1, description="W&B project.")
    name: str = Field(min_length=1, description="W&B run display name.")
    entity: Optional[str] = Field(None, description="W&B entity (team or user); unset = the default.")
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline writes under the run "
                                                                                 "directory; disabled writes nothing.")


class LoggingSpec(Section):
    every: PositiveInt = Field(description="Compute and log metrics every N steps.")
    histograms: bool = Field(description="Log weight/activation histograms (costly; F1).")
    gradients: bool = Field(description="Log per-parameter gradient norms (costly; F1).")
    wandb: WandbSpec


class MergePreviewSpec(Section):
    enabled: bool = Field(True, description="Phase 2 merge preview during training.")
    every: PositiveInt = Field(description="Merge current weights with the previous checkpoint every N steps.")
    method: Literal["slerp", "linear"] = Field(description="Merge method.")
    t: float = Field(0.5, ge=0, le=1, description="Interpolation factor between the two parents.")
