"""The probes of one run, run at every evaluation: fixed sets drawn once from the held-out split, then

    samples          one prompt per source, continued under ACT halting -> <run>/samples.jsonl       (A2)
    reasoning        exact match of the final number -> valid/reasoning_accuracy                      (A1)
    long range       next-token accuracy past the window -> valid/long_range_acc, valid/short_range_acc (B2)
    position         recall at fixed distances -> eval/position_accuracy[/d{d}]                      (E1)
    attention maps   eval/attn/{entropy,sink_count,rope_norm}; PNGs at probes.heatmap_steps
                     -> <run>/heatmaps/step-NNNNNNN/<layer>_head<h>.png                               (B2, E2)

Deterministic: sets come from a generator seeded by run.seed, sampling from one seeded by (run.seed, step);
the global RNG is never touched, so a resumed run logs exactly what an uninterrupted one does.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from forge.model.attention import attention_modules
from forge.probes.heatmaps import capture_attention, heatmap_metrics, write_heatmaps
from forge.probes.long_range import range_accuracy
from forge.probes.position import position_items
from forge.probes.reasoning import arithmetic_items, gsm8k_items
from forge.probes.sampling import generate
from forge.probes.scoring import accuracy_by_kind, exact_match, full_depth_logits
from forge.spec.probes import ProbesSpec

SAMPLES = "samples.jsonl"
HEATMAPS = "heatmaps"


def sample_seed(run_seed: int, step: int) -> int:
    """The seed of the samples written at `step`: fixed per (run, step), independent of the global RNG."""
    return run_seed * 1_000_003 + step


def heatmap_dir(run_path: Path, step: int) -> Path:
    return run_path / HEATMAPS / f"step-{step:07d}"


@contextlib.contextmanager
def observing(model):
    """Eval mode, no gradients, and no side effects on training: max-logit tracking (QK-clip reads it after
    the next training step) and attention statistics are paused and restored afterwards."""
    modules = attention_modules(model)
    saved = [(m.track_max_logit, m.max_logit) for m in modules]
    was_training, logged = model.training, model.log_attention_stats
    for m in modules:
        m.track_max_logit = False
    model.log_attention_stats = False
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, (track, max_logit) in zip(modules, saved):
            m.track_max_logit, m.max_logit = track, max_logit
        model.log_attention_stats = logged
        model.train(was_training)


class ProbeSuite:
    def __init__(self, spec: ProbesSpec, window: int, data, seed: int):
        self.spec, self.window, self.data, self.seed = spec, window, data, seed
        self._sets: dict | None = None

    # ------------------------------------------------------------------------------------------ fixed sets
    def sets(self) -> dict:
        """Built once, on first use (so the cost is paid at the first evaluation only)."""
        if self._sets is None:
            spec, data, tok = self.spec, self.data, self.data.tokenizer
            generator = torch.Generator().manual_seed(self.seed)
            reasoning = []
            for name in spec.reasoning_sources:
                docs = data.source(name).eval
                texts = (tok.decode(docs.doc(i)) for i in range(len(docs)))
                reasoning += gsm8k_items(texts, tok, spec.reasoning_items, kind=name)
            reasoning += arithmetic_items(tok, spec.arithmetic_items, generator)
            streams = {name: self._stream(name) for name in data.names}
            position = position_items(np.concatenate(list(streams.values())), spec.position_distances,
                                      spec.position_items, tok.vocab_size, (tok.eos_id, tok.pad_id), generator)
            long_rows = [(b.idx, b.targets) for name in data.names
                         for b in data.eval_batches(name, spec.long_range_seq_len)[: spec.long_range_batches]]
            prompts = torch.stack([torch.from_numpy(np.resize(s, spec.sample_prompt_tokens)) for s in streams.values()])
            heatmap_row = data.eval_batches(data.names[0], spec.heatmap_seq_len)[0].idx[:1]
            self._sets = {"reasoning": reasoning, "position": position, "long_range": long_rows,
                          "prompts": prompts, "heatmap": heatmap_row}
        return self._sets

    def _stream(self, name: str) -> np.ndarray:
        from forge.data.packing import concat_with_eos

        return concat_with_eos(self.data.source(name).eval, self.data.tokenizer.eos_id)

    # ------------------------------------------------------------------------------------------ run
    def run(self, model, device, step: int, run_path: Path) -> dict[str, float]:
        """All probes on the current weights; writes samples (and heatmaps at their steps) under run_path."""
        sets, tok, batch = self.sets(), self.data.tokenizer, self.data.micro_batch_size
        out: dict[str, float] = {}
        with observing(model):
            logits = full_depth_logits(model)
            reasoning = accuracy_by_kind(sets["reasoning"],
                                         exact_match(logits, sets["reasoning"], tok.pad_id, device, batch))
            out["valid/reasoning_accuracy"] = reasoning.pop("all")
            out.update({f"valid/reasoning_accuracy/{k}": v for k, v in reasoning.items()})
            position = accuracy_by_kind(sets["position"],
                                        exact_match(logits, sets["position"], tok.pad_id, device, batch))
            out["eval/position_accuracy"] = position.pop("all")
            out.update({f"eval/position_accuracy/{k}": v for k, v in position.items()})
            out.update(range_accuracy(logits, sets["long_range"], self.window, device))
            layers = capture_attention(model, sets["heatmap"].to(device))
            out.update(heatmap_metrics(layers))
            if step in self.spec.heatmap_steps:
                write_heatmaps(layers, heatmap_dir(run_path, step))
            out.update(self._samples(model, device, step, run_path))
        return out

    def _samples(self, model, device, step: int, run_path: Path) -> dict[str, float]:
        spec, tok = self.spec, self.data.tokenizer
        prompts = self.sets()["prompts"].to(device)
        gen = generate(model, prompts, spec.sample_new_tokens, temperature=spec.sample_temperature,
                       top_k=spec.sample_top_k, seed=sample_seed(self.seed, step), eos_id=tok.eos_id)
        with open(run_path / SAMPLES, "a", encoding="utf-8") as f:
            for name, prompt, tokens in zip(self.data.names, prompts.tolist(), gen.tokens):
                f.write(json.dumps({"step": step, "source": name, "prompt": tok.decode(prompt),
                                    "completion": tok.decode(tokens), "tokens": len(tokens),
                                    "avg_steps": gen.avg_steps}) + "\n")
        return {"eval/sample_avg_steps": gen.avg_steps, "perf/sample_tokens_per_sec": gen.tokens_per_sec}
