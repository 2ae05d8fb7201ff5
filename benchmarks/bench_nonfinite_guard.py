"""Cost of the optimizer's non-finite guard (forge.optim.optimizer): the kept copy of the weights, momenta,
moments and Grokfast EMA taken before every update, and the fused finiteness check of the updated weights.

    .venv/bin/python benchmarks/bench_nonfinite_guard.py [--threads 2] [--rounds 5] [--phase1-batch 1]

Per spec (tiny at its own batch, phase1 at --phase1-batch x its seq_len, to keep the run short; a larger
batch only makes the guard's share smaller): the model and optimizer built from the spec, one training step
(forward + backward + optimizer step, the guard included) on random tokens, and in the same process and
rounds the guard alone (_KeptCopy.of + all_finite over the same tensors). Medians over --rounds after one
warm-up round. Writes benchmarks/results/nonfinite_guard.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import setup_threads, table, write_result
from forge.model import build_model
from forge.optim import build_optimizer
from forge.optim.optimizer import _KeptCopy, all_finite
from forge.spec.load import load_spec


def measure(spec_name: str, batch: int, rounds: int) -> dict:
    spec = load_spec(f"specs/{spec_name}.toml", ["train.precision=fp32"]).spec
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective)
    opt = build_optimizer(spec.optim, model)
    idx = torch.randint(0, spec.model.vocab_size, (batch, spec.data.seq_len))

    def step():
        out = model(idx, idx, act_loss_weight=0.0)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def guard():
        opt._kept = _KeptCopy.of(opt, opt._kept)
        all_finite(opt.params)

    step_s, guard_s = [], []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        with torch.no_grad():
            guard()
        t2 = time.perf_counter()
        if r:   # round 0 warms up
            step_s.append(t1 - t0)
            guard_s.append(t2 - t1)
    kept = sum(t.numel() for t in opt._kept.saved)
    step_med, guard_med = statistics.median(step_s), statistics.median(guard_s)
    return {"batch": f"{batch} x {spec.data.seq_len}", "parameters": sum(p.numel() for p in opt.params),
            "kept_floats": kept, "kept_mb": kept * 4 / 1e6, "step_s": step_med, "guard_s": guard_med,
            "guard_share_of_step": guard_med / step_med}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--phase1-batch", type=int, default=1)
    args = parser.parse_args()
    setup_threads(args.threads)
    tiny_batch = load_spec("specs/tiny.toml").spec.data.batch_size
    results = {"tiny": measure("tiny", tiny_batch, args.rounds),
               "phase1": measure("phase1", args.phase1_batch, args.rounds)}
    print(table(["spec", "batch", "parameters", "kept copy (MB)", "step (s)", "guard (ms)", "guard / step"],
                [[name, r["batch"], f"{r['parameters']:,}", f"{r['kept_mb']:.0f}", f"{r['step_s']:.3f}",
                  f"{r['guard_s'] * 1e3:.1f}", f"{r['guard_share_of_step']:.2%}"] for name, r in results.items()]))
    write_result("nonfinite_guard", {"rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
