"""[train], [checkpoint], [logging], [merge_preview]: how the run executes and what it records."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from forge.spec.base import Section


HEALABLE_DEFAULT = ["C2-nonfinite-updates", "B2-attention-instability", "D1-grokfast-over-amplification",
                    "D1-loss-oscillation", "C2-recursion-instability", "C2-state-gradient-explosion",
                    "C1-act-always-halting", "C1-act-never-halting"]


class HealSpec(Section):
    """[train.heal]: a critical finding of the debugging tree (checklists/diagnose.toml) that fires during training
    rolls the run back to its newest checkpoint before the finding's onset, applies the finding's first remedy as a
    recorded spec patch (what `forge diagnose --apply` writes) and continues in the same run directory
    (forge/train/heal.py). `forge train --heal` sets enabled = true."""
    enabled: bool = Field(False, description="Heal the run when a finding of `modes` fires (forge train --heal).")
    max_attempts: PositiveInt = Field(3, description="Heals per run; the next finding after them stops the run "
                                                     "with the diagnosis (as does a finding that returns after "
                                                     "its remedy).")
    modes: list[str] = Field(default_factory=lambda: list(HEALABLE_DEFAULT), min_length=1,
                             description="Rule ids of checklists/diagnose.toml that may be healed (critical rules "
                                         "with a remedy as a spec change). The default leaves out "
                                         "D2-newton-schulz-divergence: its bound holds on every run with ns_steps 3.")
    batch_z: PositiveFloat = Field(5.0, description="Bad-batch attribution: a micro-batch whose loss has a robust "
                                                    "z-score (median/MAD over the kept window) above this carries "
                                                    "the finding; a heal records its loader position in "
                                                    "skipped_batches.json and the loader skips it from then on.")
    batch_window: PositiveInt = Field(200, description="Optimizer steps whose per-micro-batch losses are kept for "
                                                       "attribution.")
    attribute: list[str] = Field(default_factory=lambda: ["B2-attention-instability", "C2-nonfinite-updates"],
                                 description="Rule ids whose heal attributes the finding to batches (loss spikes, "
                                             "non-finite losses); the other findings are the spec's, not the "
                                             "data's, and skip nothing.")
    keep_checkpoints: PositiveInt = Field(4, description="With heal enabled, checkpoints kept on disk are at least "
                                                         "this many (the larger of it and checkpoint.keep_last_n), "
                                                         "so one written before a finding's onset is there to "
                                                         "roll back to.")

    @model_validator(mode="after")
    def check_unique(self) -> "HealSpec":
        # that each id is a rule of checklists/diagnose.toml (and each mode a healable one) is checked against
        # the rules file when a run starts (forge.train.heal.healable_rules)
        for field_name in ("modes", "attribute"):
            ids = getattr(self, field_name)
            if len(set(ids)) != len(ids):
                raise ValueError(f"{field_name}: rule ids must be unique")
        return self


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
    heal: HealSpec = Field(default_factory=HealSpec, description="Self-healing: roll back, patch, continue.")


class CheckpointSpec(Section):
    every: PositiveInt = Field(description="Save a checkpoint every N steps (and at the end).")
    keep_last_n: PositiveInt = Field(description="Checkpoints kept on disk (>= 1).")
    async_save: bool = Field(False, description="Write checkpoints in a background thread (atomicity kept).")


class WandbSpec(Section):
    """Defaults for W&B: a WANDB_* environment variable, where set, wins (WANDB_MODE, WANDB_DIR, WANDB_PROJECT,
    WANDB_ENTITY, WANDB_NAME, WANDB_RUN_GROUP, WANDB_JOB_TYPE, WANDB_TAGS; WANDB_DISABLED=true is mode disabled),
    as W&B users expect. The W&B run id is always the forge run id (a resumed run continues its W&B run)."""

    project: str = Field(min_length=1, description="W&B project (WANDB_PROJECT wins).")
    name: Optional[str] = Field(None, min_length=1, description="W&B run display name; unset = the forge run id "
                                                                "(WANDB_NAME wins).")
    entity: Optional[str] = Field(None, description="W&B entity (team or user); unset = the default (WANDB_ENTITY "
                                                    "wins).")
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline writes under the run "
                                                                                 "directory (sync later with "
                                                                                 "`wandb sync`); disabled writes "
                                                                                 "nothing (WANDB_MODE wins).")
    group: Optional[str] = Field(None, min_length=1, description="W&B group; unset = run.name, so the runs of one "
                                                                 "spec sit together (WANDB_RUN_GROUP wins).")
    job_type: str = Field("train", min_length=1, description="W&B job type (WANDB_JOB_TYPE wins).")
    tags: list[str] = Field([], description="Extra W&B tags; forge adds spec:<hash12> and the id of every "
                                            "during-training warning (WANDB_TAGS, comma-separated, adds to them).")
    log_checkpoints: bool = Field(False, description="Upload every checkpoint as a W&B artifact (type model, "
                                                     "aliases step-N and latest).")


class LoggingSpec(Section):
    every: PositiveInt = Field(description="Compute and log metrics every N steps.")
    histograms: bool = Field(description="Log weight/activation histograms (costly; F1).")
    gradients: bool = Field(description="Log per-parameter gradient norms (costly; F1).")
    tensorboard: bool = Field(False, description="Also write the scalars, images and tables to TensorBoard "
                                                 "(torch.utils.tensorboard) under <run>/tensorboard; needs the "
                                                 "tensorboard package (pip install 'forge-cognate[tensorboard]').")
    wandb: WandbSpec


class MergePreviewSpec(Section):
    enabled: bool = Field(True, description="Phase 2 merge preview during training.")
    every: PositiveInt = Field(description="Merge current weights with the previous checkpoint every N steps.")
    method: Literal["slerp", "linear"] = Field(description="Merge method.")
    t: float = Field(0.5, ge=0, le=1, description="Interpolation factor between the two parents.")
