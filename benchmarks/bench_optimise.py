"""The "Then optimise" measurements: each change to the phase1 training step against what it replaced, in one
process, interleaved round by round (BENCHMARKS.md, "Then optimise").

    .venv/bin/python benchmarks/bench_optimise.py [--batch 8] [--rounds 3] [--threads 2] [--curve-steps 50]
                                                  [--quick]

Step cases (Trainer.train_step on specs/phase1.toml, random tokens, built as `forge train` builds them):
  before                       train.precision = fp32, QK-clip's max-logit record and the LM head + loss as they
                               were: every q.k of the (T x T) score matrix scaled, masked out of place, copied and
                               reduced; F.linear + F.cross_entropy on the full (B*T, vocab) logits
  + max-logit record           the record of forge.model.attention.piece_max_logit, the plain head
  + fused chunked CE           both: forge.model.loss.linear_cross_entropy (fp32, the code as it is)
  bf16 autocast                the code as it is, train.precision = bf16 (CPU bf16 autocast)

Loss curve: specs/tiny.toml on its built-in corpus, the same seed and batches, --curve-steps optimizer steps
in fp32 and in bf16 autocast; the training loss of both at every step. Writes
benchmarks/results/optimise.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import forge.model.attention as attention
import forge.model.model as model_module
from bench_train_step import build_trainer
from common import interleaved, setup_threads, summary, table, write_result
from forge.model.flops import model_flops_per_token
from forge.train.perf import matmul_peak_flops


def recomputed_max_logit(piece) -> torch.Tensor:
    """The record before this change (kept here only to measure against): the whole score matrix."""
    return attention.masked_scores(piece).transpose(0, 1).flatten(1).amax(1)


def plain_head(u, weight, targets, ignore_index):
    """The LM head + loss before this change (kept here only to measure against): full logits."""
    logits = F.linear(u, weight)
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    return ce.sum(), ce.detach(), logits.detach().argmax(-1)


def with_previous(trainer, record=None, head=None):
    """trainer's step with the previous record and/or head swapped in for its duration."""
    def run():
        kept = attention.piece_max_logit, model_module.linear_cross_entropy
        attention.piece_max_logit = record or kept[0]
        model_module.linear_cross_entropy = head or kept[1]
        try:
            trainer.train_step(collect=False)
        finally:
            attention.piece_max_logit, model_module.linear_cross_entropy = kept
    return run


def loss_curve(precision: str, steps: int) -> list[float]:
    """Training loss per step of specs/tiny.toml (built-in corpus) at train.precision = precision."""
    from forge.spec.load import load_spec
    from forge.train.components import Components, build_components
    from forge.train.loop import Trainer

    resolved = load_spec("specs/tiny.toml", [f"train.precision={precision}"])
    with tempfile.TemporaryDirectory() as cache:
        parts = build_components(resolved.spec, Path("data"), cache_dir=Path(cache))
    parts = Components(parts.model, parts.optimizer, parts.schedule, parts.data, parts.loader, parts.device,
                       parts.qk_clip, parts.precision)
    trainer = Trainer(resolved, None, parts, None, None, None)
    return [float(trainer.train_step(collect=True)["loss/total"]) for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--curve-steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="specs/tiny.toml steps, a 10-step curve (seconds)")
    args = parser.parse_args()
    setup_threads(args.threads)
    spec = "specs/tiny.toml" if args.quick else "specs/phase1.toml"
    rounds, curve_steps = (1, 10) if args.quick else (args.rounds, args.curve_steps)

    fp32 = [f"data.batch_size={args.batch}", "train.precision=fp32"]
    bf16 = [f"data.batch_size={args.batch}", "train.precision=bf16"]
    old, record, new, half = (build_trainer(spec, fp32), build_trainer(spec, fp32), build_trainer(spec, fp32),
                              build_trainer(spec, bf16))
    cases = {"before": with_previous(old, recomputed_max_logit, plain_head),
             "+ max-logit record": with_previous(record, head=plain_head),
             "+ fused chunked CE": lambda: new.train_step(collect=False),
             "bf16 autocast": lambda: half.train_step(collect=False)}
    def measure_peaks():
        return {name: matmul_peak_flops(torch.device("cpu"), n=2048, dtype=dtype)
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    peaks = measure_peaks()
    times = interleaved(cases, rounds, warmup=1)
    # the better of a measurement before and after the rounds: a peak taken during a burst of load elsewhere
    # would inflate every MFU of the run
    peaks = {name: max(value, after) for (name, value), after in zip(peaks.items(), measure_peaks().values())}
    tokens = new.spec.data.batch_size * new.spec.data.seq_len
    flops = model_flops_per_token(new.spec.model, new.spec.data.seq_len)["total"]
    base = statistics.median(times["before"])
    steps, rows = {}, []
    for name, seconds in times.items():
        s = summary(seconds)
        rate = tokens / s["median_s"]
        steps[name] = {**s, "rounds_s": seconds, "vs_before": s["median_s"] / base, "tokens_per_s": rate,
                       "mfu_fp32_peak": rate * flops / peaks["fp32"], "mfu_bf16_peak": rate * flops / peaks["bf16"]}
        rows.append([name, f"{s['median_s']:.2f}", f"{s['min_s']:.2f}", f"{steps[name]['vs_before']:.2f}",
                     f"{rate:.0f}", f"{steps[name]['mfu_fp32_peak']:.0%}", f"{steps[name]['mfu_bf16_peak']:.0%}"])
    print(f"{spec} batch {args.batch}: peaks fp32 {peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(table(["case", "step (s)", "min (s)", "vs before", "tokens/s", "MFU (fp32 peak)", "MFU (bf16 peak)"], rows))

    curves = {p: loss_curve(p, curve_steps) for p in ("fp32", "bf16")}
    gap = [abs(a - b) / a for a, b in zip(curves["fp32"], curves["bf16"])]
    print(table(["step", "fp32 loss", "bf16 loss"],
                [[i + 1, f"{curves['fp32'][i]:.4f}", f"{curves['bf16'][i]:.4f}"]
                 for i in sorted({0, 9, curve_steps // 2 - 1, curve_steps - 1})]))
    print(f"max relative gap {max(gap):.2%}, at the end {gap[-1]:.2%}")
    write_result("optimise_quick" if args.quick else "optimise",
                 {"spec": spec, "batch": args.batch, "threads": args.threads, "peak_flops": peaks,
                  "flops_per_token": flops, "steps": steps,
                  "loss_curve": {"spec": "specs/tiny.toml", **curves, "max_relative_gap": max(gap),
                                 "final_relative_gap": gap[-1]}})


if __name__ == "__main__":
    main()
