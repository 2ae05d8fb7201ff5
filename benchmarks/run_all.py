"""Run every benchmark, one fresh process each, in the order of BENCHMARKS.md.

    FORGE_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/run_all.py [--quick] [--skip quality ...]

--quick runs each script's --quick mode (tiny shapes: about 3 minutes in all) and writes
results/<name>_quick.json, leaving the full figures alone. The full set takes about 30 minutes on the
project's 2-core CPU, half of it the equal-wall-clock quality runs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("roofline", "train_step", "profile", "optimise", "optim", "attention", "memory", "cli", "data",
           "sampling", "quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=SCRIPTS)
    args = parser.parse_args()
    failed = []
    for name in SCRIPTS:
        if name in args.skip:
            continue
        extra = ["--quick"] if args.quick else []
        print(f"== bench_{name} {' '.join(extra)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py"), *extra], cwd=HERE.parent).returncode
        print(f"== bench_{name}: exit {rc}, {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
