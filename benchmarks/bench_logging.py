"""Logging overhead (F1): what metric collection and recording cost a training step, with and without W&B,
at the design's two logging frequencies (every 10 and every 100 steps).

A logging step differs from a plain one in two ways: train_step(collect=True) gathers every metric family
(attention statistics, optimizer diagnostics, state-gradient hooks, and a host sync per metric), and
record() writes the record (metrics.jsonl, W&B offline when on, monitors, live view). Both are measured on
the real Trainer, interleaved (plain, logging, plain, ...) so that machine load hits every case alike:

    overhead(every N) = (median logging step - median plain step + median record) / (N * median plain step)

    .venv/bin/python benchmarks/bench_logging.py [--spec specs/tiny.toml] [--rounds 12] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FREQUENCIES = (10, 100)


def build_trainer(spec_path: Path, wandb_mode: str, run_root: Path):
    from forge.spec.load import load_spec
    from forge.train.components import build_components
    from forge.train.live import LiveView
    from forge.train.loop import Trainer
    from forge.train.metrics_log import MetricsLog
    from forge.train.monitors import MonitorSet, load_monitors
    from forge.train.run_dir import RunDir

    resolved = load_spec(spec_path, [f"logging.wandb.mode={wandb_mode}"])
    spec = resolved.spec
    run = RunDir.create(run_root, f"bench-{wandb_mode}")
    parts = build_components(spec, ROOT / "data")
    live = LiveView(run.run_id, 0, spec.train.max_steps, tty=False)
    log = MetricsLog(run.metrics_path, spec, run.run_id, run.path, {"spec_hash": resolved.hash},
                     warn=lambda message: None)
    return Trainer(resolved, run, parts, live, log, MonitorSet(load_monitors(spec.run.checklist))), log, live


def measure(trainer, rounds: int) -> dict[str, list[float]]:
    """Per round: one plain step, then one logging step and its record(); seconds each."""
    times = {"plain": [], "logging": [], "record": []}
    for r in range(rounds + 1):                      # round 0 warms up (first-call costs)
        t0 = time.perf_counter()
        trainer.train_step(collect=False)
        t1 = time.perf_counter()
        metrics = trainer.train_step(collect=True)
        t2 = time.perf_counter()
        trainer.record({**metrics, **trainer.perf_metrics()})
        t3 = time.perf_counter()
        if r:
            times["plain"].append(t1 - t0)
            times["logging"].append(t2 - t1)
            times["record"].append(t3 - t2)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "tiny.toml")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"command": " ".join(["benchmarks/bench_logging.py", *sys.argv[1:]]), "spec": str(args.spec),
               "threads": args.threads, "torch": torch.__version__, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for wandb_mode in ("disabled", "offline"):
            trainer, log, live = build_trainer(args.spec, wandb_mode, Path(tmp))
            try:
                times = measure(trainer, args.rounds)
            finally:
                log.close()
                live.close()
            plain, logging_step, record = (statistics.median(times[k]) for k in ("plain", "logging", "record"))
            case = {"plain_step_s": plain, "logging_step_s": logging_step, "record_s": record,
                    "collect_extra_s": logging_step - plain}
            for every in FREQUENCIES:
                case[f"overhead_every_{every}"] = (logging_step - plain + record) / (every * plain)
            results["cases"][f"wandb_{wandb_mode}"] = case
            print(f"W&B {wandb_mode:8s}  plain {plain * 1e3:7.1f} ms  logging step {logging_step * 1e3:7.1f} ms  "
                  f"record {record * 1e3:6.1f} ms  overhead every 10: {case['overhead_every_10']:.2%}  "
                  f"every 100: {case['overhead_every_100']:.2%}", flush=True)
    out = ROOT / "benchmarks" / "results" / "logging.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
