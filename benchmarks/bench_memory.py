"""Peak memory of a training step at batch 32, seq 512: peak RSS on CPU (CUDA max_memory_allocated on a GPU).

    .venv/bin/python benchmarks/bench_memory.py [--batch 32] [--threads 2] [--quick] [--device cpu|cuda|auto]

One fresh process per measurement (a process's peak RSS never goes down): it builds the model, optimizer and
schedule from the spec as `forge train` does (bench_train_step.build_trainer), records the peak RSS after
building, then runs two Trainer.train_step calls (the optimizer state exists from the first) and records the
peak again. On CUDA (--device cuda, results/memory_cuda.json) the model and batches live on the GPU, each
spec trains in its own precision (phase1: bf16 autocast) and the peak is torch.cuda.max_memory_allocated;
on CPU every spec trains in fp32 (the CPU specs' precision). The design's target: < 6 GB at batch 32, seq 512 on a 6 GB GPU. Writes
benchmarks/results/memory.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from common import ROOT, add_device_option, resolve_device, setup_threads, table, write_result

SPECS = {"phase1": "specs/phase1.toml", "baseline (AdamW)": "specs/baseline.toml", "tiny": "specs/tiny.toml"}


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9   # ru_maxrss is KiB on Linux


def child(spec: str, batch: int, device: torch.device) -> None:
    from bench_train_step import build_trainer

    precision = [] if device.type == "cuda" else ["train.precision=fp32"]
    trainer = build_trainer(spec, [f"data.batch_size={batch}", *precision], device)
    built = peak_gb(device)
    for _ in range(2):
        trainer.train_step(collect=False)
    print(json.dumps({"seq_len": trainer.spec.data.seq_len, "precision": trainer.spec.train.precision,
                      "after_build_gb": built, "peak_gb": peak_gb(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny spec only")
    add_device_option(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_threads(args.threads)
    device = resolve_device(args.device)
    if args.child:
        return child(args.child, args.batch, device)
    results = {}
    for name, spec in ({"tiny": SPECS["tiny"]} if args.quick else SPECS).items():
        batch = 8 if name == "tiny" else args.batch
        out = subprocess.run([sys.executable, __file__, "--child", spec, "--batch", str(batch),
                              "--threads", str(args.threads), "--device", device.type],
                             cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name}: the measuring process failed\n{out.stderr}")
        results[name] = {"spec": spec, "batch": batch, **json.loads(out.stdout.strip().splitlines()[-1])}
    measure = "CUDA max_memory_allocated" if device.type == "cuda" else "CPU peak RSS"
    print(table(["spec", "precision", "batch x seq", f"{measure} after build (GB)", "peak over 2 steps (GB)"],
                [[k, v["precision"], f"{v['batch']}x{v['seq_len']}", f"{v['after_build_gb']:.2f}",
                  f"{v['peak_gb']:.2f}"] for k, v in results.items()]))
    name = "memory" + ("_cuda" if device.type == "cuda" else "") + ("_quick" if args.quick else "")
    write_result(name, {"measure": measure, "device": str(device), "results": results})


if __name__ == "__main__":
    main()
