"""The training loop: step, log, evaluate, checkpoint, watch, stop cleanly.

One optimizer step:
    for each of grad_accum micro-batches: forward (deep supervision + composite objective; ACT loss
        weight 0 before act.warmup_steps) -> the loss on the step's batch and the ACT accuracy EMA
        (forge.train.objective: the global batch under DDP) -> backward of loss / grad_accum
    optimizer.step(): non-finite check -> Grokfast -> clip -> Muon/AdamW -> finite-weights check (forge.optim)
    parts.qk_clip.after_step(applied) -> heads clipped (forge.optim.QKClip)   (after the update)
    schedule.step(): the lr of the next step
A step whose loss, gradient, filtered gradient or updated weights are not finite is undone whole by the
optimizer (counted: optim/nonfinite_count = the optimizer's skipped steps); max_nonfinite_in_a_row of them
stop the run as failed. So the weights stay finite and so does every checkpoint. SIGINT/SIGTERM finish the current step, write a checkpoint and mark
the run interrupted.

Under torchrun (forge.distributed) the model is wrapped in DDP: each rank trains on its slice of every
global micro-batch, no_sync() on all but the last micro-step, and DDP averages the gradients before the
optimizer step (so Grokfast, clipping, Muon and QK-clip see the same gradient on every rank and keep the
replicas identical: checked at every checkpoint). Rank 0 alone evaluates, logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import resource
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch

from forge import distributed
from forge.distributed import SINGLE, World
from forge.errors import ForgeError
from forge.probes.suite import ProbeSuite, observing
from forge.spec.load import ResolvedSpec
from forge.train import checkpoint as ckpt
from forge.train.components import Components, rng_state, set_rng_state
from forge.train.evaluate import evaluate, merge_preview
from forge.train.live import LiveView
from forge.train.metrics_log import MetricsLog, NullMetricsLog
from forge.train.objective import step_batch, training_loss
from forge.train.monitors import MonitorSet
from forge.train.precision import resolve_precision
from forge.train.run_dir import RunDir


@dataclass
class Counters:
    step: int = 0                 # optimizer steps completed (applied or skipped)
    tokens: int = 0               # training tokens consumed
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    qk_clip_total: int = 0


def restore(parts: Components, path) -> tuple[Counters, dict]:
    """Load checkpoint `path` into the model, optimizer, schedule, data loader and RNG; its counters and the
    state of the trainer's loss window.
    CheckpointError (a ForgeError) if it does not load or does not fit this run's components."""
    state, _ = ckpt.load_checkpoint(path, parts.model)
    try:
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.schedule.load_state_dict(state["schedule"])
        parts.loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        return Counters(**state["counters"]), state.get("loss_window", {})
    except ForgeError as err:
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit this run: {err}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ckpt.CheckpointError(f"checkpoint {path} holds an unusable state.pt: {type(err).__name__}: "
                                   f"{err}") from None


LOSS_PREFIX = "loss/"


class LossWindow:
    """The losses of the steps since the last logging step. A logging step logs each loss as the mean over
    its window's finite values (a skipped non-finite step is counted by optim/nonfinite_count instead; an
    all-non-finite window logs null) and the logging step's own value as `<name>_last`: curves without the
    noise of one sampled step, and the raw value still there. Sums stay on the device (no sync per step)
    and travel in checkpoints, so a resumed run logs the same means."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            finite = torch.isfinite(v)
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(finite, v, 0.0)
            self.counts[k] = self.counts.get(k, 0) + finite.float()

    def pop(self, last: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Window means under the losses' names and `last`'s values under `<name>_last`; starts a new window."""
        out = {f"{k}_last": last[k] for k in self.sums if k in last}
        out.update({k: torch.where(self.counts[k] > 0, self.sums[k] / self.counts[k].clamp(min=1), float("nan"))
                    for k in self.sums})
        self.sums, self.counts = {}, {}
        return out

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"sums": dict(self.sums), "counts": {k: torch.as_tensor(v) for k, v in self.counts.items()}}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state.get("sums", {}).items()}
        self.counts = {k: v.to(device) for k, v in state.get("counts", {}).items()}


class Trainer:
    def __init__(self, resolved: ResolvedSpec, run: RunDir, parts: Components, live: LiveView,
                 log: MetricsLog | None, monitors: MonitorSet, world: World = SINGLE, healer=None):
        """`log` is None (or a NullMetricsLog) on ranks other than 0: they write nothing. `healer`: the run's
        forge.train.heal.Healer ([train.heal]; default none), consulted at every logged record."""
        from forge.train.heal import NullHealer

        self.resolved, self.spec = resolved, resolved.spec
        self.spec_hash = resolved.hash
        self.run, self.parts, self.live, self.monitors = run, parts, live, monitors
        self.log = log or NullMetricsLog()
        self.world = world
        self.forward_model = parts.model      # what the training forward calls: the model, or its DDP wrapper
        self.batch = step_batch(world)        # the batch a step's loss is defined on (forge.train.objective)
        if world.distributed:
            distributed.check_batch_split(self.spec.data.batch_size, self.spec.data.grad_accum, world.size)
            self.forward_model = self._wrap_ddp(parts.model)
        self.counters = Counters()
        self.loss_window = LossWindow()
        self.stop_reason: str | None = None
        self.healer = healer or NullHealer()
        self.finding = None               # a healable finding that fired: run_until returns "heal"
        # "logged"/"plain": summed time and count of steps with and without metric collection (F1)
        self._timing = {"train": 0.0, "data": 0.0, "logging": 0.0, "checkpoint": 0.0, "window_tokens": 0,
                        "window_time": 0.0, "logged": [0.0, 0], "plain": [0.0, 0]}
        self._flops_by_seq_len: dict[int, float] = {}
        # train.precision resolved on the device (forge.train.precision): what _autocast and perf/mfu use
        self.precision = parts.precision or resolve_precision(self.spec.train.precision, parts.device)
        parts.model.set_gradient_checkpointing(self.spec.train.gradient_checkpointing)
        self._writer = ckpt.BackgroundWriter() if self.spec.checkpoint.async_save else None
        self.probes = (ProbeSuite(self.spec.probes, self.spec.model.attention.sw_window, parts.data, self.spec.run.seed)
                       if self.spec.probes.enabled else None)

    def _wrap_ddp(self, model):
        from torch.nn.parallel import DistributedDataParallel

        # every parameter gets a gradient every step (the ACT term is added even at weight 0), and the graph
        # changes with logging steps and checkpointing: no unused-parameter search, no static graph. Buffers
        # (the ACT accuracy EMA) are updated identically on every rank from all-reduced inputs, so DDP must
        # not overwrite them with rank 0's (the flag's name changed in torch 2.13).
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in DistributedDataParallel.__init__.__code__.co_varnames
                else "broadcast_buffers")
        ids = [self.parts.device.index] if self.parts.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False, **{sync: False})

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"counters": vars(self.counters).copy(), "optimizer": self.parts.optimizer.state_dict(),
                "schedule": self.parts.schedule.state_dict(), "data": self.parts.loader.state_dict(),
                "rng": rng_state(), "loss_window": self.loss_window.state_dict()}

    def save(self) -> None:
        """Write a checkpoint (and prune old ones); with checkpoint.async_save in a background thread, from a
        CPU snapshot taken now, while training goes on. Under DDP every rank calls this: the replicas are
        compared first (a collective), then rank 0 writes."""
        step, t0 = self.counters.step, time.perf_counter()
        if self.world.distributed and not distributed.replicas_identical(self.parts.model, self.parts.device):
            raise RuntimeError(f"the {self.world.size} replicas of the model differ at step {step}: a rank-local "
                               "update broke data parallelism (this is a bug in forge; please report it)")
        if not self.world.main:
            return
        meta = {"run_id": self.run.run_id, "spec_hash": self.spec_hash}

        def write(weights, state):
            path = ckpt.save_checkpoint(self.run.checkpoints, step, weights, state, meta)
            self.log.checkpoint(step, path)    # a W&B artifact when the spec asks
            ckpt.prune(self.run.checkpoints, self.keep_checkpoints)

        if self._writer is None:
            write(self.parts.model, self.state_dict())
        else:
            self._writer.submit(write, *ckpt.snapshot(self.parts.model, self.state_dict()))
        self.run.set_status("running", step=step)  # forge runs shows progress between checkpoints
        self._timing["checkpoint"] += time.perf_counter() - t0   # training blocked (F2: perf/checkpoint_fraction)
        self.live.checkpoint(step, self.run.checkpoints / ckpt.step_dir_name(step), background=self._writer is not None)

    @property
    def keep_checkpoints(self) -> int:
        """checkpoint.keep_last_n; with [train.heal] on, at least heal.keep_checkpoints (a rollback target)."""
        heal = self.spec.train.heal
        return max(self.spec.checkpoint.keep_last_n, heal.keep_checkpoints if heal.enabled else 0)

    def wait_for_checkpoint(self) -> None:
        """Block until a background checkpoint write is on disk (raises its error, if any)."""
        if self._writer is not None:
            self._writer.wait()

    def restore(self, path) -> None:
        self.counters, window = restore(self.parts, path)
        self.loss_window.load_state_dict(window, self.parts.device)

    # ------------------------------------------------------------------------------ one step
    def act_loss_weight(self, step: int) -> float:
        act = self.spec.model.act
        return act.loss_weight if step >= act.warmup_steps else 0.0

    def train_step(self, collect: bool) -> dict[str, Any]:
        model, opt = self.parts.model, self.parts.optimizer
        step = self.counters.step
        t0 = time.perf_counter()
        batch = self.parts.loader.batches   # the loader position of this step's global batch (heal: bad batches)
        micro_batches = [(distributed.rank_slice(i, self.world), distributed.rank_slice(t, self.world))
                         for i, t in self.parts.loader.micro_batches(step)]
        t_data = time.perf_counter() - t0
        model.train()
        model.log_attention_stats = collect   # attn/entropy, attn/sink_count: logging steps only (F1)
        if model.trm is not None:
            model.trm.track_state_grads = collect  # grad/norm_y, grad/norm_z
        sums: dict[str, torch.Tensor] = {}
        n_tokens = 0
        with self._autocast():
            for i, (idx, targets) in enumerate(micro_batches):
                idx, targets = idx.to(self.parts.device), targets.to(self.parts.device)
                with self._no_sync(last=i == len(micro_batches) - 1):
                    act_loss_weight = self.act_loss_weight(step)
                    out = self.forward_model(idx, targets, act_loss_weight=act_loss_weight)
                    loss = training_loss(model, out, act_loss_weight, self.batch)
                    (loss / len(micro_batches)).backward()
                self.healer.batch_loss(step + 1, batch, i, loss.detach())
                n_tokens += targets.numel() * self.world.size
                for k, v in out.metrics.items():
                    if collect or k.startswith(LOSS_PREFIX):   # losses every step: the logged window mean
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
        state_grads = model.trm.pop_state_grad_norms() if model.trm is not None else {}
        if collect and self.spec.logging.gradients:   # raw gradients, before Grokfast and clipping
            state_grads.update({f"grad/param/{n}": p.grad.norm() for n, p in model.named_parameters()
                                if p.grad is not None})
        finite = opt.step(collect_metrics=collect)
        clipped = self.parts.qk_clip.after_step(finite)
        opt.zero_grad(set_to_none=True)
        self.parts.schedule.step()
        c = self.counters
        c.step += 1
        c.tokens += n_tokens
        c.qk_clip_total += clipped
        c.nonfinite_total += 0 if finite else 1
        c.nonfinite_in_a_row = 0 if finite else c.nonfinite_in_a_row + 1
        elapsed = time.perf_counter() - t0
        self._timing["train"] += elapsed
        self._timing["data"] += t_data
        self._timing["window_tokens"] += n_tokens
        self._timing["window_time"] += elapsed
        kind = self._timing["logged" if collect else "plain"]
        kind[0] += elapsed
        kind[1] += 1
        metrics = {k: v / len(micro_batches) for k, v in sums.items()}
        self.loss_window.add({k: v for k, v in metrics.items() if k.startswith(LOSS_PREFIX)})
        if not collect:
            return {}
        if self.spec.logging.histograms:
            self.log.histograms(c.step, dict(model.named_parameters()))
        metrics.update(self.loss_window.pop(metrics))
        metrics.update(state_grads)
        if self.world.distributed:   # model statistics are per rank (optimizer metrics are equal on every rank)
            metrics = distributed.reduce_metrics(metrics, self.parts.device)
        metrics.update(opt.metrics())
        metrics.update({"optim/qk_clip_heads": clipped, "optim/qk_clip_total": c.qk_clip_total,
                        "optim/qk_clip_fraction": clipped / self.parts.qk_clip.n_heads,
                        "optim/nonfinite_count": c.nonfinite_total,
                        "perf/step_time": elapsed, "perf/data_time": t_data})
        return metrics

    def _no_sync(self, last: bool):
        """DDP averages gradients in the backward of the last micro-step only (the others accumulate locally)."""
        if self.forward_model is self.parts.model or last:
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def _autocast(self):
        # the resolved precision (auto: bf16 only where the device computes it natively; forge.train.precision):
        # bf16 autocasts on CUDA and on CPU alike. The optimizer step runs outside it.
        if self.precision.name == "bf16":
            return torch.autocast(self.parts.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.parts.device.type, enabled=False)

    # ------------------------------------------------------------------------------ logging
    @property
    def train_seconds(self) -> float:
        """Time spent in training steps by this Trainer (no evaluation, logging or checkpoint writing)."""
        return self._timing["train"]

    def perf_metrics(self) -> dict[str, float]:
        t = self._timing
        out = {"perf/tokens_per_sec": t["window_tokens"] / max(t["window_time"], 1e-9),
               "perf/peak_memory_gb": self._peak_memory_gb(),
               "perf/logging_fraction": self._logging_fraction(),
               "perf/data_fraction": t["data"] / max(t["train"], 1e-9),
               "perf/checkpoint_fraction": t["checkpoint"] / max(t["train"] + t["checkpoint"], 1e-9),
               "data/seq_len": float(self.parts.loader.seq_len_at(max(0, self.counters.step - 1))),
               "config/param_count": float(sum(p.numel() for p in self.parts.model.parameters()))}
        # against the measured (cached) matmul peak of the precision that runs, never an emulated bf16 peak
        out["perf/mfu"] = (out["perf/tokens_per_sec"] * self._flops_per_token()
                           / (self.precision.peak_flops * self.world.size))
        t["window_tokens"], t["window_time"] = 0, 0.0
        return out

    def _flops_per_token(self) -> float:
        """Model FLOPs per training token at the current sequence length, counted from the spec (torch's
        FLOP counter misses attention on CPU; forge.model.flops)."""
        from forge.model.flops import model_flops_per_token

        seq_len = self.parts.loader.seq_len_at(max(0, self.counters.step - 1))
        if seq_len not in self._flops_by_seq_len:
            self._flops_by_seq_len[seq_len] = model_flops_per_token(self.spec.model, seq_len)["total"]
        return self._flops_by_seq_len[seq_len]

    def _logging_fraction(self) -> float:
        """Share of training time that logging costs (F1): the extra time of logging steps over plain
        steps (metric collection: attention statistics, optimizer diagnostics, state-gradient hooks),
        plus writing records (JSONL, W&B, monitors, live view), over all training time so far."""
        t = self._timing
        (logged, n_logged), (plain, n_plain) = t["logged"], t["plain"]
        extra = max(0.0, logged - n_logged * plain / n_plain) if n_plain else 0.0
        return (extra + t["logging"]) / max(t["train"], 1e-9)

    def _peak_memory_gb(self) -> float:
        if self.parts.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.parts.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux

    def record(self, metrics: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        values = {k: float(v) for k, v in metrics.items()}
        step = self.counters.step
        self.log.log(step, values)
        for w in self.monitors.observe({"step": step, **values}):
            self.live.warn(f"[{w.id}] {w.title}: {w.measured} (step {w.step})")
            self.run.append_warning({"step": w.step, "id": w.id, "title": w.title, "measured": w.measured})
            self.log.tag(w.id)
        if self.finding is None:
            self.finding = self.healer.observe(self.monitors.history)
        self.live.step(step, values)
        self._timing["logging"] += time.perf_counter() - t0

    # ------------------------------------------------------------------------------ the loop
    def run_until(self, stop_at: int) -> str:
        """Train until step `stop_at`; returns the final status (finished | interrupted | failed), or "heal": a
        finding of [train.heal] fired at the current step (self.finding; forge.train.launch heals the run)."""
        spec = self.spec
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.counters.step < stop_at:
                step = self.counters.step + 1  # the step about to complete
                collect = step % spec.logging.every == 0 or step == stop_at
                metrics = self.train_step(collect)
                if self.counters.nonfinite_in_a_row >= spec.train.max_nonfinite_in_a_row:
                    self.stop_reason = (f"{self.counters.nonfinite_in_a_row} consecutive non-finite steps (loss, "
                                        f"gradient or update; each undone) at step {step}; the weights and "
                                        f"checkpoints are those of the last finite step; run "
                                        f"`forge diagnose {self.run.run_id}`")
                    if self.world.main:
                        self.record({**metrics, "optim/nonfinite_count": self.counters.nonfinite_total})
                    return "heal" if self.finding is not None else "failed"
                # rank 0 alone evaluates, probes and logs (no collectives in there: the others wait in the next step)
                if self.world.main:
                    self._evaluate_and_record(step, collect, metrics, last=step == stop_at)
                if self.finding is not None:
                    return "heal"
                if step % spec.checkpoint.every == 0 or step == stop_at:
                    self.save()
                every = spec.train.cuda_empty_cache_every
                if every and step % every == 0 and self.parts.device.type == "cuda":
                    torch.cuda.empty_cache()       # OOM mitigation: return cached blocks (fragmentation)
                if self.world.distributed and distributed.any_rank(self.stop_reason is not None, self.parts.device):
                    self.stop_reason = self.stop_reason or "stopped: a signal reached another process of the run"
                if self.stop_reason is not None:
                    if step % spec.checkpoint.every and step != stop_at:
                        self.save()
                    return "interrupted"
            return "finished"
        finally:
            self.wait_for_checkpoint()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _evaluate_and_record(self, step: int, collect: bool, metrics: dict[str, Any], last: bool) -> None:
        spec = self.spec
        evaluated = step % spec.train.eval_every == 0 or last
        if evaluated:
            metrics.update(self.evaluate(step))
        if spec.merge_preview.enabled and step % spec.merge_preview.every == 0:
            self.wait_for_checkpoint()     # the parent is the newest checkpoint on disk
            with observing(self.parts.model):
                metrics.update(merge_preview(self.parts.model, self.parts.data, self.parts.device,
                                             self.run.checkpoints, spec.merge_preview, spec.checkpoint.every))
        if metrics:
            self.record({**metrics, **self.perf_metrics()} if collect else metrics)
        else:
            self.live.step(step)
        if evaluated:
            self.log.evaluation(step, metrics)   # plots, heatmaps, samples, success table to W&B / TensorBoard

    def evaluate(self, step: int) -> dict[str, float]:
        """valid/* (perplexity, bits per byte, halting histogram) and the probes, without side effects on
        training (no max-logit tracking for QK-clip, no RNG draws)."""
        model = self.parts.model
        with observing(model):
            out = evaluate(model, self.parts.data, self.parts.device)
            if self.probes is not None:
                out.update(self.probes.run(model, self.parts.device, step, self.run.path))
        return out

    def _request_stop(self, signum, _frame) -> None:
        if self.stop_reason is not None:  # a second Ctrl-C: stop now, the last checkpoint stays valid
            raise KeyboardInterrupt
        self.stop_reason = f"stopped by {signal.Signals(signum).name}"
        self.live.note(f"{signal.Signals(signum).name}: finishing step {self.counters.step + 1}, "
                       "then writing a checkpoint (again to stop at once)")
