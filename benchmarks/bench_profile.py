"""Where the phase1 training step spends its time: torch.profiler over Trainer.train_step.

    .venv/bin/python benchmarks/bench_profile.py [--spec specs/phase1.toml] [--batch 8] [--threads 2]
                                                 [--set KEY=VALUE ...] [--quick]

The step is the one bench_train_step times (the model, optimizer and schedule built from the spec as
`forge train` builds them, random tokens); one warm-up step, then one profiled step. The table lists the
operators with the most self CPU time (time inside the operator itself, not its children), each with its
share of the profiled step, and the share of the step spent in the optimizer step and in QK-clip's max-logit
record (their record_function ranges). Writes benchmarks/results/profile.json.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_train_step import build_trainer
from common import setup_threads, table, write_result

TOP = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/phase1.toml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", help="spec overrides (dotted.key=value)")
    parser.add_argument("--quick", action="store_true", help="specs/tiny.toml (seconds)")
    args = parser.parse_args()
    setup_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    spec = "specs/tiny.toml" if args.quick else args.spec
    trainer = build_trainer(spec, [f"data.batch_size={args.batch}", *args.overrides])
    trainer.train_step(collect=False)                      # warm-up: optimizer state, allocator, kernels
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        trainer.train_step(collect=False)
        step_s = time.perf_counter() - start
    events = prof.key_averages()
    ranges = {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith("forge/")}
    ops = sorted((e for e in events if not e.key.startswith(("forge/", "ProfilerStep"))),
                 key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in ops) / 1e6
    top = [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / 1e6 / total_self} for e in ops[:TOP]]
    print(f"{spec} batch {args.batch}: profiled step {step_s:.2f} s (self time of all ops {total_self:.2f} s)")
    print(table(["op", "calls", "self (s)", "share"],
                [[t["op"], t["calls"], f"{t['self_s']:.3f}", f"{t['share']:.1%}"] for t in top]))
    for name, seconds in sorted(ranges.items()):
        print(f"{name}: {seconds:.3f} s ({seconds / step_s:.1%} of the step)")
    write_result("profile_quick" if args.quick else "profile",
                 {"spec": spec, "batch": args.batch, "overrides": args.overrides, "step_s": step_s,
                  "self_time_s": total_self, "ranges_s": ranges, "top_ops": top})


if __name__ == "__main__":
    main()
