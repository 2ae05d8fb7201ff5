"""Quality at equal wall-clock: validation bits-per-byte after the same CPU time of training on the local data.

    FORGE_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/bench_quality.py [--tiny-minutes 1.5]
        [--phase1-minutes 3] [--threads 2] [--quick]

Two comparisons, three variants each, built by forge exactly as `forge train` builds them
(forge.train.components.build_components + Trainer.train_step on the real data stream):
  tiny size    specs/tiny_local.toml | + optim.name=adamw | specs/tiny_baseline_local.toml
  phase1 size  specs/local.toml      | + optim.name=adamw | specs/baseline_local.toml     (batch 8)
The Phase 1 stack vs the same-size AdamW transformer; Phase 1 with AdamW separates the optimizer's effect
from the architecture's. The variants of a comparison train round-robin, one step each in turn, until each
has used its budget of wall-clock, so that background load hits them alike. Every variant gets the same
short warmup (train.warmup_steps) and then a constant lr (train.lr_schedule=constant): the step count each
reaches is unknown in advance, so no decay schedule could be fair to all. Then every variant is evaluated
on the same held-out batches (forge.train.evaluate: valid/bits_per_byte at full depth). Writes
benchmarks/results/quality.json.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import setup_threads, table, write_result
from forge.checklist.context import default_data_dir
from forge.spec.load import load_spec
from forge.train.components import build_components
from forge.train.evaluate import evaluate
from forge.train.loop import Trainer

COMPARISONS = {
    "tiny": {"Phase 1 stack (MuonGrokfast)": ("specs/tiny_local.toml", []),
             "Phase 1 stack + AdamW": ("specs/tiny_local.toml", ["optim.name=adamw"]),
             "baseline transformer (AdamW)": ("specs/tiny_baseline_local.toml", [])},
    "phase1": {"Phase 1 stack (MuonGrokfast)": ("specs/local.toml", []),
               "Phase 1 stack + AdamW": ("specs/local.toml", ["optim.name=adamw"]),
               "baseline transformer (AdamW)": ("specs/baseline_local.toml", [])},
}
# the same for every variant of a comparison: short warmup, constant lr, a few eval batches per source
SHARED = {"tiny": ["train.warmup_steps=20", "train.lr_schedule=constant"],
          "phase1": ["train.warmup_steps=5", "train.lr_schedule=constant", "data.batch_size=8",
                     "data.eval.max_batches=2"]}


def train_for(variants: dict, shared: list[str], seconds: float, data_dir) -> dict:
    trainers = {}
    for name, (path, overrides) in variants.items():
        resolved = load_spec(path, [*overrides, *shared])
        trainers[name] = Trainer(resolved, None, build_components(resolved.spec, data_dir), None, None, None)
    used = dict.fromkeys(trainers, 0.0)
    while any(u < seconds for u in used.values()):
        for name, trainer in trainers.items():
            if used[name] < seconds:
                start = time.perf_counter()
                trainer.train_step(collect=False)
                used[name] += time.perf_counter() - start
    out = {}
    for name, trainer in trainers.items():
        parts = trainer.parts
        valid = evaluate(parts.model, parts.data, parts.device)
        out[name] = {"spec": variants[name][0], "overrides": variants[name][1], "steps": trainer.counters.step,
                     "tokens": trainer.counters.tokens, "train_seconds": used[name],
                     "params": sum(p.numel() for p in parts.model.parameters()),
                     "valid_bits_per_byte": valid["valid/bits_per_byte"],
                     "valid_perplexity": valid["valid/perplexity"],
                     "per_source_bits_per_byte": {k.split("/")[1]: v for k, v in valid.items()
                                                  if k.startswith("valid/") and k.count("/") == 2
                                                  and k.endswith("bits_per_byte") and "/halt/" not in k}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny-minutes", type=float, default=1.5)
    parser.add_argument("--phase1-minutes", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="tiny size only, 10 s per variant")
    args = parser.parse_args()
    setup_threads(args.threads)
    torch.manual_seed(0)
    data_dir = default_data_dir()
    budgets = {"tiny": 10.0} if args.quick else {"tiny": 60 * args.tiny_minutes, "phase1": 60 * args.phase1_minutes}
    results = {}
    for size, seconds in budgets.items():   # the file is rewritten after each comparison: nothing lost on a crash
        results[size] = {"seconds_per_variant": seconds, "shared_overrides": SHARED[size],
                         "variants": train_for(COMPARISONS[size], SHARED[size], seconds, data_dir)}
        rows = [[name, f"{v['params']:,}", v["steps"], f"{v['tokens']:,}", f"{v['valid_bits_per_byte']:.3f}",
                 " ".join(f"{k} {b:.2f}" for k, b in v["per_source_bits_per_byte"].items())]
                for name, v in results[size]["variants"].items()]
        print(f"{size}: {seconds:.0f} s of training per variant")
        print(table(["variant", "params", "steps", "tokens", "valid bpb", "per source bpb"], rows))
        write_result("quality_quick" if args.quick else "quality",
                     {"threads": args.threads, "data_dir": str(data_dir), "comparisons": results})


if __name__ == "__main__":
    main()
