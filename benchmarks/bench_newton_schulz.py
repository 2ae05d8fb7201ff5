"""Newton-Schulz options for the bf16 step (issue 18): fp32 or bf16, one matrix at a time or same-shape matrices
batched, on the Muon matrices of the real phase1 model; cases interleaved round by round in one process.

    .venv/bin/python benchmarks/bench_newton_schulz.py [--spec specs/phase1.toml] [--rounds 5] [--threads 2]

Accuracy against fp32 one by one (the reference): the largest relative Frobenius difference over the matrices,
and the singular values of one matrix per shape (the quintic band after k = 3 steps). bf16 pays only where
the CPU computes bf16 natively (the result records the CPU's flags); elsewhere it is refused by forge.
Writes benchmarks/results/newton_schulz.json.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import interleaved, setup_threads, table, write_result
from forge.model import build_model
from forge.optim.newton_schulz import newton_schulz, newton_schulz_many
from forge.optim.routing import route_parameters
from forge.spec.load import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/phase1.toml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="specs/tiny.toml, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.spec, args.rounds = "specs/tiny.toml", 1
    setup_threads(args.threads)
    spec = load_spec(args.spec).spec
    torch.manual_seed(0)
    model = build_model(spec.model, spec.objective)
    matrices = [p for g in route_parameters(spec.optim, model) if g.kind == "muon" for p in g.params]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in matrices]
    k = spec.optim.muon.ns_steps
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    cases = {}
    for name, dtype in dtypes.items():
        cases[f"{name} one by one"] = lambda dtype=dtype: [newton_schulz(g, k, dtype) for g in grads]
        cases[f"{name} batched"] = lambda dtype=dtype: newton_schulz_many(grads, k, dtype)
    times = interleaved(cases, args.rounds)
    reference = [newton_schulz(g, k, torch.float32) for g in grads]
    base = statistics.median(times["fp32 one by one"])
    results, rows = {}, []
    for name in cases:
        dtype = dtypes[name.split()[0]]
        out = newton_schulz_many(grads, k, dtype) if "batched" in name else [newton_schulz(g, k, dtype) for g in grads]
        diff = max(float((o - r).norm() / r.norm()) for o, r in zip(out, reference))
        seen, bands = set(), []
        for g, o in zip(grads, out):
            if tuple(g.shape) not in seen:
                seen.add(tuple(g.shape))
                s = torch.linalg.svdvals(o.float())
                bands.append((float(s.min()), float(s.max())))
        median = statistics.median(times[name])
        results[name] = {"median_s": median, "min_s": min(times[name]), "vs_fp32_one_by_one": median / base,
                         "max_rel_diff_vs_fp32": diff, "singular_value_range": [min(b[0] for b in bands),
                                                                                 max(b[1] for b in bands)]}
        rows.append([name, f"{median * 1e3:.0f}", f"{median / base:.2f}", f"{diff:.4f}",
                     f"[{results[name]['singular_value_range'][0]:.3f}, {results[name]['singular_value_range'][1]:.3f}]"])
    print(f"{len(grads)} Muon matrices of {args.spec}, k = {k}, {args.threads} threads, median of {args.rounds} rounds")
    print(table(["Newton-Schulz", "time (ms)", "vs fp32 one by one", "rel. diff vs fp32", "singular values"], rows))
    write_result("newton_schulz_quick" if args.quick else "newton_schulz",
                 {"spec": args.spec, "ns_steps": k, "matrices": len(grads), "threads": args.threads,
                  "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
