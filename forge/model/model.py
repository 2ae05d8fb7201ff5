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

from forge.distributed import all_reduce_sum, gather_rows, world_size
from forge.model.act import halting_loss
from forge.model.attention import attention_modules
from forge.model.backbone import Block
from forge.model.gate import MAGGate
from forge.model.loss import linear_cross_entropy
from forge.model.memory import NeuralMemory
from forge.model.norm import RMSNorm
from forge.model.objective import coherence_loss, diversity_penalty, mean_pairwise_cosine
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
        # the TRM's step weights; without TRM the single decode has weight 1
        self.step_weights = list(spec.trm.step_weights) if spec.trm.enabled else [1.0]
        self.log_attention_stats = False
        self.checkpoint_blocks = False       # gradient checkpointing of the backbone blocks (OOM mitigation)
        # set by the trainer under DDP: training forwards then define token counts, the batch-level terms and
        # the ACT accuracy EMA on the global batch (collectives: every rank must run the same forwards)
        self.data_parallel = False
        self._attention = attention_modules(self)
        for p in self.parameters():          # every matrix (and the embedding) ~ N(0, init_std)
            if p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=spec.init_std)

    @property
    def _global_batch(self) -> bool:
        """Training under DDP: counts and batch-level terms span every rank (collectives in the forward)."""
        return self.data_parallel and self.training

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
        h0 = self.tok_emb(idx)
        y = h0
        for block in self.blocks:
            y = run_checkpointed(block, y, rope) if self.checkpoint_blocks else block(y, rope)
        if not self.spec.memory.enabled:
            return self.backbone_norm(y), {}, None
        m, metrics = self.memory(h0)             # the memory reads the input, in parallel with attention
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
        and act/halted_early_share = share of tokens halting before the last step."""
        B, T = idx.shape
        attn_entropy_reg = targets is not None and self.objective.attention_entropy > 0
        for attn in self._attention:
            attn.stats, attn.entropies = None, []      # max_logit accumulates until QK-clip consumes it
            attn.collect_stats, attn.entropy_grad = self.log_attention_stats, attn_entropy_reg
        rope = self.rope(T, idx.device)
        x, metrics, gate_entropy = self.encode(idx, rope)
        dp = self._global_batch
        metrics["embedding_diversity"] = 1 - mean_pairwise_cosine(x.detach().flatten(0, 1),
                                                                  all_reduce_sum if dp else None)

        last, keep_logits = self.n_steps - 1, return_logits or targets is None
        if targets is not None:
            valid = targets != IGNORE_INDEX
            # Under DDP: the global count / W, so that DDP's average of the ranks' gradients is the gradient of
            # the global mean (ranks may hold different numbers of valid targets)
            n_valid = (all_reduce_sum(valid.sum()) / world_size() if dp else valid.sum()).clamp_min(1)
        halted = torch.zeros(B, T, dtype=torch.bool, device=idx.device)
        used_step = torch.full((B, T), last, dtype=torch.long, device=idx.device)
        frozen = FrozenTokens(B, T, idx.device) if self._freezes_halted(halt) else None
        out_logits = out_ce = None
        weighted_ce, ce_per_step, accuracy, act_terms = [], [], [], []
        for t, (y, z) in enumerate(self.outer_steps(x, rope, frozen)):
            # logits where they are returned: without targets the last step's (with halting every step's). On CPU
            # a loss whose logits are not returned comes from the fused, chunked head (forge.model.loss: no
            # vocabulary-wide tensor kept for the backward; 0.95x the phase1 step). On an H100 it costs 1.55x the
            # step for -2.7 GB, worse than gradient checkpointing (BENCHMARKS.md), so CUDA keeps the plain head.
            returned = (keep_logits or targets is None) and (halt or t == last)
            fused = targets is not None and not returned and y.device.type in FUSED_CE_DEVICES
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
                ce = ce_sum / n_valid
                weighted_ce.append(self.step_weights[t] * ce)
                ce_per_step.append(ce.detach())
                correct = (predicted == targets) & valid
                accuracy.append(correct.sum() / n_valid)
                if z is not None:
                    act_terms.append(halting_loss(halt_logits, self.trm.act.target(correct, t), valid, n_valid))
                out_ce = ce_tokens.detach() if out_ce is None else torch.where(take, ce_tokens.detach(), out_ce)
            if keep_logits and (halt or t == last):
                out_logits = logits if out_logits is None else torch.where(take[..., None], logits, out_logits)
            del logits                           # only the chosen logits stay alive (autograd keeps its own)
            if halt and bool(halted.all()):
                break

        if self.trm is not None:
            metrics["act/avg_steps"] = (used_step + 1).float().mean()
            if halt:                         # the work the halting rule saved in the refiner (C1)
                per_step = (1 + self.trm.micro_steps) * B * T
                applied = frozen.applied if frozen is not None else (t + 1) * per_step   # t: the last step run
                metrics["act/compute_share"] = torch.tensor(applied / (self.n_steps * per_step))
                metrics["act/halted_early_share"] = (used_step < last).float().mean()
            for t in range(self.n_steps):    # the halting histogram (C1): share of tokens that stop at step t
                metrics[f"act/halt_share_step{t}"] = (used_step == t).float().mean()
            if self.training and len(accuracy) == self.n_steps:   # the EMA of the global batch's accuracy
                step_accuracy = torch.stack(accuracy)
                self.trm.act.update_ema(all_reduce_sum(step_accuracy) / world_size() if dp else step_accuracy)
            for t in range(self.n_steps):
                metrics[f"act/ema_acc_step{t}"] = self.trm.act.ema_acc[t].detach().clone()
        metrics.update(self._attention_metrics())
        loss = None
        if targets is not None:
            loss = self._composite_loss(x, weighted_ce, gate_entropy, act_terms, act_loss_weight, metrics)
            metrics["loss/ce"] = out_ce.sum() / n_valid
            for t, (ce, acc) in enumerate(zip(ce_per_step, accuracy)):
                metrics[f"loss/step_{t}"], metrics[f"accuracy/step_{t}"] = ce, acc
        used_steps = (used_step + 1) if self.trm is not None else torch.ones_like(used_step)
        return ModelOutput(loss, ce_per_step, out_logits if keep_logits else None, metrics, used_steps)

    def _composite_loss(self, x, weighted_ce, gate_entropy, act_terms, act_loss_weight, metrics) -> torch.Tensor:
        """next_token * sum_t w_t CE_t + coherence + diversity - entropy_reg * H(gate) + act_loss_weight * BCE
        - attention_entropy * H(attention); each term also logged."""
        obj = self.objective
        gather = gather_rows if self._global_batch else None   # batch-level: the global batch
        coherence = coherence_loss(x, obj.coherence_temperature, gather)
        diversity = diversity_penalty(x, gather)
        loss = obj.next_token * sum(weighted_ce) + obj.sequence_coherence * coherence + obj.diversity * diversity
        metrics["loss/coherence"], metrics["loss/diversity"] = coherence.detach(), diversity.detach()
        if gate_entropy is not None:
            loss = loss - self.spec.gate.entropy_reg * gate_entropy
        if act_terms:   # added even at weight 0 (warmup): every parameter then has a gradient, as DDP wants
            act_loss = torch.stack(act_terms).mean()
            metrics["loss/act"] = act_loss.detach()
            loss = loss + act_loss_weight * act_loss
        if obj.attention_entropy > 0:
            attn_entropy = torch.stack([e for a in self._attention for e in a.entropies]).mean()
            metrics["loss/attn_entropy"] = attn_entropy.detach()
            loss = loss - obj.attention_entropy * attn_entropy
        metrics["loss/total"] = loss.detach()
        return loss

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
