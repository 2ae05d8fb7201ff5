"""Roofline: the machine's measured matmul peak, and the model FLOPs per token counted from the spec.

    .venv/bin/python benchmarks/bench_roofline.py [--threads 2] [--quick] [--device cpu|cuda|auto]

Peak: fp32 (and bf16) square matmuls of n = 1024 (what `forge train` uses for perf/mfu), 2048 and 4096,
median and best of interleaved repeats. On CUDA (--device cuda; results/roofline_cuda.json): n = 4096 and
8192 in fp32 with TF32 off (torch's default), fp32 with TF32 allowed, and bf16, each timing between
torch.cuda.synchronize() calls. Model FLOPs: counted analytically from the spec's [model] section
(`model_flops_per_token`: every matmul of the forward, the attention over the keys each query actually
attends to under the window, times 3 for forward + backward) and cross-checked against torch's FLOP counter
(forge.train.perf.FlopCounter) on a real forward + backward of the model built from the same spec, on CPU
whatever --device (a count, not a timing; on CPU the counter's blind spot, attention, is known). Writes
benchmarks/results/roofline.json.
"""
from __future__ import annotations

import argparse

import torch

from common import (add_device_option, device_sync, interleaved, resolve_device, setup_threads, summary, table,
                    write_result)
from forge.model import build_model
from forge.model.flops import mean_attended_keys, model_flops_per_token
from forge.optim import set_max_logit_tracking
from forge.spec.load import load_spec
from forge.train.perf import FlopCounter

SPECS = ("specs/phase1.toml", "specs/baseline.toml", "specs/tiny.toml", "specs/tiny_baseline_local.toml")


def counted_flops_per_token(model, seq_len: int, batch: int, vocab: int, track_max_logit: bool) -> float:
    """torch's FLOP counter over one forward + backward (matmuls, SDPA), per token."""
    set_max_logit_tracking(model, track_max_logit)
    idx = torch.randint(vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with FlopCounter() as counter:
        model(idx, idx.roll(-1, dims=1)).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.total / idx.numel()


def matmul_peaks(sizes: list[int], rounds: int, device: torch.device = torch.device("cpu")) -> dict[str, dict]:
    """GFLOP/s of square matmuls per dtype and size; on CUDA fp32 twice: TF32 off (torch's default) and on."""
    cases, flops = {}, {}
    gen = torch.Generator().manual_seed(0)
    variants = [("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None)]
    if device.type == "cuda":
        variants = [("float32", torch.float32, False), ("float32 TF32", torch.float32, True),
                    ("bfloat16", torch.bfloat16, None)]
    for label, dtype, tf32 in variants:
        for n in sizes:
            a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
            b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
            name = f"{label} n={n}"

            def run(a=a, b=b, tf32=tf32):
                if tf32 is not None:            # set per case: the cases interleave
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                torch.mm(a, b)
            cases[name] = run
            flops[name] = 2 * n ** 3
    out = {}
    times = interleaved(cases, rounds, warmup=1, sync=device_sync(device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    for name, seconds in times.items():
        s = summary(seconds)
        out[name] = {**s, "gflops_median": flops[name] / s["median_s"] / 1e9,
                     "gflops_best": flops[name] / s["min_s"] / 1e9}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small matmuls, tiny specs only (seconds)")
    add_device_option(parser)                   # where the matmul peaks are measured
    args = parser.parse_args()
    setup_threads(args.threads)
    device = resolve_device(args.device)

    if device.type == "cuda":
        sizes = [1024, 2048] if args.quick else [4096, 8192]
    else:
        sizes = [256, 512] if args.quick else [1024, 2048, 4096]
    peaks = matmul_peaks(sizes, rounds=3 if args.quick else 7, device=device)
    print(table(["matmul", "median GFLOP/s", "best GFLOP/s"],
                [[k, f"{v['gflops_median']:.0f}", f"{v['gflops_best']:.0f}"] for k, v in peaks.items()]))
    models = {}
    for path in SPECS[2:] if args.quick else SPECS:
        spec = load_spec(path).spec
        T = spec.data.seq_len
        analytic = model_flops_per_token(spec.model, T)
        torch.manual_seed(0)
        model = build_model(spec.model, spec.objective)
        counted = counted_flops_per_token(model, T, 1, spec.model.vocab_size, track_max_logit=False)
        tracked = counted_flops_per_token(model, T, 1, spec.model.vocab_size, track_max_logit=True) \
            if spec.optim.qk_clip.enabled else counted
        models[path] = {"seq_len": T, "params": sum(p.numel() for p in model.parameters()),
                        "mean_attended_keys": mean_attended_keys(spec.model, T),
                        "analytic_flops_per_token": analytic, "counted_flops_per_token": counted,
                        "counted_with_max_logit_tracking": tracked, "counted_over_analytic": counted / analytic["total"],
                        "counted_over_analytic_without_attention": counted / (analytic["total"] - analytic["attention"])}
    print(table(["spec", "seq", "params", "analytic MFLOP/token", "of it attention", "torch counter",
                 "counter / analytic", "counter / analytic w/o attention", "with QK-clip max-logit"],
                [[p, m["seq_len"], f"{m['params']:,}", f"{m['analytic_flops_per_token']['total'] / 1e6:.1f}",
                  f"{m['analytic_flops_per_token']['attention'] / 1e6:.1f}",
                  f"{m['counted_flops_per_token'] / 1e6:.1f}", f"{m['counted_over_analytic']:.3f}",
                  f"{m['counted_over_analytic_without_attention']:.4f}",
                  f"{m['counted_with_max_logit_tracking'] / 1e6:.1f}"] for p, m in models.items()]))
    name = "roofline" + ("_cuda" if device.type == "cuda" else "") + ("_quick" if args.quick else "")
    write_result(name, {"device": str(device), "matmul": peaks, "models": models})


if __name__ == "__main__":
    main()
