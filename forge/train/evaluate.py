"""Evaluation on the held-out split: perplexity and bits-per-byte per source and overall, at full
depth and under ACT halting; and the Phase 2 merge preview.

bits per byte = (next-token NLL in nats summed over targets that stand for text) / (ln 2 * their UTF-8
bytes); eos targets stand for no bytes and are left out. Unlike perplexity per token (over every
target, eos included) it does not depend on the tokenizer, so runs with different vocabularies compare.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from forge.train import checkpoint as ckpt
from forge.train.merge import merge_state_dicts

LN2 = math.log(2)


@torch.no_grad()
def _nll(model, data, device, halt: bool) -> dict[str, dict[str, float]]:
    """Per source: summed NLL (nats) over all targets and over targets that stand for text, target
    count, UTF-8 bytes, summed outer steps used."""
    totals = {}
    for name in data.names:
        acc = {"nll": 0.0, "text_nll": 0.0, "tokens": 0, "bytes": 0, "steps": 0.0}
        for batch in data.eval_batches(name):
            targets = batch.targets.to(device)
            out = model(batch.idx.to(device), targets, halt=halt, return_logits=True)
            nats = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
            text = batch.target_bytes.flatten().to(device) > 0   # eos stands for no bytes
            n = int(targets.numel())
            acc["nll"] += float(nats.sum())
            acc["text_nll"] += float(nats[text].sum())
            acc["tokens"] += n
            acc["bytes"] += batch.n_bytes
            steps = out.metrics.get("act/avg_steps")
            acc["steps"] += (float(steps) if steps is not None else 1.0) * n   # without TRM: one step
        totals[name] = acc
    return totals


def _summarise(totals: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    out = {}
    all_ = {"nll": 0.0, "text_nll": 0.0, "tokens": 0, "bytes": 0, "steps": 0.0}
    for name, acc in totals.items():
        if not acc["tokens"]:
            continue
        out[f"{prefix}{name}/perplexity"] = math.exp(acc["nll"] / acc["tokens"])
        out[f"{prefix}{name}/bits_per_byte"] = acc["text_nll"] / (LN2 * acc["bytes"])
        for k in all_:
            all_[k] += acc[k]
    if all_["tokens"]:
        out[f"{prefix}perplexity"] = math.exp(all_["nll"] / all_["tokens"])
        out[f"{prefix}bits_per_byte"] = all_["text_nll"] / (LN2 * all_["bytes"])
        out[f"{prefix}avg_steps"] = all_["steps"] / all_["tokens"]
    return out


def evaluate(model, data, device) -> dict[str, float]:
    """valid/* at full depth (every outer step runs) and valid/halt/* under ACT halting."""
    was_training = model.training
    model.eval()
    try:
        out = _summarise(_nll(model, data, device, halt=False), "valid/")
        out.update(_summarise(_nll(model, data, device, halt=True), "valid/halt/"))
    finally:
        model.train(was_training)
    return out


def perplexity(model, data, device) -> float:
    was_training = model.training
    model.eval()
    try:
        return _summarise(_nll(model, data, device, halt=False), "")["perplexity"]
    finally:
        model.train(was_training)


def merge_preview(model, data, device, checkpoints: Path, spec, every: int) -> dict[str, Any]:
    """SLERP/linear-merge the current weights with the newest regular checkpoint (a multiple of
    checkpoint.every: not an extra one written by a stop, so a resumed run merges with the same
    parent as an uninterrupted one) and evaluate the result.

    merge/fitness = mean(perplexity of the two parents) / perplexity of the merge: above 1 the merge
    beats its parents on average (weights stay mergeable, G1); far below 1 they have drifted apart.
    """
    from safetensors.torch import load_model

    regular = [p for p in ckpt.list_checkpoints(checkpoints) if ckpt.step_of(p) % every == 0
               and ckpt.verify(p) is None]
    if not regular:
        return {}
    previous = regular[-1]
    parent = copy.deepcopy(model)
    load_model(parent, str(previous / "model.safetensors"))
    merged = copy.deepcopy(model)
    merged.load_state_dict(merge_state_dicts(model.state_dict(), parent.state_dict(), spec.method, spec.t))
    ppl_current, ppl_parent = perplexity(model, data, device), perplexity(parent, data, device)
    ppl_merged = perplexity(merged, data, device)
    return {"merge/perplexity": ppl_merged, "merge/parent_perplexity": (ppl_current + ppl_parent) / 2,
            "merge/fitness": (ppl_current + ppl_parent) / 2 / ppl_merged,
            "merge/parent_step": float(ckpt.step_of(previous))}
