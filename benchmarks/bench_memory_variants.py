"""Cost of each long-term-memory variant ([model.memory]): the memory path alone and the whole training step.

    .venv/bin/python benchmarks/bench_memory_variants.py [--spec specs/tiny.toml] [--threads 2] [--rounds 5]
                                                         [--quick] [--device cpu|cuda|auto]

Per variant (the spec as given, then with the overrides of VARIANTS): "memory fwd+bwd" is NeuralMemory's
forward and the backward of its output's sum on fixed random inputs (batch x seq_len x d_model, the spec's
shapes; the memory reads the same shape whatever input_layer says); "train step" is
forge.train.loop.Trainer.train_step(collect=False), the step `forge train` runs between logging steps, built
as bench_train_step.build_trainer builds it (random tokens, fp32 on CPU). Cases interleave round by round
(common.interleaved); medians of --rounds rounds after one warm-up round, and each median's ratio to the
spec's own (first) variant, measured in the same process. (bench_memory.py measures peak RAM, not this.)
Writes benchmarks/results/memory_variants.json (memory_variants_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from bench_train_step import build_trainer
from common import add_device_option, device_sync, interleaved, resolve_device, setup_threads, table, write_result

TITANS = ["model.memory.gates=data_dependent", "model.memory.conv_kernel=4", "model.memory.qkv_activation=silu"]
VARIANTS = {
    "as specified": [],
    "linear + Titans options": TITANS,
    "mlp (depth 2)": ["model.memory.variant=mlp"],
    "mlp + Titans options": ["model.memory.variant=mlp", *TITANS],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/tiny.toml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    add_device_option(parser)
    args = parser.parse_args()
    setup_threads(args.threads)
    device = resolve_device(args.device)
    rounds = 2 if args.quick else args.rounds
    precision = [] if device.type == "cuda" else ["train.precision=fp32"]
    cases, specs = {}, {}
    for name, overrides in VARIANTS.items():
        trainer = build_trainer(args.spec, [*overrides, *precision], device)
        spec = trainer.spec
        memory = trainer.parts.model.memory
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(spec.data.batch_size, spec.data.seq_len, spec.model.d_model, generator=gen).to(device)
        h.requires_grad_(True)

        def memory_path(memory=memory, h=h):
            out, _ = memory(h)
            out.sum().backward()

        cases[f"{name}: memory"] = memory_path
        cases[f"{name}: step"] = lambda trainer=trainer: trainer.train_step(collect=False)
        specs[name] = {"overrides": overrides, "memory_parameters": sum(p.numel() for p in memory.parameters())}
    times = interleaved(cases, rounds, sync=device_sync(device))
    first = next(iter(VARIANTS))
    results, rows = {}, []
    for name in VARIANTS:
        mem, step = (statistics.median(times[f"{name}: {part}"]) for part in ("memory", "step"))
        results[name] = {**specs[name], "memory_fwd_bwd_s": mem, "train_step_s": step}
    base = results[first]
    for name, r in results.items():
        r["memory_ratio"] = r["memory_fwd_bwd_s"] / base["memory_fwd_bwd_s"]
        r["step_ratio"] = r["train_step_s"] / base["train_step_s"]
        rows.append([name, f"{r['memory_parameters']:,}", f"{1e3 * r['memory_fwd_bwd_s']:.1f}",
                     f"{r['memory_ratio']:.2f}x", f"{1e3 * r['train_step_s']:.1f}", f"{r['step_ratio']:.2f}x"])
    print(table(["variant", "memory params", "memory fwd+bwd (ms)", "vs first", "train step (ms)", "vs first"],
                rows))
    write_result("memory_variants" + ("_quick" if args.quick else ""),
                 {"spec": args.spec, "device": str(device), "rounds": rounds, "results": results})


if __name__ == "__main__":
    main()
