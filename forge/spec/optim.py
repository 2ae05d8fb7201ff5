"""[optim]: MuGrokConfig, the MuonGrokfast stack (Muon + Grokfast + QK-clip, AdamW for the rest).

The section is phase-agnostic: later phases reuse it, and presets are spec files, not code constants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from forge.spec.base import Section




@dataclass(frozen=True)
class OptimizerRecipe:
    """What an optim.name builds (forge.optim.build): the optimizer of the hidden matrices and whether Grokfast
    filters the gradients. 1-D parameters and embeddings always go to AdamW (forge.optim.routing)."""
    matrices: Literal["muon", "adamw"]
    grokfast: bool
    description: str


# The optimizer registry: a new optim.name is one entry here (its components are built in forge.optim.build).
OPTIMIZERS = {
    "muon_grokfast": OptimizerRecipe("muon", True, "Muon for 2-D hidden weights, AdamW for embeddings and 1-D "
                                                   "params, Grokfast on every gradient."),
    "adamw": OptimizerRecipe("adamw", False, "plain torch AdamW for everything, the baseline; hidden weights keep "
                                             "optim.lr and optim.weight_decay, [optim.muon] and [optim.grokfast] "
                                             "are unused."),
}
OptimizerName = Literal[tuple(OPTIMIZERS)]
# match_adamw_rms (Moonlight): 0.2 * sqrt(max(rows, cols)), update RMS ~0.2 like AdamW, so AdamW lrs carry over.
# keller: sqrt(max(1, rows / cols)).
MuonScaling = Literal["match_adamw_rms", "keller"]
NSDtype = Literal["auto", "fp32", "bf16"]


class MuonSpec(Section):
    beta: float = Field(ge=0, lt=1, description="Momentum coefficient.")
    nesterov: bool = Field(True, description="Nesterov momentum.")
    ns_steps: PositiveInt = Field(description="Newton-Schulz iterations k (quintic coefficients).")
    use_svd: bool = Field(description="Exact orthogonalisation by SVD instead of Newton-Schulz (slow; D2 fallback).")
    scaling: MuonScaling = Field("match_adamw_rms", description="Shape-based update scaling.")
    ns_dtype: NSDtype = Field("auto", description="Newton-Schulz compute dtype (the input is normalised in fp32 "
                                                  "first). auto: the precision the step runs in (bf16 when "
                                                  "train.precision resolves to a native bf16, else fp32; the "
                                                  "reference runs NS in bf16): on the AVX-512 BF16 EPYC bf16 NS "
                                                  "takes 0.4-0.5x the fp32 time, singular values in the same band. "
                                                  "bf16 is refused on a device without native bf16 (over 100x "
                                                  "slower there). The SVD path always runs in fp32.")
    shard_newton_schulz: bool = Field(False, description="Under data parallelism (forge train --nproc N): each "
                                      "matrix's Newton-Schulz runs on one owner rank, which sends the updated "
                                      "weight to the others (NS compute / N, one broadcast per matrix). Off: "
                                      "every rank orthogonalises every matrix (replicated). Same result either "
                                      "way; no effect on one process.")


class GrokfastSpec(Section):
    enabled: bool = Field(description="Grokfast slow-gradient amplification, once per optimizer step.")
    alpha: float = Field(ge=0, lt=1, description="EMA factor: g_ema <- alpha g_ema + (1 - alpha) g.")
    lam: float = Field(ge=0, description="Amplification: g <- g + lam * g_ema.")


class QKClipSpec(Section):
    enabled: bool = Field(True, description="Rescale W_Q/W_K of heads whose max attention logit exceeds tau.")
    tau: PositiveFloat = Field(description="Max-logit threshold (finite; enabled = false disables clipping).")
    per_head: bool = Field(description="Clip per head (true) or per layer with the layer's max (false).")
    mlarope_shared_k_protected: bool = Field(description="Never rescale the (shared) rotary key; the query side "
                                                         "takes the full factor instead.")


class AdamWSpec(Section):
    lr: Optional[PositiveFloat] = Field(None, description="Learning rate of the AdamW group; unset = optim.lr.")
    betas: list[float] = Field(min_length=2, max_length=2, description="AdamW (beta1, beta2).")
    eps: PositiveFloat = Field(description="AdamW epsilon.")
    weight_decay: float = Field(ge=0, description="Decoupled weight decay of the AdamW group (1-D params, "
                                                  "embeddings).")

    @model_validator(mode="after")
    def check_betas(self) -> "AdamWSpec":
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1) (got {list(self.betas)})")
        return self


class LrOverride(Section):
    match: str = Field(min_length=1, description="Parameter-name substring (e.g. 'attn.q_proj'). Must match at "
                                                 "least one trainable parameter; a parameter may match one rule.")
    scale: PositiveFloat = Field(description="Multiplier of the group's lr (Muon or AdamW) for matching parameters.")


class OptimSpec(Section):
    name: OptimizerName = Field(description=" ".join(f"{name}: {r.description}" for name, r in OPTIMIZERS.items()))
    lr: PositiveFloat = Field(description="Peak learning rate (Muon group; AdamW group unless adamw.lr is set).")
    weight_decay: float = Field(ge=0, description="Decoupled weight decay of the Muon group.")
    grad_clip: PositiveFloat = Field(description="Global gradient-norm clip (max_norm), after Grokfast, before the "
                                                 "update.")
    muon: MuonSpec
    grokfast: GrokfastSpec
    qk_clip: QKClipSpec
    adamw: AdamWSpec
    lr_overrides: list[LrOverride] = Field(default_factory=list, description="Per-parameter lr multipliers.")
    kl_coefficient: Optional[float] = Field(None, ge=0, description="Later phases (distillation): KL weight. "
                                                                    "Validated, unused in Phase 1.")
    ste_mode: Optional[bool] = Field(None, description="Later phases (quantisation): straight-through estimator. "
                                                       "Validated, unused in Phase 1.")

    @property
    def recipe(self) -> OptimizerRecipe:
        """What optim.name builds (the registry OPTIMIZERS)."""
        return OPTIMIZERS[self.name]
