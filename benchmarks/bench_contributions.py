"""What each part of the Phase 1 stack contributes, on real data: ordinary `forge train` runs of each variant
(own run directory under runs/, checklist-gated), then one table from their metrics.jsonl.

    FORGE_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/bench_contributions.py \
        [--set stories|mixture ...] [--steps 1500] [--jobs 2] [--only [SET:]NAME ...] [--table-only]
    FORGE_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/bench_contributions.py --set stories \
        --equal-time MINUTES [--threads 1]

Variants (issue #21, item 5) per data set: the full stack with each memory variant, memory off, recursion off,
and the plain transformer baseline of the same parameter count. Every variant trains the same number of
steps at the same batch (equal tokens); `--jobs` runs train side by side, one torch thread each
(OMP_NUM_THREADS=1), so background load hits them alike. The table reads each run's last evaluation
(train.eval_every): valid bits/byte overall and per source, the contribution probes, ACT at evaluation. The
equal-wall-clock columns read each run at the same training time: the last eval whose training time (step
x tokens per step / the run's perf/tokens_per_sec) is not above the shortest variant's total. A run that already finished (status.json "finished") is not trained again, so
an interrupted invocation continues where it stopped. Writes benchmarks/results/contributions.json.

--equal-time MINUTES: the same variants (not the EXTRAS) at an equal wall-clock budget instead, through
`forge compare` (forge.compare: each variant an ordinary run, trained round-robin in one process, a slice
each until its next evaluation, until each has used MINUTES of training time, evaluation excluded, so the
machine's load hits every variant alike); the table adds each run's contribution probes at its last
evaluation. Rerunning continues the comparison (comparison id contrib-time-SET-MINUTESmin). Writes
benchmarks/results/contributions_equal_time.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, setup_threads, table, write_result
from forge.metrics.jsonl import read_metric_stream
from forge.train.run_dir import RunDir

# The full-stack variants share the ACT settings under test (#21 item 4): the halting head reads the answer
# state (as the TRM reference), the EMA teacher calibrates the target (act.ema_gain_tol), halted tokens stop
# costing refiner work at evaluation (act.freeze_halted). TITANS: the memory as the paper builds it (deep MLP
# memory, data-dependent momentum and forgetting, depthwise causal conv on q/k/v, SiLU, contextual input).
ACT = ["model.act.head_input=answer", "model.act.ema_gain_tol=0.01", "model.act.freeze_halted=true"]
CONTEXTUAL = ["model.memory.input_layer=1", "model.memory.conv_kernel=4", "model.memory.gates=data_dependent",
              "model.memory.qkv_activation=silu"]
TITANS = ["model.memory.variant=mlp", *CONTEXTUAL]   # = the shipped specs' memory; spelled out, as ACT is, so
# that a variant means what it meant when measured whatever the defaults become
# the memory as it was before #21: a linear map reading the token embeddings, fixed momentum and forgetting
LINEAR = ["model.memory.variant=linear", "model.memory.input_layer=0", "model.memory.conv_kernel=0",
          "model.memory.gates=fixed", "model.memory.qkv_activation=identity"]


EXTRAS = ("full, linear memory, contextual", "full, titans memory, grad on last cycle")   # trained last


def variants(spec: str, baseline: str, extra: bool) -> dict[str, tuple[str, list[str]]]:
    """name -> (spec, overrides) of one data set's comparison; `extra`: the EXTRAS full-stack variants too."""
    out = {"full, linear memory": (spec, [*ACT, *LINEAR]),
           "full, titans memory": (spec, [*ACT, *TITANS])}
    if extra:
        out["full, linear memory, contextual"] = (spec, [*ACT, *LINEAR, *CONTEXTUAL])
        out["full, titans memory, grad on last cycle"] = (spec, [*ACT, *TITANS, "model.trm.grad_cycles=last"])
    out.update({"memory off": (spec, [*ACT, "model.memory.enabled=false"]),
                "recursion off": (spec, [*ACT, *LINEAR, "model.trm.enabled=false"]),   # with the linear memory
                "baseline transformer": (baseline, [])})
    return out


# every run: an evaluation (with the contribution probes) every 100 steps, no merge preview (Phase 2's, not
# what is compared here)
SHARED = ["train.eval_every=100", "merge_preview.enabled=false"]
SETS = {"stories": variants("specs/tiny_stories_local.toml", "specs/tiny_stories_baseline_local.toml", True),
        "mixture": variants("specs/tiny_local.toml", "specs/tiny_baseline_local.toml", False)}
# the columns of the table: (header, metric of the last evaluation, format)
COLUMNS = [("valid bpb", "valid/bits_per_byte", "{:.3f}"),
           ("bpb, ACT halting", "valid/halt/bits_per_byte", "{:.3f}"),
           ("memory contribution", "valid/memory_contribution_bpb", "{:+.4f}"),
           ("recursion gain", "valid/recursion_gain_bpb", "{:+.4f}"),
           ("ACT avg steps", "valid/halt/avg_steps", "{:.2f}"),
           ("halted early", "valid/halt/halted_early_share", "{:.1%}"),
           ("refiner compute", "valid/halt/compute_share", "{:.1%}"),
           ("gate token spread", "valid/gate/token_spread", "{:.4f}")]


def run_id(set_name: str, variant: str, steps: int) -> str:
    return f"contrib-{set_name}-{variant.replace(',', '').replace(' ', '-')}-{steps}"


def completed(run: Path) -> bool:
    try:
        return json.loads((run / "status.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def command_for(spec: str, overrides: list[str], rid: str, steps: int, resume: bool) -> list[str]:
    """`forge train` of one variant. An ablation differs from the design on purpose (fewer parameters, another
    architecture: B1/B2 fail), so it launches with --force, which its lineage records."""
    forge = [sys.executable, "-m", "forge", "train"]
    if resume:
        return [*forge, "--resume", rid]
    sets = [a for o in [*overrides, *SHARED, f"train.max_steps={steps}"] for a in ("--set", o)]
    force = [] if rid.split("-")[2] == "full" else ["--force"]
    return [*forge, spec, "--run-id", rid, *sets, *force]


def train_all(jobs: list[tuple[str, list[str], str]], steps: int, parallel: int) -> None:
    """Start up to `parallel` runs at a time; an existing unfinished run is resumed, a finished one skipped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = [(spec, ov, rid) for spec, ov, rid in jobs if not completed(ROOT / "runs" / rid)]
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        # a run another process is training (its lock is held) takes a slot and waits at the end of the queue
        held = [job for job in pending if (ROOT / "runs" / job[2]).exists() and RunDir(ROOT / "runs" / job[2]).lock_held()]
        pending = [job for job in pending if job not in held] + held
        while pending and len(running) + len(held) < parallel and pending[0] not in held:
            spec, overrides, rid = pending.pop(0)
            if completed(ROOT / "runs" / rid):
                continue
            resume = (ROOT / "runs" / rid).exists()
            log = open(ROOT / "runs" / f"{rid}.log", "a", encoding="utf-8")
            print(f"{'resume' if resume else 'start'} {rid}", flush=True)
            running.append((rid, subprocess.Popen(command_for(spec, overrides, rid, steps, resume), cwd=ROOT,
                                                  env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(5)
        for rid, proc in list(running):
            if proc.poll() is not None:
                print(f"done {rid}: exit {proc.returncode}", flush=True)
                running.remove((rid, proc))


def evaluations(run: Path) -> list[dict]:
    """The records that carry an evaluation, each with "train_seconds": the training time up to that step,
    step x tokens per step / perf/tokens_per_sec (the run's measured throughput so far)."""
    if not (run / "metrics.jsonl").is_file():   # not trained (yet)
        return []
    data = RunDir(run).spec_data()["data"]
    per_step = data["batch_size"] * data["seq_len"]   # batch_size is the whole step (grad_accum splits it)
    return [{**rec, "train_seconds": rec["step"] * per_step / rec["perf/tokens_per_sec"]}
            for rec in read_metric_stream(run / "metrics.jsonl").records
            if "valid/bits_per_byte" in rec and rec.get("perf/tokens_per_sec")]


def summarise(set_name: str, variants: dict, steps: int) -> dict:
    evals = {name: evaluations(ROOT / "runs" / run_id(set_name, name, steps)) for name in variants}
    evals = {name: e for name, e in evals.items() if e}
    common = min(e[-1]["train_seconds"] for e in evals.values()) if evals else 0.0
    out = {}
    for name, e in evals.items():
        last = e[-1]
        at_time = [r for r in e if r["train_seconds"] <= common * 1.0001] or e[:1]
        sources = sorted({k.split("/")[1] for k in last if k.count("/") == 2 and k.startswith("valid/")
                          and k.endswith("/bits_per_byte") and not k.startswith("valid/halt/")})
        out[name] = {"run": run_id(set_name, name, steps), "spec": variants[name][0], "overrides": variants[name][1],
                     "steps": last["step"], "train_seconds": last["train_seconds"],
                     "last_eval": {k: v for k, v in last.items() if k.startswith(("valid/", "act/", "gate/",
                                                                                 "memory/", "eval/"))},
                     "per_source_bits_per_byte": {s: last[f"valid/{s}/bits_per_byte"] for s in sources},
                     "equal_time": {"seconds": common, "step": at_time[-1]["step"],
                                    "valid_bits_per_byte": at_time[-1]["valid/bits_per_byte"]}}
    return out


def render(set_name: str, summary: dict) -> str:
    header = ["variant", "steps", *[c[0] for c in COLUMNS], "per source bpb", "equal time: step", "bpb"]
    rows = []
    for name, v in summary.items():
        ev = v["last_eval"]
        rows.append([name, v["steps"], *[fmt.format(ev[key]) if key in ev else "-" for _, key, fmt in COLUMNS],
                     " ".join(f"{s} {b:.3f}" for s, b in v["per_source_bits_per_byte"].items()),
                     v["equal_time"]["step"], f"{v['equal_time']['valid_bits_per_byte']:.3f}"])
    return f"{set_name}:\n" + table(header, rows)


# at equal time the steps each variant reaches are unknown in advance: a constant lr after the spec's warmup
# (no decay schedule could be fair to all) and no step cap before the budget (as bench_quality.py)
EQUAL_TIME = ["train.lr_schedule=constant", "train.max_steps=1000000"]


def at_equal_time(set_name: str, minutes: float) -> dict:
    """The set's variants through forge compare at `minutes` of training time each; the comparison view's
    JSON plus each variant run's last evaluation (the contribution probes and ACT at evaluation)."""
    from forge.compare.run import Request, run_comparison
    from forge.compare.view import comparison_view, render_terminal

    chosen = {name: v for name, v in SETS[set_name].items() if name not in EXTRAS}
    cid = f"contrib-time-{set_name}-{minutes:g}min"
    root = ROOT / "runs"
    if (root / cid).exists():
        request = Request([], resume=cid, output_dir=root, force=True)
    else:   # an ablation differs from the design on purpose (B1/B2 fail): force, which each lineage records
        request = Request([(ROOT / spec, ov) for spec, ov in chosen.values()], shared=[*SHARED, *EQUAL_TIME],
                          budget=f"minutes={minutes:g}", comparison_id=cid, output_dir=root, force=True)
    outcome = run_comparison(request)
    view = comparison_view(outcome.path, outcome.record)
    render_terminal(view)
    runs = {}
    for name, entry in zip(chosen, outcome.record["variants"]):
        evals = evaluations(root / entry["run_id"])
        last = evals[-1] if evals else {}
        runs[name] = {"run": entry["run_id"], "steps": entry["step"], "tokens": entry["tokens"],
                      "train_seconds": entry["train_seconds"],
                      "last_eval": {k: last[k] for _, k, _ in COLUMNS if k in last}}
    rows = [[name, r["steps"], f"{r['train_seconds']:.0f}",
             *[fmt.format(r["last_eval"][key]) if key in r["last_eval"] else "-" for _, key, fmt in COLUMNS]]
            for name, r in runs.items()]
    print(f"{set_name}, {minutes:g} min each:\n" + table(["variant", "steps", "train s", *[c[0] for c in COLUMNS]],
                                                         rows))
    return {"comparison": outcome.record["id"], "status": outcome.status, "minutes_per_variant": minutes,
            "shared_overrides": [*SHARED, *EQUAL_TIME], "machine": outcome.record["machine"], "variants": runs, **view.to_json()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="sets", action="append", choices=sorted(SETS))
    parser.add_argument("--only", action="append", help="train only these variants: NAME (every set) or SET:NAME")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="summarise the runs that exist, train nothing")
    parser.add_argument("--equal-time", type=float, metavar="MINUTES",
                        help="compare the variants at MINUTES of training each through forge compare")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of --equal-time's one process")
    args = parser.parse_args()
    sets = args.sets or list(SETS)
    (ROOT / "runs").mkdir(exist_ok=True)
    if args.equal_time:
        setup_threads(args.threads)
        results = {}
        for s in sets:   # the file is rewritten after each set: nothing lost on a crash
            results[s] = at_equal_time(s, args.equal_time)
            write_result("contributions_equal_time", {"threads": args.threads, "sets": results})
        return
    if not args.table_only:
        jobs = [(spec, ov, run_id(s, name, args.steps)) for extra in (False, True) for s in sets
                for name, (spec, ov) in SETS[s].items()
                if (name in EXTRAS) == extra and (not args.only or name in args.only or f"{s}:{name}" in args.only)]
        train_all(jobs, args.steps, args.jobs)
    results = {s: summarise(s, SETS[s], args.steps) for s in sets}
    for s in sets:
        print(render(s, results[s]))
    write_result("contributions", {"steps": args.steps, "jobs": args.jobs, "sets": results})


if __name__ == "__main__":
    main()
