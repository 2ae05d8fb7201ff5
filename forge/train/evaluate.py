"""Evaluation on the held-out split: perplexity and bits-per-byte per source and overall, at full
depth and under ACT halting; the contribution probes; and the Phase 2 merge preview.

bits per byte = (next-token NLL in nats summed over targets that stand for text) / (ln 2 * their UTF-8
bytes); eos targets stand for no bytes and are left out. Unlike perplexity per token (over every
target, eos included) it does not depend on the tokenizer, so runs with different vocabularies compare.

Contribution probes (what each part of the design earns, on the same held-out batches):
    valid/memory_contribution_bpb   bits/byte with the memory path removed (gate forced to g = 1) minus the
                                    full model's, at full depth: positive = the memory helps (one extra forward)
    valid/recursion_gain_bpb        bits/byte of outer step 0 minus the last step's: positive = recursion helps
    valid/gate/{token,channel}_spread, valid/gate/decided_share   how the MAG gate discriminates (GateStats)
Each per source too, and absent (never a stand-in value) where the model has no memory or no recursion.
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from forge.errors import ForgeError
from forge.model.gate import attention_only, observe
from forge.train import checkpoint as ckpt
from forge.train.merge import merge_state_dicts

LN2 = math.log(2)
HALTING_COMPUTE = ("compute_share", "halted_early_share")   # act/* of the halting forward, into valid/halt/*


def _new_acc() -> dict[str, Any]:
    return {"nll": 0.0, "text_nll": 0.0, "tokens": 0, "bytes": 0, "steps": 0.0}


@torch.no_grad()
def _nll(model, data, device, halt: bool) -> dict[str, dict[str, float]]:
    """Under the model's forward (halt=True: the ACT rule). Per source: summed NLL (nats) over all targets and
    over targets that stand for text, target count, UTF-8 bytes, summed outer steps used, halting histogram."""
    totals = {}
    for name in data.names:
        acc = _new_acc()
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
            counts = torch.bincount(out.used_steps.flatten() - 1, minlength=model.n_steps).tolist()
            acc["halt_hist"] = [a + c for a, c in zip(acc.get("halt_hist", [0] * len(counts)), counts)]
            for key in HALTING_COMPUTE:          # token-weighted, like every other held-out figure
                if f"act/{key}" in out.metrics:
                    acc[key] = acc.get(key, 0.0) + float(out.metrics[f"act/{key}"]) * n
        totals[name] = acc
    return totals


@torch.no_grad()
def _nll_full_depth(model, data, device, every_step: bool = True) -> dict[str, dict[str, Any]]:
    """At full depth (every outer step runs, no halting), from the model's own parts (encode, outer_steps,
    lm_head: forward's path without halting). Per source as _nll, plus "step_text_nll": the text NLL of each
    outer step (every_step=False: the last step's only, which is all the memory-ablated pass needs)."""
    totals = {}
    for name in data.names:
        acc = _new_acc()
        for batch in data.eval_batches(name):
            idx, targets = batch.idx.to(device), batch.targets.to(device)
            text = batch.target_bytes.flatten().to(device) > 0   # eos stands for no bytes
            rope = model.rope(idx.shape[1], device)
            x = model.encode(idx, rope)[0]
            step_text, ran = [], 0
            for t, (y, _) in enumerate(model.outer_steps(x, rope)):
                ran += 1
                if not every_step and t < model.n_steps - 1:
                    continue
                nats = F.cross_entropy(model.lm_head(y).flatten(0, 1).float(), targets.flatten(), reduction="none")
                step_text.append(float(nats[text].sum()))
            n = int(targets.numel())
            acc["nll"] += float(nats.sum())               # the last step's: the model's output at full depth
            acc["text_nll"] += step_text[-1]
            acc["tokens"] += n
            acc["bytes"] += batch.n_bytes
            acc["steps"] += ran * n
            acc["step_text_nll"] = [a + b for a, b in zip(acc.get("step_text_nll", [0.0] * len(step_text)),
                                                          step_text)]
        totals[name] = acc
    return totals


def _summarise(totals: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    out = {}
    all_ = _new_acc()
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


def _bpb_difference(name: str, totals, nats_a, nats_b) -> dict[str, float]:
    """valid/{name} and valid/{name}/{source}: (nats_a - nats_b) of each source / (ln 2 * its bytes), overall
    from the summed nats and bytes. nats_a, nats_b: source -> summed text NLL."""
    out, diff, n_bytes = {}, 0.0, 0
    for source, acc in totals.items():
        if acc["bytes"]:
            out[f"valid/{name}/{source}"] = (nats_a[source] - nats_b[source]) / (LN2 * acc["bytes"])
            diff, n_bytes = diff + nats_a[source] - nats_b[source], n_bytes + acc["bytes"]
    if n_bytes:
        out[f"valid/{name}"] = diff / (LN2 * n_bytes)
    return out


def recursion_gain(full: dict[str, dict[str, Any]]) -> dict[str, float]:
    """valid/recursion_gain_bpb(/{source}): bits/byte at outer step 0 minus at the last step."""
    return _bpb_difference("recursion_gain_bpb", full, {s: a["step_text_nll"][0] for s, a in full.items()},
                           {s: a["step_text_nll"][-1] for s, a in full.items()})


def memory_contribution(full: dict[str, dict[str, Any]], ablated: dict[str, dict[str, Any]]) -> dict[str, float]:
    """valid/memory_contribution_bpb(/{source}): bits/byte without the memory path minus with it (full depth)."""
    return _bpb_difference("memory_contribution_bpb", full, {s: a["text_nll"] for s, a in ablated.items()},
                           {s: a["text_nll"] for s, a in full.items()})


def halting_compute(totals: dict[str, dict], prefix: str) -> dict[str, float]:
    """valid/halt/compute_share and halted_early_share: the refiner work run under halting and the share of
    tokens that halted early (the ideal saving), token-weighted over every source's eval batches."""
    with_trm = [acc for acc in totals.values() if HALTING_COMPUTE[0] in acc]
    tokens = sum(acc["tokens"] for acc in with_trm)
    return {f"{prefix}{key}": sum(acc[key] for acc in with_trm) / tokens for key in HALTING_COMPUTE} if tokens else {}


def halting_histogram(totals: dict[str, dict], prefix: str) -> dict[str, float]:
    """The ACT histogram (C1): share of held-out tokens whose output came from outer step t, per step."""
    counts = [sum(col) for col in zip(*(acc["halt_hist"] for acc in totals.values() if "halt_hist" in acc))]
    total = sum(counts)
    return {f"{prefix}share_step{t}": c / total for t, c in enumerate(counts)} if total else {}


class NonFiniteWeights(ForgeError):
    pass


def check_finite_weights(model) -> None:
    """Refuse to evaluate weights holding NaN/inf: every number would be meaningless, and the probes'
    sampling would fail on a NaN probability."""
    bad = ckpt.nonfinite_tensors(model.state_dict())
    if bad:
        raise NonFiniteWeights(f"the model has non-finite weights ({ckpt.listed(bad)}); not evaluated. Resume from a "
                               "checkpoint (each holds finite weights): forge train --resume RUN_ID")


def evaluate(model, data, device) -> dict[str, float]:
    """valid/* at full depth (every outer step runs), valid/halt/* under ACT halting with the halting histogram
    valid/halt/share_step{t}, and the contribution probes (module docstring). NonFiniteWeights if the weights
    are not finite."""
    check_finite_weights(model)
    was_training = model.training
    model.eval()
    gate = model.gate if model.spec.memory.enabled else None
    try:
        with observe(gate) if gate is not None else contextlib.nullcontext() as gate_stats:
            full = _nll_full_depth(model, data, device)
        out = _summarise(full, "valid/")
        if model.n_steps > 1:
            out.update(recursion_gain(full))
        if gate is not None:
            with attention_only(gate):
                out.update(memory_contribution(full, _nll_full_depth(model, data, device, every_step=False)))
            out.update({f"valid/gate/{k}": v for k, v in gate_stats.summary().items()})
        halting = _nll(model, data, device, halt=True)
        out.update(_summarise(halting, "valid/halt/"))
        out.update(halting_histogram(halting, "valid/halt/"))
        out.update(halting_compute(halting, "valid/halt/"))
    finally:
        model.train(was_training)
    return out


def perplexity(model, data, device) -> float:
    check_finite_weights(model)
    was_training = model.training
    model.eval()
    try:
        return _summarise(_nll(model, data, device, halt=False), "")["perplexity"]
    finally:
        model.train(was_training)


def score_merge(model_a, model_b, data, device, method: str, t: float) -> dict[str, float]:
    """Merge b into a (SLERP or linear, factor t) and compare perplexities.

    merge/fitness = mean(perplexity of the two parents) / perplexity of the merge: above 1 the merge
    beats its parents on average (weights stay mergeable, G1); far below 1 they have drifted apart.
    """
    merged = copy.deepcopy(model_a)
    merged.load_state_dict(merge_state_dicts(model_a.state_dict(), model_b.state_dict(), method, t))
    ppl_a, ppl_b = perplexity(model_a, data, device), perplexity(model_b, data, device)
    ppl_merged = perplexity(merged, data, device)
    return {"merge/perplexity": ppl_merged, "merge/parent_perplexity": (ppl_a + ppl_b) / 2,
            "merge/fitness": (ppl_a + ppl_b) / 2 / ppl_merged}


def _with_weights(model, path: Path):
    from safetensors.torch import load_model

    copy_ = copy.deepcopy(model)
    load_model(copy_, str(path / "model.safetensors"))
    return copy_


def merge_preview(model, data, device, checkpoints: Path, spec, every: int) -> dict[str, Any]:
    """During training: merge the current weights with the newest regular checkpoint (a multiple of
    checkpoint.every: not an extra one written by a stop, so a resumed run merges with the same parent
    as an uninterrupted one) and score the merge (score_merge)."""
    regular = [p for p in ckpt.list_checkpoints(checkpoints, report=lambda _: None) if ckpt.step_of(p) % every == 0
               and ckpt.verify(p) is None]
    if not regular:
        return {}
    out = score_merge(model, _with_weights(model, regular[-1]), data, device, spec.method, spec.t)
    return {**out, "merge/parent_step": float(ckpt.step_of(regular[-1]))}


def merge_checkpoints(run_path: Path, step_a: int, step_b: int, method: str, t: float,
                      data_dir: Path) -> dict[str, float]:
    """`forge merge-preview`: merge two checkpoints of a run and score the merge on its held-out data."""
    from forge.data import build_data
    from forge.errors import ForgeError
    from forge.model import build_model
    from forge.train.run_dir import RunDir

    spec = RunDir(run_path).resolved_spec().spec
    paths = []
    for step in (step_a, step_b):
        path = run_path / "checkpoints" / ckpt.step_dir_name(step)
        problem = ckpt.verify(path) if path.is_dir() else "no such checkpoint"
        if problem:
            kept = ", ".join(str(ckpt.step_of(p)) for p in ckpt.list_checkpoints(run_path / "checkpoints"))
            raise ForgeError(f"checkpoint at step {step} of {run_path.name}: {problem} (kept steps: {kept or 'none'})")
        paths.append(path)
    model = build_model(spec.model, spec.objective)
    data = build_data(spec.data, vocab_size=spec.model.vocab_size, seed=spec.run.seed, data_dir=data_dir)
    device = torch.device("cpu")
    return score_merge(_with_weights(model, paths[0]), _with_weights(model, paths[1]), data, device, method, t)
