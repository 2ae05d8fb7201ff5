"""What the contribution probes add to an evaluation: forge.train.evaluate.evaluate against the evaluation
without them (full depth through the model's forward + ACT halting, the passes evaluate ran before).

    .venv/bin/python benchmarks/bench_eval_probes.py [--spec specs/tiny.toml] [--threads 2] [--rounds 5]
        [--max-batches N]   (held-out batches per source; default the spec's data.eval.max_batches)

The probes cost one extra full-depth forward over the held-out batches with the memory path removed
(gate forced to attention), the lm_head of every outer step (recursion gain) and the gate statistics.
Cases interleave per round; medians of --rounds, on a random model of the spec (the time does not depend on
the weights). Writes benchmarks/results/eval_probes.json.
"""
from __future__ import annotations

import argparse

import torch

from common import interleaved, setup_threads, summary, table, write_result
from forge.data import build_data
from forge.model import build_model
from forge.spec.load import load_spec
from forge.train.evaluate import _nll, evaluate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default="specs/tiny.toml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-batches", type=int, default=None)
    args = parser.parse_args()
    setup_threads(args.threads)
    spec = load_spec(args.spec, [f"data.eval.max_batches={args.max_batches}"] if args.max_batches else []).spec
    data = build_data(spec.data, vocab_size=spec.model.vocab_size, seed=spec.run.seed)
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective).eval()

    def without_probes():
        _nll(model, data, "cpu", halt=False)
        _nll(model, data, "cpu", halt=True)

    times = interleaved({"without probes": without_probes, "evaluate (with probes)": lambda: evaluate(model, data, "cpu")},
                        args.rounds)
    stats = {name: summary(t) for name, t in times.items()}
    base = stats["without probes"]["median_s"]
    rows = [[name, f"{s['median_s']:.3f}", f"{s['median_s'] / base:.2f}x"] for name, s in stats.items()]
    print(table(["case", "median s", "vs without"], rows))
    batches = sum(len(data.eval_batches(n)) for n in data.names)
    write_result("eval_probes", {"spec": args.spec, "eval_batches": batches, "cases": stats,
                                 "ratio": stats["evaluate (with probes)"]["median_s"] / base})


if __name__ == "__main__":
    main()
