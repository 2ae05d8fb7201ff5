"""Training throughput and MFU of `forge train`'s step, with a per-component breakdown.

    .venv/bin/python benchmarks/bench_train_step.py [--threads 2] [--rounds 2] [--batch 8] [--quick]

Per spec (phase1 and its AdamW variant, the same-size baseline, tiny and the tiny baseline; --batch sets
data.batch_size, sequence length from the spec): the model, optimizer and schedule built from the spec
exactly as `forge train` builds them, driven by forge.train.loop.Trainer.train_step on random tokens (the
step's cost does not depend on the text). Cases interleave round by round; medians and mins of --rounds
timed rounds after one warm-up round.

  step          Trainer.train_step(collect=False): the step `forge train` runs between logging steps
  logging step  Trainer.train_step(collect=True): + every metric family (amortised over logging.every)
  sections      the same calls timed one by one: forward, backward, optimizer, QK-clip (the clip itself)
  no max-logit  forward + backward with QK-clip's max-logit tracking off (its cost = the difference)
  components    forward + backward of each part alone on fixed inputs: backbone blocks, memory + MAG gate,
                TRM recursion, LM head + losses (deep supervision CE, ACT BCE, coherence, diversity)

MFU = tokens/s x model FLOPs per token (forge.model.flops.model_flops_per_token, counted from the spec) / the
fp32 matmul peak measured in the same process (n = 2048, best of 5). Writes benchmarks/results/train_step.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from forge.model.flops import model_flops_per_token
from common import interleaved, setup_threads, summary, table, write_result
from forge.model import build_model
from forge.model.act import halting_loss
from forge.model.objective import coherence_loss, diversity_penalty
from forge.optim import build_lr_schedule, build_optimizer, qk_clip, set_max_logit_tracking
from forge.spec.load import load_spec
from forge.train.components import Components
from forge.train.loop import Trainer
from forge.train.perf import matmul_peak_flops

CASES = {   # name -> (spec, overrides)
    "phase1": ("specs/phase1.toml", []),
    "phase1 + AdamW": ("specs/phase1.toml", ["optim.name=adamw"]),
    "baseline (AdamW)": ("specs/baseline.toml", []),
    "tiny": ("specs/tiny.toml", []),
    "tiny baseline (AdamW)": ("specs/tiny_baseline_local.toml", []),
}


class RandomTokens:
    """The TrainLoader interface Trainer.train_step reads: fixed random micro-batches of the spec's shape."""

    def __init__(self, vocab: int, batch: int, seq_len: int, grad_accum: int):
        gen = torch.Generator().manual_seed(0)
        rows = batch // grad_accum
        self.batches = [(torch.randint(vocab, (rows, seq_len + 1), generator=gen),) for _ in range(grad_accum)]

    def micro_batches(self, step: int):
        return [(b[0][:, :-1], b[0][:, 1:]) for b in self.batches]


def build_trainer(path: str, overrides: list[str]) -> Trainer:
    resolved = load_spec(path, overrides)
    spec = resolved.spec
    torch.manual_seed(spec.run.seed)
    model = build_model(spec.model, spec.objective)
    set_max_logit_tracking(model, spec.optim.qk_clip.enabled)
    optimizer = build_optimizer(spec.optim, model)
    loader = RandomTokens(spec.model.vocab_size, spec.data.batch_size, spec.data.seq_len, spec.data.grad_accum)
    parts = Components(model, optimizer, build_lr_schedule(spec.train, optimizer), None, loader, torch.device("cpu"))
    return Trainer(resolved, None, parts, None, None, None)


def sectioned_step(trainer: Trainer, sections: dict[str, list[float]]) -> None:
    """The calls of train_step, timed one by one (single micro-batch specs)."""
    model, opt, spec = trainer.parts.model, trainer.parts.optimizer, trainer.spec
    (idx, targets), = trainer.parts.loader.micro_batches(0)
    marks = [time.perf_counter()]
    out = model(idx, targets, act_loss_weight=trainer.act_loss_weight(trainer.counters.step))
    marks.append(time.perf_counter())
    out.loss.backward()
    marks.append(time.perf_counter())
    opt.step(collect_metrics=False)
    marks.append(time.perf_counter())
    qk_clip(model, spec.optim.qk_clip)
    marks.append(time.perf_counter())
    opt.zero_grad(set_to_none=True)
    for name, a, b in zip(("forward", "backward", "optimizer", "qk_clip"), marks, marks[1:]):
        sections[name].append(b - a)


def fwd_bwd(trainer: Trainer, track_max_logit: bool):
    model = trainer.parts.model
    (idx, targets), = trainer.parts.loader.micro_batches(0)

    def run():
        set_max_logit_tracking(model, track_max_logit)
        model(idx, targets).loss.backward()
        model.zero_grad(set_to_none=True)
        set_max_logit_tracking(model, trainer.spec.optim.qk_clip.enabled)
    return run


def component_cases(trainer: Trainer) -> dict:
    """Forward + backward of each part of the model alone, on fixed random inputs of the step's shape."""
    model, spec = trainer.parts.model, trainer.spec
    (idx, targets), = trainer.parts.loader.micro_batches(0)
    B, T = idx.shape
    gen = torch.Generator().manual_seed(1)

    def leaf():
        return torch.randn(B, T, spec.model.d_model, generator=gen).requires_grad_()

    h0, y, m, x, grad = leaf(), leaf(), leaf(), leaf(), torch.randn(B, T, spec.model.d_model, generator=gen)
    rope = model.rope(T, idx.device)
    n_steps = model.n_steps
    step_states = [leaf() for _ in range(n_steps)]

    def done():
        model.zero_grad(set_to_none=True)
        for t in (h0, y, m, x, *step_states):
            t.grad = None

    def backbone():
        u = h0
        for block in model.blocks:
            u = block(u, rope)
        (u * grad).sum().backward()
        done()

    def memory_gate():
        mem, _ = model.memory(h0)
        out, _, entropy = model.gate(y, mem)
        ((out * grad).sum() - entropy).backward()
        done()

    def trm():
        total = sum((yt * grad).sum() + (zt * grad).sum() for yt, zt in model.trm.steps(x, rope))
        total.backward()
        done()

    def head_and_losses():
        loss = coherence_loss(x, spec.objective.coherence_temperature) + diversity_penalty(x)
        for t, state in enumerate(step_states):
            logits = model.lm_head(state)
            loss = loss + model.step_weights[t] * F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            if model.trm is not None:
                correct = logits.detach().argmax(-1) == targets
                loss = loss + halting_loss(model.trm.act(state), correct, torch.ones_like(correct))
        loss.backward()
        done()

    cases = {"backbone": backbone, "lm_head + losses": head_and_losses}
    if model.trm is not None:
        cases["trm"] = trm
    if spec.model.memory.enabled:
        cases["memory + gate"] = memory_gate
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="data.batch_size of the phase1-size specs")
    parser.add_argument("--quick", action="store_true", help="tiny specs only, one round (seconds)")
    args = parser.parse_args()
    setup_threads(args.threads)
    rounds = 1 if args.quick else args.rounds

    names = [n for n in CASES if n.startswith("tiny")] if args.quick else list(CASES)
    trainers = {}
    for name in names:
        path, overrides = CASES[name]
        if not name.startswith("tiny"):
            overrides = [*overrides, f"data.batch_size={args.batch}"]
        trainers[name] = build_trainer(path, overrides)

    # the step of every spec, interleaved round by round; the breakdown cases of each spec next to it
    cases, sections = {}, {}
    for name, tr in trainers.items():
        cases[f"{name}|step"] = lambda tr=tr: tr.train_step(collect=False)
        cases[f"{name}|logging step"] = lambda tr=tr: tr.train_step(collect=True)
        sections[name] = {k: [] for k in ("forward", "backward", "optimizer", "qk_clip")}
        cases[f"{name}|sections"] = lambda tr=tr, s=sections[name]: sectioned_step(tr, s)
        if tr.spec.optim.qk_clip.enabled:
            cases[f"{name}|no max-logit fwd+bwd"] = fwd_bwd(tr, track_max_logit=False)
            cases[f"{name}|fwd+bwd"] = fwd_bwd(tr, track_max_logit=True)
        for part, fn in component_cases(tr).items():
            cases[f"{name}|component {part}"] = fn
    peak = matmul_peak_flops(torch.device("cpu"), n=2048)
    times = interleaved(cases, rounds, warmup=1)
    for name, s in sections.items():   # the warm-up round's sections are dropped too
        for k in s:
            s[k] = s[k][1:]

    results, rows = {}, []
    for name, tr in trainers.items():
        spec = tr.spec
        tokens = spec.data.batch_size * spec.data.seq_len
        flops = model_flops_per_token(spec.model, spec.data.seq_len)
        step = summary(times[f"{name}|step"])
        logging = summary(times[f"{name}|logging step"])
        res = {"spec": CASES[name][0], "batch": spec.data.batch_size, "seq_len": spec.data.seq_len,
               "params": sum(p.numel() for p in tr.parts.model.parameters()),
               "step": step, "logging_step": logging,
               "tokens_per_s": tokens / step["median_s"], "tokens_per_s_best": tokens / step["min_s"],
               "flops_per_token": flops["total"],
               "mfu": tokens / step["median_s"] * flops["total"] / peak,
               "mfu_best": tokens / step["min_s"] * flops["total"] / peak,
               "metrics_overhead_per_logging_step_s": logging["median_s"] - step["median_s"],
               "sections_s": {k: statistics.median(v) for k, v in sections[name].items()},
               "components_s": {k.split("component ")[1]: statistics.median(v) for k, v in times.items()
                                if k.startswith(f"{name}|component ")}}
        if f"{name}|fwd+bwd" in times:
            res["max_logit_tracking_s"] = (statistics.median(times[f"{name}|fwd+bwd"])
                                           - statistics.median(times[f"{name}|no max-logit fwd+bwd"]))
        results[name] = res
        rows.append([name, f"{res['params']:,}", f"{res['batch']}x{res['seq_len']}",
                     f"{step['median_s']:.2f}", f"{step['min_s']:.2f}", f"{res['tokens_per_s']:.0f}",
                     f"{res['mfu']:.0%}", f"{res['flops_per_token'] / 1e6:.0f}"])
    print(f"fp32 matmul peak (n=2048, best of 5): {peak / 1e9:.0f} GFLOP/s")
    print(table(["spec", "params", "batch x seq", "step (s)", "min (s)", "tokens/s", "MFU", "MFLOP/token"], rows))
    for name, res in results.items():
        parts = {**res["sections_s"], **{f"c:{k}": v for k, v in res["components_s"].items()}}
        print(name, " ".join(f"{k}={v:.3f}" for k, v in parts.items()),
              f"max_logit={res.get('max_logit_tracking_s', 0):.3f} metrics={res['metrics_overhead_per_logging_step_s']:.3f}")
    write_result("train_step_quick" if args.quick else "train_step",
                 {"threads": args.threads, "rounds": rounds, "peak_flops": peak, "cases": results})


if __name__ == "__main__":
    main()
