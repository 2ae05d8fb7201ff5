"""The memory levers of the phase1 step against its time, interleaved in one process: the fused, chunked
cross-entropy (forge.model.loss) and gradient checkpointing (train.gradient_checkpointing).

    python3 benchmarks/bench_memory_levers.py [--batch 32] [--rounds 5]   # results/memory_levers_cuda.json

For every case: step time (median of the interleaved rounds) and the step's peak allocation over what was
resident before it, plus one trainer's resident weights and optimizer state (= the peak a process holding
only that case would reach). CUDA only: on CPU the peak RSS of a process never goes down, so use
bench_memory.py there. The design's target: < 6 GB at batch 32, seq 512.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from bench_train_step import build_trainer, cuda_step_memory
from common import device_sync, interleaved, resolve_device, setup_threads, table, write_result

from forge.model import model as model_module

CASES = {   # name: (fused cross-entropy on this device, gradient checkpointing)
    "plain head": (False, "off"),
    "fused CE": (True, "off"),
    "checkpoint backbone": (False, "backbone"),
    "checkpoint backbone+TRM": (False, "backbone_and_trm"),
    "fused CE + checkpoint backbone+TRM": (True, "backbone_and_trm"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_threads(args.threads)
    device = resolve_device("cuda")
    plain = model_module.FUSED_CE_DEVICES
    trainers, steps = {}, {}
    for name, (fused, checkpointing) in CASES.items():
        trainers[name] = build_trainer("specs/phase1.toml", [f"data.batch_size={args.batch}",
                                                             f"train.gradient_checkpointing={checkpointing}"], device)

        def step(name=name, fused=fused):
            model_module.FUSED_CE_DEVICES = (device.type,) if fused else plain
            trainers[name].train_step(collect=False)
        steps[name] = step
    resident = torch.cuda.memory_allocated(device) / len(trainers) / 1e9
    times = interleaved(steps, args.rounds, sync=device_sync(device))
    results, rows = {}, []
    for name, (fused, _) in CASES.items():
        model_module.FUSED_CE_DEVICES = (device.type,) if fused else plain
        memory = cuda_step_memory(trainers[name])
        median = statistics.median(times[name])
        results[name] = {"step_median_s": median, "step_min_s": min(times[name]), **memory,
                         "alone_peak_gb": resident + memory["step_peak_over_resident_gb"]}
        rows.append([name, f"{median:.3f}", f"{min(times[name]):.3f}",
                     f"{args.batch * trainers[name].spec.data.seq_len / median:,.0f}", f"{results[name]['alone_peak_gb']:.2f}"])
    model_module.FUSED_CE_DEVICES = plain
    print(table(["case (phase1, bf16)", "step (s)", "min (s)", "tokens/s", "peak alone (GB)"], rows))
    write_result("memory_levers_cuda", {"batch": args.batch, "seq_len": 512, "rounds": args.rounds,
                                                   "resident_per_trainer_gb": resident, "cases": results})


if __name__ == "__main__":
    main()
