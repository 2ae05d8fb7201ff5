"""Roofline: the machine's measured matmul peak, and the model FLOPs per token counted from the spec.

    .venv/bin/python benchmarks/bench_roofline.py [--threads 2] [--quick]

Peak: fp32 (and bf16) square matmuls of n = 1024 (what `forge train` uses for perf/mfu), 2048 and 4096,
median and best of interleaved repeats. Model FLOPs: counted analytically from the spec's [model] section
(`model_flops_per_token`: every matmul of the forward, the attention over the keys each query actually
attends to under the window, times 3 for forward + backward) and cross-checked against torch's FLOP counter
(forge.train.perf.FlopCounter) on a real forward + backward of the model built from the same spec. Writes
benchmarks/results/roofline.json.
"""
from __future__ import annotations

import argparse

import torch

from common import interleaved, setup_threads, summary, table, write_result
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


def matmul_peaks(sizes: list[int], rounds: int) -> dict[str, dict]:
    cases, flops = {}, {}
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n in sizes:
            a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
            name = f"{str(dtype).removeprefix('torch.')} n={n}"
            cases[name] = lambda a=a, b=b: torch.mm(a, b)
            flops[name] = 2 * n ** 3
    out = {}
    for name, seconds in interleaved(cases, rounds, warmup=1).items():
        s = summary(seconds)
        out[name] = {**s, "gflops_median": flops[name] / s["median_s"] / 1e9,
                     "gflops_best": flops[name] / s["min_s"] / 1e9}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small matmuls, tiny specs only (seconds)")
    args = parser.parse_args()
    setup_threads(args.threads)

    peaks = matmul_peaks([256, 512] if args.quick else [1024, 2048, 4096], rounds=3 if args.quick else 7)
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
    write_result("roofline_quick" if args.quick else "roofline", {"matmul": peaks, "models": models})


if __name__ == "__main__":
    main()
