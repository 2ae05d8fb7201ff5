"""CognateModel: the Phase 1 model, built only from the [model] and [objective] spec sections.

    tokens -> embedding h0 -+-> n_layers attention blocks -> y --+
                            +-> long-term memory (LMM) ---> m --+-> MAG gate -> x
    x -> TRM outer steps t = 0..t_max-1 -> y_t -> logits_t = lm_head(norm(y_t))   (deep supervision)
                                        -> z_t (act.head_input) -> halting logit (ACT)

See docs/architecture.md for the whole picture and forge/model/*.py for each part.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from forge.model.act import halting_loss
from forge.model.attention import attention_modules
from forge.model.backbone import Block
from forge.model.gate import MAGGate
from forge.model.loss import linear_cross_entropy
from forge.model.memory import NeuralMemory
from forge.model.norm import RMSNorm
from forge.model.objective import LossTerms, composite_loss, embedding_diversity, step_weights
from forge.model.rope import RopeTables, rope_tables
from forge.model.trm import TRM, FrozenTokens, run_checkpointed
from forge.model.window import AttentionPattern
from forge.spec.model import ModelSpec
from forge.spec.objective import ObjectiveSpec

IGNORE_INDEX = -100   # target value of positions that carry no loss (padding)
# where the deep-supervision loss uses the fused, chunked head (forge.model.loss); the GPU A/B is
# benchmarks/bench_memory_levers.py
FUSED_CE_DEVICES = ("cpu",)


@dataclass
class ModelOutput:
    loss: Optional[torch.Tensor]          # composite training loss; None without targets
    ce_per_step: list[torch.Tensor]       # detached CE of each outer step that ran
    logits: Optional[torch.Tensor]        # (B, T, V) final (or, with halt, per-token chosen) logits
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)   # detached scalars
    used_steps: Optional[torch.Tensor] = None   # (B, T) outer steps each token uses under the halting rule
    terms: Optional[LossTerms] = None     # the loss's terms on this batch (forge.train.objective); None without targets


class CognateModel(nn.Module):
    """Titans-MAG backbone + TRM recursion + ACT halting. Set `log_attention_stats = True` on logging steps
    to get attn/entropy and attn/sink_count (an extra dense score matrix of one sequence per attention
    call); set `track_max_logit` on the modules of `forge.model.attention_modules(model)` for QK-clip."""

    def __init__(self, spec: ModelSpec, objective: ObjectiveSpec):
        super().__init__()
        self.spec, self.objective = spec, objective
        att, d = spec.attention, spec.d_model
        pattern = AttentionPattern(att.type, att.sw_window, att.global_every, att.global_tokens)
        self.tok_emb = nn.Embedding(spec.vocab_size, d)      # also the LM head (tied)
        self.blocks = nn.ModuleList(Block(d, spec.n_heads, spec.ffn_hidden, pattern, spec.norm_eps)
                                    for _ in range(spec.n_layers))
        if spec.memory.enabled:
            self.memory = NeuralMemory(d, spec.memory, spec.norm_eps)
            self.gate = MAGGate(d, spec.gate.hidden, spec.norm_eps)
        else:
            self.backbone_norm = RMSNorm(d, spec.norm_eps)
        self.trm = TRM(d, spec.n_heads, spec.trm, spec.act, pattern, spec.norm_eps) if spec.trm.enabled else None
        self.head_norm = RMSNorm(d, spec.norm_eps)
        self.n_steps = spec.trm.t_max if spec.trm.enabled else 1
        self.step_weights = step_weights(spec)
        self.log_attention_stats = False
        self.checkpoint_blocks = False       # gradient checkpointing of the backbone blocks (OOM mitigation)
        self.head_device_type: Optional[str] = None   # the loss head of this device type (None: the tensors'),
                                             # for the memory estimate on the meta device (forge.train.memory_estimate)
        self._attention = attention_modules(self)
        for p in self.parameters():          # every matrix (and the embedding) ~ N(0, init_std)
            if p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=spec.init_std)
        if spec.memory.enabled:
            self.memory.reset_memory_init()  # the MLP memory's own init (forge/model/memory.py)

    def set_gradient_checkpointing(self, mode: str) -> None:
        """train.gradient_checkpointing: "off", "backbone" (blocks) or "backbone_and_trm" (also every refiner
        application). Activations inside are recomputed in the backward pass: same loss and gradients."""
        self.checkpoint_blocks = mode in ("backbone", "backbone_and_trm")
        if self.trm is not None:
            self.trm.checkpoint_refiner = mode == "backbone_and_trm"

    # ------------------------------------------------------------------------------------------ parts
    def rope(self, seq_len: int, device) -> RopeTables:
        return rope_tables(seq_len, self.spec.d_model // self.spec.n_heads, self.spec.attention.rope_theta, device)

    def encode(self, idx: torch.Tensor, rope: RopeTables):
        """Backbone: tokens (B, T) -> x (B, T, d), its metrics, and the gate entropy (None without memory)."""
        y = memory_input = self.tok_emb(idx)
        for i, block in enumerate(self.blocks, 1):
            y = run_checkpointed(block, y, rope) if self.checkpoint_blocks else block(y, rope)
            memory_input = y if i == self.spec.memory.input_layer else memory_input
        if not self.spec.memory.enabled:
            return self.backbone_norm(y), {}, None
        m, metrics = self.memory(memory_input)   # after memory.input_layer blocks, in parallel with attention
        x, g, gate_entropy = self.gate(y, m)
        usage = g.detach().mean()
        metrics.update({"gate/entropy": gate_entropy.detach(), "gate/y_usage": usage, "gate/m_usage": 1 - usage})
        return x, metrics, gate_entropy

    def outer_steps(self, x: torch.Tensor, rope: RopeTables,
                    frozen: Optional[FrozenTokens] = None) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(y_t, z_t) per outer step; without TRM one step (x, None)."""
        if self.trm is None:
            yield x, None
        else:
            yield from self.trm.steps(x, rope, frozen)

    def _freezes_halted(self, halt: bool) -> bool:
        """act.freeze_halted applies to halting evaluation without gradient, and not while an attention module
        records scores over every pair (QK-clip's max logit, stats, captures, the entropy regulariser)."""
        observed = any(a.track_max_logit or a.collect_stats or a.capture or a.entropy_grad for a in self._attention)
        return (halt and self.trm is not None and self.spec.act.freeze_halted and not torch.is_grad_enabled()
                and not observed)

    def lm_head(self, y: torch.Tensor) -> torch.Tensor:
        return F.linear(self.head_norm(y), self.tok_emb.weight)

    def step_logits(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every outer step (analysis and tests; keeps t_max full-vocabulary tensors alive)."""
        rope = self.rope(idx.shape[1], idx.device)
        x = self.encode(idx, rope)[0]
        return [self.lm_head(y) for y, _ in self.outer_steps(x, rope)]

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *, act_loss_weight: float = 0.0,
                halt: bool = False, return_logits: bool = False) -> ModelOutput:
        """idx, targets (B, T) long (targets may hold IGNORE_INDEX). halt=True (evaluation): each token uses
        the first outer step whose halting probability exceeds act.halt_thresh (else the last), and the
        remaining steps are skipped once every token has halted; with act.freeze_halted (and no gradient) a
        halted token's state is frozen and later steps refine only the running tokens (forge/model/trm.py).
        Under halting, act/compute_share = refiner token-applications run / t_max * (1 + micro_steps) * B * T
        and act/halted_early_share = share of tokens halting before the last step. Everything is computed on
        this batch alone: the loss is the composite objective of these rows (forge.train.objective defines a
        training step's loss on the global batch under data parallelism, and updates the ACT accuracy EMA)."""
        B, T = idx.shape
        attn_entropy_reg = targets is not None and self.objective.attention_entropy > 0
        for attn in self._attention:
            attn.stats, attn.entropies = None, []      # max_logit accumulates until QK-clip consumes it
            attn.collect_stats, attn.entropy_grad = self.log_attention_stats, attn_entropy_reg
        rope = self.rope(T, idx.device)
        x, metrics, gate_entropy = self.encode(idx, rope)
        metrics["embedding_diversity"] = embedding_diversity(x)

        last, keep_logits = self.n_steps - 1, return_logits or targets is None
        if targets is not None:
            valid = targets != IGNORE_INDEX
        halted = torch.zeros(B, T, dtype=torch.bool, device=idx.device)
        used_step = torch.full((B, T), last, dtype=torch.long, device=idx.device)
        frozen = FrozenTokens(B, T, idx.device) if self._freezes_halted(halt) else None
        out_logits = out_ce = None
        ce_sums, correct_counts, act_sums = [], [], []
        for t, (y, z) in enumerate(self.outer_steps(x, rope, frozen)):
            # logits where they are returned: without targets the last step's (with halting every step's). On CPU
            # a loss whose logits are not returned comes from the fused, chunked head (forge.model.loss: no
            # vocabulary-wide tensor kept for the backward; 0.95x the phase1 step). On an H100 it costs 1.55x the
            # step for -2.7 GB, worse than gradient checkpointing (BENCHMARKS.md), so CUDA keeps the plain head.
            returned = (keep_logits or targets is None) and (halt or t == last)
            fused = targets is not None and not returned and (self.head_device_type or y.device.type) in FUSED_CE_DEVICES
            logits = self.lm_head(y) if returned or (targets is not None and not fused) else None
            if z is None:
                stop = torch.ones_like(halted)
            else:
                halt_logits = self.trm.act(y if self.spec.act.head_input == "answer" else z)
                halt_prob = torch.sigmoid(halt_logits.detach())
                metrics[f"act/halt_prob_step{t}"] = halt_prob.mean()
                stop = (halt_prob > self.spec.act.halt_thresh) | (t == last)
            newly = stop & ~halted
            used_step = torch.where(newly, t, used_step)
            halted = halted | newly
            if frozen is not None:
                frozen.running = ~halted          # a new tensor: the next step gathers its running rows
            take = newly if halt else torch.full_like(halted, t == last)   # whose output this step provides
            if targets is not None:
                if fused:
                    ce_sum, ce_flat, predicted = linear_cross_entropy(self.head_norm(y).flatten(0, 1),
                                                                      self.tok_emb.weight, targets.flatten(),
                                                                      IGNORE_INDEX)
                    ce_tokens, predicted = ce_flat.view(B, T), predicted.view(B, T)
                else:                            # the logits exist anyway: the loss from them
                    ce_tokens = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                                reduction="none").view(B, T)
                    ce_sum, predicted = ce_tokens.sum(), logits.detach().argmax(-1)
                ce_sums.append(ce_sum)
                correct = (predicted == targets) & valid
                correct_counts.append(correct.sum())
                if z is not None:                # a sum over the valid tokens (count 1): the objective divides
                    act_sums.append(halting_loss(halt_logits, self.trm.act.target(correct, t), valid, 1))
                out_ce = ce_tokens.detach() if out_ce is None else torch.where(take, ce_tokens.detach(), out_ce)
            if keep_logits and (halt or t == last):
                out_logits = logits if out_logits is None else torch.where(take[..., None], logits, out_logits)
            del logits                           # only the chosen logits stay alive (autograd keeps its own)
            if halt and bool(halted.all()):
                break
        steps_run = t + 1

        if self.trm is not None:
            metrics["act/avg_steps"] = (used_step + 1).float().mean()
            if halt:                         # the work the halting rule saved in the refiner (C1)
                per_step = (1 + self.trm.micro_steps) * B * T
                applied = frozen.applied if frozen is not None else steps_run * per_step
                metrics["act/compute_share"] = torch.tensor(applied / (self.n_steps * per_step))
                metrics["act/halted_early_share"] = (used_step < last).float().mean()
            for t in range(self.n_steps):    # the halting histogram (C1): share of tokens that stop at step t
                metrics[f"act/halt_share_step{t}"] = (used_step == t).float().mean()
            for t in range(self.n_steps):
                metrics[f"act/ema_acc_step{t}"] = self.trm.act.ema_acc[t].detach().clone()
        metrics.update(self._attention_metrics())
        loss = terms = None
        if targets is not None:
            attn_entropy = (torch.stack([e for a in self._attention for e in a.entropies]).mean()
                            if self.objective.attention_entropy > 0 else None)
            terms = LossTerms(x, valid.sum(), ce_sums, correct_counts, act_sums, out_ce.sum(), gate_entropy,
                              attn_entropy)
            loss, loss_metrics = composite_loss(terms, self.spec, self.objective, act_loss_weight)
            metrics.update(loss_metrics)
        ce_per_step = [metrics[f"loss/step_{t}"] for t in range(len(ce_sums))]
        used_steps = (used_step + 1) if self.trm is not None else torch.ones_like(used_step)
        return ModelOutput(loss, ce_per_step, out_logits if keep_logits else None, metrics, used_steps, terms)

    def _attention_metrics(self) -> dict[str, torch.Tensor]:
        out = {}
        stats = [a.stats for a in self._attention if a.stats is not None]
        if stats:
            out["attn/entropy"] = torch.stack([s["entropy"] for s in stats]).mean()
            out["attn/sink_count"] = torch.stack([s["sink_heads"] for s in stats]).sum()
            out["attn/rope_norm"] = torch.stack([s["rope_norm"] for s in stats]).mean()
        tracked = [a.max_logit for a in self._attention if a.max_logit is not None]
        if tracked:
            out["attn/logit_max"] = torch.stack([m.max() for m in tracked]).max()
        return out
