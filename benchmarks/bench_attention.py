"""Attention scaling: sliding-window attention time vs sequence length, against full causal attention.

    .venv/bin/python benchmarks/bench_attention.py [--threads 2] [--window 1024] [--rounds 3] [--quick]

Forward + backward of the attention core (scores, softmax, values; no projections) at the Phase 1 head
shape (batch 1, 8 heads of 64), T = 512 .. 8192, window 1024, three ways:
  sliding (model)    forge.model.window.AttentionPattern.layout as the model runs it: a dense band mask
                     below T = 8 windows, the blocked O(T w) layout from there
  sliding (blocked)  the blocked layout forced at every T > window
  full causal        SDPA is_causal over the whole sequence
Cases interleave per round; medians of --rounds. "x per doubling" = time(T) / time(T / 2): linear scaling
is 2.0, quadratic 4.0. Writes benchmarks/results/attention.json.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import interleaved, setup_threads, summary, table, write_result
from forge.model.window import AttentionPattern

HEADS, HEAD_DIM = 8, 64


def attention_fwd_bwd(pattern: AttentionPattern, T: int, blocked: bool | None):
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, HEADS, T, HEAD_DIM, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(1, HEADS, T, HEAD_DIM, generator=gen)

    def run():
        layout = pattern.layout(q, k, v, blocked=blocked)
        out = layout.merge([F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=p.mask, is_causal=p.mask is None)
                            for p in layout.pieces])
        (out * grad).sum().backward()
        q.grad = k.grad = v.grad = None
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="window 64, T 128..512, one round")
    args = parser.parse_args()
    setup_threads(args.threads)
    window = 64 if args.quick else args.window
    lengths = [128, 256, 512] if args.quick else [512, 1024, 2048, 4096, 8192]
    sliding = AttentionPattern("sliding_window", window, 16, 64)
    full = AttentionPattern("full", window, 16, 64)
    kinds = {"sliding (model)": (sliding, None), "sliding (blocked)": (sliding, True), "full causal": (full, None)}
    cases = {f"{kind}|{T}": attention_fwd_bwd(p, T, blocked if T > window else None)
             for T in lengths for kind, (p, blocked) in kinds.items()}
    times = interleaved(cases, 1 if args.quick else args.rounds, warmup=1)
    res = {kind: {T: summary(times[f"{kind}|{T}"]) for T in lengths} for kind in kinds}
    rows = []
    for T in lengths:
        row = [T]
        for kind in kinds:
            med = res[kind][T]["median_s"]
            prev = res[kind].get(T // 2)
            row += [f"{med * 1e3:.0f}", f"{med / prev['median_s']:.2f}" if prev else ""]
        rows.append(row)
    header = ["T"] + [h for kind in kinds for h in (f"{kind} (ms)", "x per doubling")]
    print(f"window {window}, {HEADS} heads x {HEAD_DIM}, batch 1, forward + backward")
    print(table(header, rows))
    write_result("attention_quick" if args.quick else "attention",
                 {"threads": args.threads, "window": window, "heads": HEADS, "head_dim": HEAD_DIM,
                  "results": {kind: {str(T): s for T, s in r.items()} for kind, r in res.items()}})


if __name__ == "__main__":
    main()
