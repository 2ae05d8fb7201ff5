"""ACT compute saving at evaluation (issue 21): the refiner time saved by frozen halted tokens
(act.freeze_halted) against the ideal saving, the share of refiner token-work skipped, at several halt shares.

The model is a spec's (random weights from a fixed seed). The halting head gets a random weight and a bias
set from the quantiles of its step-0 logits so that a chosen share of tokens halts at step 0 (the rest may
halt later). Per halt share, interleaved in one process:
  full     the TRM outer steps with the halting rule as today: every token is refined at every step that
           runs (steps stop only once every token halted)
  frozen   the same with act.freeze_halted: later steps refine only the running tokens
Timed: the TRM outer steps with the halting head (the refiner's work), given the backbone output x; and,
for context, the whole evaluation forward (backbone, memory, LM head of every step included).
ideal saving = 1 - act/compute_share; measured saving = median over rounds of 1 - t_frozen / t_full, the two
timed back to back in the same round (a paired ratio: background load on a shared machine moves both
alike), in alternating order (full first, then frozen first: measured, the call that runs second after the
other is slowed or sped up by what the first left in caches and the heap); ratio = measured / ideal (target
>= 0.7). The fastest round of each case, and the ratio of the median times, are recorded too.
Each call is timed on two clocks: wall time, and the process's CPU time (time.process_time). With one torch
thread (the default) the CPU time is the work itself, without the time other processes held the core: on a
loaded machine the wall-clock ratio swings by +-0.2 from round to round, the CPU-time ratio far less.
Freed memory is kept for reuse (glibc mallopt; --default-malloc: as glibc comes): otherwise glibc hands freed
blocks back to the system and every call takes fresh pages, one minor page fault per 4 KB (expensive on this
VM), and because both paths share one heap, which of them pays depends on the other's allocations (measured:
the full path 700 to 12,500 faults a call from one run to the next, the frozen one 1,500 to 5,700). The
minor faults during the timed rounds are recorded.
Executed work (issue 21: what the code runs, next to what it costs): one call of each path under
torch.utils.flop_counter.FlopCounterMode, the FLOPs of the refiner's feed-forward and query projections
(forward hooks read the counter on entry and exit of those modules) and of the whole refiner with its
attention. torch has no formula for the CPU attention kernel (aten._scaled_dot_product_flash_attention_for_cpu):
it gets torch's own for the other attention kernels, every query slot of a call against every key of the call
(the padded slots of the frozen layout included; a causal call, the full path at phase1 width, skips the keys
after each block of queries and is counted whole). executed saving = 1 - frozen / full FLOPs; for the
feed-forward and query work it should equal the ideal saving.

    .venv/bin/python benchmarks/bench_act_compute.py [--spec tiny.toml] [--batch 8] [--seq 128]
        [--shares 0.25,0.5,0.75,0.9] [--rounds 7] [--threads 1] [--refiner-only] [--default-malloc] [--tag T]
        [--quick]
    # -> benchmarks/results/act_compute_<spec>[_<tag>].json
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import os
import resource
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from common import ROOT, WARMUP_ROUNDS, interleaved, setup_threads, table, write_result

from forge.model import build_model
from forge.model.trm import FrozenTokens
from forge.spec.load import load_spec


def halting_head_for_share(model, x, rope, share: float, seed: int = 0) -> None:
    """Random head weight; the bias that makes `share` of the tokens halt at step 0."""
    head, act = model.trm.act, model.spec.act
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(head.weight.numel()))
        y, z = next(iter(model.trm.steps(x, rope)))
        raw = (y if act.head_input == "answer" else z) @ head.weight
        cut = torch.quantile(raw.flatten().float(), 1 - share) if share > 0 else raw.max() + 1
        head.bias.fill_(math.log(act.halt_thresh / (1 - act.halt_thresh)) - float(cut) + 1e-4)


def outer_steps(model, x, rope, frozen: FrozenTokens | None) -> torch.Tensor:
    """The TRM steps with the evaluation halting rule (as CognateModel.forward); returns each token's step."""
    trm, act = model.trm, model.spec.act
    halted = torch.zeros(x.shape[:2], dtype=torch.bool)
    used = torch.full(x.shape[:2], trm.t_max - 1)
    for t, (y, z) in enumerate(trm.steps(x, rope, frozen)):
        stop = (torch.sigmoid(trm.act(y if act.head_input == "answer" else z)) > act.halt_thresh) | (t == trm.t_max - 1)
        used = torch.where(stop & ~halted, t, used)
        halted = halted | stop
        if frozen is not None:
            frozen.running = ~halted
        elif bool(halted.all()):
            break
    return used


def executed_flops(model, run) -> dict[str, int]:
    """FLOPs of one call of `run` (FlopCounterMode on the real call): "ffn_query", the refiner's feed-forward and
    query projections; "refiner", everything counted (the refiner's projections, feed-forward and attention)."""
    blocks = model.trm.net.blocks
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)})
    inside = {"ffn_query": 0}

    def enter(module, args):
        module.flops_on_entry = counter.get_total_flops()

    def leave(module, args, out):
        inside["ffn_query"] += counter.get_total_flops() - module.flops_on_entry

    hooks = [h for m in [b.ffn for b in blocks] + [b.attn.q_proj for b in blocks]
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with counter:
            run()
    finally:
        for h in hooks:
            h.remove()
    return {**inside, "refiner": counter.get_total_flops()}


def keep_freed_memory() -> bool:
    """glibc: never trim the heap, serve every size from it (no mmap per allocation), so that freed memory is
    reused instead of returned and faulted in again. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(M_MMAP_THRESHOLD, 1 << 25))
    except (OSError, AttributeError):
        return False


def paired_saving(times: dict[str, list[float]], part: str) -> float | None:
    """Median over rounds of 1 - t_frozen / t_full (None when the part was not timed)."""
    if f"{part}_full" not in times:
        return None
    return statistics.median(1 - f / a for f, a in zip(times[f"{part}_frozen"], times[f"{part}_full"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="tiny.toml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--shares", default="0.25,0.5,0.75,0.9")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refiner-only", action="store_true", help="time the refiner only, not the whole forward")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's trimming of freed memory on")
    parser.add_argument("--tag", default="", help="appended to the result's name (e.g. the CPU capability forced)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, batch 2, two shares")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch, args.shares = 2, 2, "0.5,0.9"
    setup_threads(args.threads)
    kept_freed = False if args.default_malloc else keep_freed_memory()
    spec = load_spec(ROOT / "specs" / args.spec).spec
    torch.manual_seed(0)
    models = {}
    for name, freeze in (("full", False), ("frozen", True)):
        act = spec.model.act.model_copy(update={"freeze_halted": freeze})
        torch.manual_seed(0)
        models[name] = build_model(spec.model.model_copy(update={"act": act}), spec.objective).eval()
    models["frozen"].load_state_dict(models["full"].state_dict())
    idx = torch.randint(0, spec.model.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    rows, figures = [], []
    with torch.no_grad():
        rope = models["full"].rope(args.seq, idx.device)
        x = models["full"].encode(idx, rope)[0]
        for share in (float(s) for s in args.shares.split(",")):
            for model in models.values():
                halting_head_for_share(model, x, rope, share)
            frozen_used = outer_steps(models["frozen"], x, rope, probe := FrozenTokens(*idx.shape, idx.device))
            per_app = idx.numel() * (1 + models["frozen"].trm.micro_steps)
            compute_share = probe.applied / (models["frozen"].trm.t_max * per_app)
            cases = {"refiner_full": lambda: outer_steps(models["full"], x, rope, None),
                     "refiner_frozen": lambda: outer_steps(models["frozen"], x, rope,
                                                           FrozenTokens(*idx.shape, idx.device))}
            if not args.refiner_only:
                cases.update({"forward_full": lambda: models["full"](idx, halt=True),
                              "forward_frozen": lambda: models["frozen"](idx, halt=True)})
            flops = {name: executed_flops(models[name], cases[f"refiner_{name}"]) for name in ("full", "frozen")}
            executed = {part: 1 - flops["frozen"][part] / flops["full"][part] for part in ("ffn_query", "refiner")}
            cpu_times: dict[str, list[float]] = {}
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            clocks = {"wall": interleaved(cases, args.rounds, cpu_times=cpu_times, alternate=True), "cpu": cpu_times}
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            ideal = 1 - compute_share
            halted_early = float((frozen_used < models["frozen"].trm.t_max - 1).float().mean())
            fig = {"target_share_step0": share, "halted_early_share": halted_early,
                   "compute_share": compute_share, "ideal_saving": ideal, "flops": flops,
                   "executed_saving": executed,
                   "minor_faults_per_call": faults / ((args.rounds + WARMUP_ROUNDS) * len(cases))}
            for clock, times in clocks.items():
                best = {k: min(v) for k, v in times.items()}
                measured, forward_saving = (paired_saving(times, part) for part in ("refiner", "forward"))
                fig[clock] = {"refiner_saving": measured, "ratio": measured / ideal if ideal > 0 else None,
                              "forward_saving": forward_saving, "min_s": best,
                              "median_s": {k: statistics.median(v) for k, v in times.items()},
                              "fastest_round_ratio": (1 - best["refiner_frozen"] / best["refiner_full"]) / ideal
                              if ideal > 0 else None,
                              "median_time_ratio": (1 - statistics.median(times["refiner_frozen"])
                                                    / statistics.median(times["refiner_full"])) / ideal
                              if ideal > 0 else None, "times_s": times}
            figures.append(fig)
            wall, cpu = fig["wall"], fig["cpu"]
            rows.append([f"{halted_early:.2f}", f"{compute_share:.3f}", f"{ideal:.3f}",
                         f"{executed['ffn_query']:.3f}", f"{executed['refiner']:.3f}",
                         f"{cpu['median_s']['refiner_full'] * 1e3:.1f}", f"{cpu['median_s']['refiner_frozen'] * 1e3:.1f}",
                         f"{cpu['refiner_saving']:.3f}", f"{cpu['ratio']:.2f}" if ideal > 0 else "-",
                         f"{wall['ratio']:.2f}" if ideal > 0 else "-",
                         "-" if cpu["forward_saving"] is None else f"{cpu['forward_saving']:.3f}"])
    print(table(["halted early", "compute share", "ideal saving", "executed saving, FFN + query FLOPs",
                 "executed saving, refiner FLOPs", "refiner full, CPU ms", "refiner frozen, CPU ms",
                 "refiner saving (CPU)", "ratio (CPU)", "ratio (wall)", "whole-forward saving (CPU)"], rows))
    name = f"act_compute_{args.spec.removesuffix('.toml')}" + (f"_{args.tag}" if args.tag else "") + \
        ("_quick" if args.quick else "")
    write_result(name, {"spec": args.spec, "batch": args.batch, "seq_len": args.seq, "threads": args.threads,
                        "rounds": args.rounds, "freed_memory_kept": kept_freed,
                        "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
                                if k in os.environ}, "figures": figures})


if __name__ == "__main__":
    main()
