"""Peak memory of a training step at batch 32, seq 512: peak RSS on CPU (CUDA max_memory_allocated on a GPU).

    .venv/bin/python benchmarks/bench_memory.py [--batch 32] [--threads 2] [--quick]

One fresh process per measurement (a process's peak RSS never goes down): it builds the model, optimizer and
schedule from the spec as `forge train` does (bench_train_step.build_trainer), records the peak RSS after
building, then runs two Trainer.train_step calls (the optimizer state exists from the first) and records the
peak again. The design's target: < 6 GB at batch 32, seq 512 on a 6 GB GPU. Writes
benchmarks/results/memory.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from common import ROOT, setup_threads, table, write_result

SPECS = {"phase1": "specs/phase1.toml", "baseline (AdamW)": "specs/baseline.toml", "tiny": "specs/tiny.toml"}


def peak_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9   # ru_maxrss is KiB on Linux


def child(spec: str, batch: int) -> None:
    from bench_train_step import build_trainer

    trainer = build_trainer(spec, [f"data.batch_size={batch}"])
    built = peak_gb()
    for _ in range(2):
        trainer.train_step(collect=False)
    print(json.dumps({"seq_len": trainer.spec.data.seq_len, "after_build_gb": built, "peak_gb": peak_gb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny spec only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_threads(args.threads)
    if args.child:
        return child(args.child, args.batch)
    results = {}
    for name, spec in ({"tiny": SPECS["tiny"]} if args.quick else SPECS).items():
        batch = 8 if name == "tiny" else args.batch
        out = subprocess.run([sys.executable, __file__, "--child", spec, "--batch", str(batch),
                              "--threads", str(args.threads)], cwd=ROOT, capture_output=True, text=True, check=True)
        results[name] = {"spec": spec, "batch": batch, **json.loads(out.stdout.strip().splitlines()[-1])}
    device = "CUDA max_memory_allocated" if torch.cuda.is_available() else "CPU peak RSS"
    print(table(["spec", "batch x seq", f"{device} after build (GB)", "peak over 2 steps (GB)"],
                [[k, f"{v['batch']}x{v['seq_len']}", f"{v['after_build_gb']:.2f}",
                  f"{v['peak_gb']:.2f}"] for k, v in results.items()]))
    write_result("memory_quick" if args.quick else "memory", {"measure": device, "results": results})


if __name__ == "__main__":
    main()
