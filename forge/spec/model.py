"""[model]: the Titans-MAG backbone, its long-term memory and MAG gate, the TRM recursion, ACT halting.

Every number the model builder reads comes from here; the builder has no defaults of its own.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from forge.spec.base import Section



AttentionType = Literal["full", "sliding_window", "sliding_window_with_global"]


class AttentionSpec(Section):
    type: AttentionType = Field(description="full: causal over the whole sequence; sliding_window: each token "
                                            "sees itself and the previous sw_window - 1 tokens; "
                                            "sliding_window_with_global: plus global tokens (see global_every).")
    sw_window: PositiveInt = Field(description="Sliding-window width in tokens (the query itself included).")
    global_every: PositiveInt = Field(16, description="With sliding_window_with_global: every global_every-th "
                                                      "position (0, 16, 32, ...) is a global token that attends to "
                                                      "and is attended by all earlier positions (causally).")
    global_tokens: PositiveInt = Field(64, description="With sliding_window_with_global: at most this many global "
                                                       "tokens per sequence (the first ones).")
    rope_theta: PositiveFloat = Field(10000.0, description="RoPE base frequency.")


class MemorySpec(Section):
    enabled: bool = Field(True, description="Titans long-term memory branch; false gives a plain attention model "
                                            "(the benchmarks' baseline).")
    d_mem: PositiveInt = Field(description="Width of the memory's q/k/v projections and of the memory matrix.")
    decay: float = Field(gt=0, le=1, description="Forgetting factor per chunk update: M <- decay * M + S.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Surprise momentum eta: S <- eta * S - theta * grad.")
    factorized: bool = Field(description="Low-rank initial memory M0 = W1 W2 instead of a full d_mem x d_mem matrix.")
    rank: PositiveInt = Field(description="Rank of the factorized memory (ignored when factorized = false).")
    chunk_size: PositiveInt = Field(description="Tokens per memory update; reads of a chunk use the memory as of the "
                                                "end of the previous chunk (causal).")
    variant: Literal["linear", "mlp"] = Field("linear", description=(
        "linear: M is one d_mem x d_mem matrix (M0 factorized or full). mlp: Titans' deep memory M(x) = x + "
        "W_L gelu(... gelu(W_1 x)) with `depth` layers, learned initial weights ~ N(0, 1/fan_in), updated per "
        "chunk by the gradient of the associative loss through the MLP (factorized and rank are ignored)."))
    depth: int = Field(2, ge=2, description="Layers L_M of the mlp memory (variant = \"mlp\").")
    expansion: PositiveInt = Field(2, description="Hidden width of the mlp memory = expansion * d_mem.")
    gates: Literal["fixed", "data_dependent"] = Field("fixed", description=(
        "fixed: momentum and decay as given. data_dependent: per chunk eta_c = sigmoid(w . mean(u) + b) and "
        "alpha_c likewise, from the chunk's normalised inputs u (learned 1-D projections, initialised so that "
        "eta = momentum and alpha = decay)."))
    conv_kernel: int = Field(0, ge=0, description="Width of the depthwise causal 1-D convolution over time after the "
                                                  "q, k, v projections (identity at init); 0 = none.")
    qkv_activation: Literal["identity", "silu"] = Field("identity", description=(
        "Activation on q, k, v after the projections (and convolution), before q and k are L2-normalised; "
        "Titans uses silu."))
    max_grad_norm: float = Field(1.0, ge=0, description=(
        "Bound on the mlp memory's inner update (variant = \"mlp\"; the linear one ignores it): per chunk and "
        "sequence, the gradient of the associative loss over all weights of M is scaled down to this L2 norm "
        "when larger, so that after c chunks ||S_c|| <= c * max_grad_norm and ||W_c|| <= ||W_0|| + c (c + 1) / 2 "
        "* max_grad_norm (momentum and forgetting <= 1). Without it the mlp memory diverges at d_mem 256 (the chunk loss's curvature grows with "
        "the weights past the 2 (1 + momentum) that gradient descent at step 1 tolerates: max |W| 1e14 by chunk "
        "7). The linear memory's curvature is at most 2 theta <= 2 (unit keys), stable without a bound. "
        "0 = unbounded (the paper's update)."))
    input_layer: int = Field(0, ge=0, description=(
        "The memory reads the residual stream after this many backbone blocks: 0 = the token embeddings, "
        "n_layers = the attention path's output (must be <= model.n_layers)."))

    @model_validator(mode="after")
    def check_rank(self) -> "MemorySpec":
        if self.factorized and self.rank > self.d_mem and self.variant == "linear":
            raise ValueError(f"rank ({self.rank}) must be <= d_mem ({self.d_mem}) when factorized = true")
        return self

    @model_validator(mode="after")
    def check_gates(self) -> "MemorySpec":
        if self.gates == "data_dependent" and not (0 < self.momentum < 1 and self.decay < 1):
            raise ValueError(f"gates = \"data_dependent\" starts at sigmoid(b) = momentum, decay: both must lie in "
                             f"(0, 1) (momentum = {self.momentum}, decay = {self.decay})")
        return self


class GateSpec(Section):
    hidden: PositiveInt = Field(description="Hidden width of the MAG gate MLP over [y; m].")
    entropy_reg: float = Field(ge=0, description="Weight of the gate-entropy regulariser (-entropy_reg * H(g)).")


class TRMSpec(Section):
    enabled: bool = Field(True, description="TRM recursion on top of the backbone; false decodes the backbone "
                                            "output directly (one step, the baseline).")
    t_max: PositiveInt = Field(description="Outer (deep-supervision) steps.")
    micro_steps: PositiveInt = Field(description="Latent refinements z <- f(x, y, z) per outer step.")
    detach_between_steps: bool = Field(description="Detach (y, z) between outer steps (gradient flows within a step "
                                                    "only).")
    step_weights: list[float] = Field(min_length=1, description="Weight of each outer step's cross-entropy loss; "
                                                                "one per step (length t_max).")
    stateless_mode: bool = Field(True, description="Memory and recursion state start fresh for every sequence: "
                                                   "identical inputs give identical outputs. Must be true: state "
                                                   "carried across batches is not supported.")
    n_layers: PositiveInt = Field(2, description="Blocks in the shared refinement network f.")
    ffn_hidden: PositiveInt = Field(description="SwiGLU hidden width of the refinement network's blocks.")
    grad_cycles: Literal["all", "last"] = Field("all", description=(
        "Which latent refinements of an outer step back-propagate. all: every one. last: the first "
        "micro_steps - 1 latent refinements z <- f(x + y + z) run under no_grad, the last one and the answer "
        "update y <- f(y + z) with gradient (the TRM reference runs all but its last cycle without gradient): "
        "the backward pass and its activations cover 2 of the micro_steps + 1 applications of f. The forward "
        "values are the same as with all."))
    learned_init: bool = Field(False, description=(
        "Initial states of the recursion. false: y_0 = x (the backbone output), z_0 = 0. true: y_0 and z_0 are "
        "two learned d_model vectors (1-D parameters trm.y_init, trm.z_init, initialised N(0, 1)), the same for "
        "every token and sequence; x then enters only through the latent refinement z <- f(x + y + z), as in "
        "the TRM reference. The reference's H_init / L_init are such vectors but fixed (std-1 buffers); here "
        "they learn."))

    @model_validator(mode="after")
    def check_learned_init(self) -> "TRMSpec":
        if self.learned_init and self.grad_cycles == "last" and self.micro_steps > 1:
            raise ValueError("learned_init = true with grad_cycles = \"last\" and micro_steps > 1: z_0 enters only "
                             "the first latent refinement, which then runs without gradient, so trm.z_init would "
                             "never learn; use grad_cycles = \"all\" or micro_steps = 1")
        return self

    @model_validator(mode="after")
    def check_step_weights(self) -> "TRMSpec":
        if len(self.step_weights) != self.t_max:
            raise ValueError(f"step_weights has {len(self.step_weights)} entries but t_max = {self.t_max}; "
                             f"give one weight per outer step")
        if any(w < 0 for w in self.step_weights) or not any(w > 0 for w in self.step_weights):
            raise ValueError("step_weights must be >= 0 with at least one > 0")
        return self

    @model_validator(mode="after")
    def check_stateless(self) -> "TRMSpec":
        if not self.stateless_mode:
            raise ValueError("stateless_mode = false (memory state carried from one batch to the next) is not "
                             "supported: carried state makes identical inputs give different outputs and leaks "
                             "across sequences (lessons.md); set stateless_mode = true")
        return self


class ACTSpec(Section):
    halt_thresh: float = Field(ge=0, le=1, description="At evaluation a token uses the first outer step whose halt "
                                                       "probability exceeds this.")
    ema_teacher: float = Field(ge=0, lt=1, description="EMA factor of the per-step token accuracy (act/ema_acc_stepN).")
    warmup_steps: int = Field(ge=0, description="ACT loss weight is 0 before this optimizer step.")
    loss_weight: float = Field(ge=0, description="Weight of the halting BCE loss after warmup.")
    head_input: Literal["latent", "answer"] = Field("latent", description=(
        "The state the halting head reads after each outer step: latent = z_t; answer = y_t, the state the "
        "step's logits are decoded from (the TRM reference's Q head reads its answer state z_H)."))
    ema_gain_tol: Optional[float] = Field(None, ge=0, description=(
        "EMA calibration of the halting target. Unset: the target of step t is \"step t's argmax equals the "
        "label\". A number tol: the target is \"step t is correct AND max over later steps s of ema_acc[s] - "
        "ema_acc[t] < tol\" (ema_acc: the per-step token-accuracy EMA, act/ema_acc_stepN), so tokens learn to "
        "halt at step t only while the later steps add less than tol accuracy on average. The last step "
        "keeps \"correct\"."))
    freeze_halted: bool = Field(False, description=(
        "Evaluation (forward with halt=True, no gradient): a token's state is frozen once it halts and the "
        "later outer steps run the refiner (queries, attention, feed-forward) only for running tokens; "
        "running tokens attend to a halted token's keys/values of its halting step (same refiner application "
        "and layer). Saves refiner work in proportion to the share halted (act/compute_share); running tokens' "
        "outputs then differ from the full computation, where halted tokens keep being refined. false: every "
        "token is refined at every outer step that runs (steps stop only once all tokens halted)."))


class ModelSpec(Section):
    vocab_size: PositiveInt = Field(description="Tokenizer and embedding size (the LM head is tied to the embedding).")
    d_model: PositiveInt = Field(description="Residual stream width.")
    n_layers: PositiveInt = Field(description="Backbone blocks.")
    n_heads: PositiveInt = Field(description="Attention heads (d_model must divide evenly).")
    ffn_hidden: PositiveInt = Field(description="SwiGLU hidden width of the backbone blocks.")
    norm_eps: PositiveFloat = Field(1e-5, description="RMSNorm epsilon.")
    init_std: PositiveFloat = Field(0.02, description="Std of the normal init of weight matrices and the embedding.")
    attention: AttentionSpec
    memory: MemorySpec
    gate: GateSpec
    trm: TRMSpec
    act: ACTSpec

    @model_validator(mode="after")
    def check_heads(self) -> "ModelSpec":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model / n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        return self

    @model_validator(mode="after")
    def check_memory_input(self) -> "ModelSpec":
        if self.memory.input_layer > self.n_layers:
            raise ValueError(f"memory.input_layer ({self.memory.input_layer}) must be <= n_layers ({self.n_layers})")
        return self
