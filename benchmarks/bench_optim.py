"""Optimizer step time on the Phase 1 parameter shapes: MuonGrokfast (k = 3, 5) vs torch AdamW (foreach).

    .venv/bin/python benchmarks/bench_optim.py [--spec specs/phase1.toml] [--steps 10] [--threads 2]

Parameters come from the real model built from the spec (forge.model); gradients are fixed random
tensors, so every optimizer does exactly the same work. The cases run interleaved (one step of each per
round) so that background load hits them alike; after 2 warm-up rounds, --steps timed rounds give the
median (and min) per case. "NS share" = the time of orthogonalising the same Muon matrices alone over
the MuonGrokfast step time; "NS GFLOP/s" = its matmul rate. Setting the gradients (a copy, the same in
every case) is timed separately and subtracted. Writes benchmarks/results/optim.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from common import interleaved
from forge.model import build_model
from forge.optim import build_optimizer
from forge.optim.newton_schulz import DTYPES, orthogonalize
from forge.spec.load import load_spec

RESULTS = Path(__file__).resolve().parent / "results" / "optim.json"


def newton_schulz_flops(shapes: list[torch.Size], k: int) -> int:
    """Matmul FLOPs of k quintic iterations: per iteration X X^T, A A, (bA + cA^2) X on the wide orientation."""
    total = 0
    for rows, cols in shapes:
        m, n = min(rows, cols), max(rows, cols)
        total += k * (4 * m * m * n + 2 * m ** 3)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/phase1.toml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="specs/tiny.toml, 2 steps, writes optim_quick.json")
    args = parser.parse_args()
    if args.quick:
        args.spec, args.steps = "specs/tiny.toml", 2
    torch.set_num_threads(args.threads)

    resolved = load_spec(args.spec)
    spec = resolved.spec
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]

    def with_grads(step):
        def run():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            step()
        return run

    adamw = torch.optim.AdamW(params, lr=spec.optim.lr, betas=tuple(spec.optim.adamw.betas),
                              eps=spec.optim.adamw.eps, weight_decay=spec.optim.weight_decay, foreach=True)
    cases = {"grad copy": with_grads(lambda: None), "torch AdamW (foreach)": with_grads(adamw.step)}
    m = spec.optim.muon
    for k in (3, 5):
        opt = build_optimizer(load_spec(args.spec, [f"optim.muon.ns_steps={k}"]).spec.optim, model)
        in_muon = {id(q) for group in opt.muon.param_groups for q in group["params"]}
        muon_grads = [g for p, g in zip(params, grads) if id(p) in in_muon]
        cases[f"MuonGrokfast k={k}"] = with_grads(opt.step)
        ns_dtype = DTYPES[opt.muon.param_groups[0]["ns_dtype"]]       # as built (auto resolved)
        cases[f"Newton-Schulz k={k}"] = (lambda k=k, dt=ns_dtype: orthogonalize(muon_grads, k, m.use_svd, dt))
    times = interleaved(cases, args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    copy_s = median.pop("grad copy")
    base = median["torch AdamW (foreach)"] - copy_s
    rows = {}
    for name in ("torch AdamW (foreach)", "MuonGrokfast k=3", "MuonGrokfast k=5"):
        step_s = median[name] - copy_s
        row = {"step_s": step_s, "min_step_s": min(times[name]) - copy_s, "vs_adamw": step_s / base}
        if name.startswith("Muon"):
            ns_s = median[name.replace("MuonGrokfast", "Newton-Schulz")]
            flops = newton_schulz_flops([g.shape for g in muon_grads], int(name[-1]))
            row.update(newton_schulz_s=ns_s, newton_schulz_share=ns_s / step_s,
                       newton_schulz_gflops=flops / ns_s / 1e9)
        rows[name] = row

    result = {
        "command": f".venv/bin/python benchmarks/bench_optim.py --spec {args.spec} --steps {args.steps} "
                   f"--threads {args.threads}",
        "machine": f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}",
        "spec": args.spec, "spec_hash": resolved.hash,
        "params_total": sum(p.numel() for p in params), "params_muon": sum(g.numel() for g in muon_grads),
        "muon_matrices": len(muon_grads), "grad_copy_s": copy_s, "rows": rows,
    }
    path = RESULTS.with_name("optim_quick.json") if args.quick else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['params_total']:,} parameters ({result['params_muon']:,} in {len(muon_grads)} Muon matrices); "
          f"{result['machine']}; median of {args.steps} interleaved steps")
    print("| optimizer | step (ms) | min (ms) | vs AdamW | Newton-Schulz (ms) | NS share | NS GFLOP/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        ns_ms = f"{row['newton_schulz_s'] * 1e3:.0f}" if "newton_schulz_s" in row else ""
        share = f"{row['newton_schulz_share']:.0%}" if "newton_schulz_share" in row else ""
        rate = f"{row['newton_schulz_gflops']:.0f}" if "newton_schulz_gflops" in row else ""
        print(f"| {name} | {row['step_s'] * 1e3:.0f} | {row['min_step_s'] * 1e3:.0f} | {row['vs_adamw']:.1f}x | "
              f"{ns_ms} | {share} | {rate} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
