"""Quality at equal wall-clock: held-out bits-per-byte after the same training time, by `forge compare`.

    FORGE_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/bench_quality.py [--tiny-minutes 1.5]
        [--phase1-minutes 3] [--threads 2] [--quick] [--output-dir runs]

Two comparisons, three variants each (forge.compare: each variant an ordinary run, checklist-gated, trained
round-robin in one process, a slice each until its next evaluation, until each has used its budget of training
seconds: evaluation excluded), then the comparison view (held-out bits/byte on the same batches, per source):
  tiny size    specs/tiny_local.toml | + optim.name=adamw | specs/tiny_baseline_local.toml
  phase1 size  specs/local.toml      | + optim.name=adamw | specs/baseline_local.toml     (batch 8)
The Phase 1 stack vs the same-size AdamW transformer; Phase 1 with AdamW separates the optimizer's effect
from the architecture's. The baselines deviate from the design on purpose (a third layer or a wider FFN for
the same parameter count: B2-architecture fails), so the comparison launches with force, which each run's
lineage records (as bench_contributions.py does for its ablations). Every variant gets the same short warmup and then a constant lr
(train.lr_schedule=constant): the step count each reaches is unknown in advance, so no decay schedule could be
fair to all. Writes benchmarks/results/quality.json (the view's JSON per comparison) and the pages
<output-dir>/<comparison id>/comparison.html.
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from common import setup_threads, write_result
from forge.compare.run import Request, run_comparison
from forge.compare.view import comparison_view, render_terminal

COMPARISONS = {
    "tiny": [("specs/tiny_local.toml", []), ("specs/tiny_local.toml", ["optim.name=adamw"]),
             ("specs/tiny_baseline_local.toml", [])],
    "phase1": [("specs/local.toml", []), ("specs/local.toml", ["optim.name=adamw"]),
               ("specs/baseline_local.toml", [])],
}
# the same for every variant of a comparison: short warmup, constant lr, a few eval batches per source, and an
# evaluation (the end of a slice) every 25 steps
# (and no step cap before the time budget: tiny.toml's max_steps = 300 would stop the faster baseline early)
SHARED = {"tiny": ["train.warmup_steps=20", "train.lr_schedule=constant", "train.eval_every=25",
                   "train.max_steps=1000000"],
          "phase1": ["train.warmup_steps=5", "train.lr_schedule=constant", "data.batch_size=8",
                     "data.eval.max_batches=2", "train.eval_every=10"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny-minutes", type=float, default=1.5)
    parser.add_argument("--phase1-minutes", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="tiny size only, 10 s per variant")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"))
    args = parser.parse_args()
    setup_threads(args.threads)
    budgets = {"tiny": 10 / 60} if args.quick else {"tiny": args.tiny_minutes, "phase1": args.phase1_minutes}
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    results = {}
    for size, minutes in budgets.items():   # the file is rewritten after each comparison: nothing lost on a crash
        request = Request([(Path(s), o) for s, o in COMPARISONS[size]], shared=SHARED[size],
                          budget=f"minutes={minutes:g}", comparison_id=f"quality-{size}-{stamp}",
                          output_dir=args.output_dir, force=True)
        outcome = run_comparison(request)
        view = comparison_view(outcome.path, outcome.record)
        render_terminal(view)
        results[size] = {"comparison": outcome.record["id"], "minutes_per_variant": minutes,
                         "shared_overrides": SHARED[size], "status": outcome.status, **view.to_json()}
        write_result("quality_quick" if args.quick else "quality",
                     {"threads": args.threads, "comparisons": results})


if __name__ == "__main__":
    main()
